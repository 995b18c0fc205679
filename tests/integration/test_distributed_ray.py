"""Sharded extraction on a local Ray instance (2 workers) equals the single-process run (also for a bf16
driver model), survives a worker killed mid-shard, resumes after an interruption, and stops with one line
for a layer past the model or a model the workers cannot load."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from traitlens import load_dataset, load_model
from traitlens.cli import main
from traitlens.distributed import RayCluster, distributed_activations, distributed_statistics, read_shards
from traitlens.pipeline import collect_activations, extract_trait, stream_statistics

pytestmark = pytest.mark.integration

LAYERS = [6, 14]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small():
    """The sentiment data cut to 24 / 8 / 8 pairs (every split still present)."""
    data = load_dataset("sentiment")
    return replace(data, pairs=data.train[:24] + data.val[:8] + data.test[:8])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cluster(tmp_path: Path, **kw) -> RayCluster:
    return RayCluster(workers=2, out_dir=tmp_path, shard_size=kw.pop("shard_size", 8), **kw)


def busy_worker_pid() -> int | None:
    """The pid of a Ray worker process that is running a shard right now (Ray titles it by the method)."""
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if title.startswith("ray::_ShardWorker.run"):
            return int(entry.name)
    return None


def test_extract_on_ray_equals_the_single_process_run(real_model, small, tmp_path):
    model, tokenizer = real_model
    args = {"layers": LAYERS, "batch_size": 8, "progress": False}
    local = extract_trait(model, tokenizer, small, **args)
    remote = extract_trait(model, tokenizer, small, backend="ray", cluster=cluster(tmp_path), **args)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir() if p.is_dir()) == [
        "test-00000", "train-00000", "train-00001", "train-00002", "val-00000",
    ]  # fmt: skip
    for split in ("train", "val", "test"):
        for got, expected in zip(remote.activations[split], local.activations[split], strict=True):
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for i in range(len(LAYERS)):
        assert relative(remote.vectors["mean_diff"][i], local.vectors["mean_diff"][i]) < 1e-6
        for method in ("pca_diff", "probe", "gradient", "ica"):
            cosine = torch.nn.functional.cosine_similarity(
                remote.vectors[method][i], local.vectors[method][i], dim=0
            )
            assert cosine > 0.999, (method, LAYERS[i], float(cosine))
        assert torch.equal(remote.vectors["random_baseline"][i], local.vectors["random_baseline"][i])
    assert (remote.best_method, remote.best_layer) == (local.best_method, local.best_layer)
    assert remote.test["accuracy"] == local.test["accuracy"]


def test_a_bf16_driver_model_gets_bf16_workers(tmp_path):
    model, tokenizer = load_model(dtype=torch.bfloat16)  # the workers' default would be float32
    data = load_dataset("sentiment")
    data = replace(data, pairs=data.train[:8] + data.val[:4] + data.test[:4])
    cluster = RayCluster(workers=1, out_dir=tmp_path, shard_size=8)
    acts = distributed_activations(model, data, layers=[6], batch_size=8, cluster=cluster, progress=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["model_kwargs"] == {"dtype": "bfloat16"}
    for split in ("train", "val", "test"):
        for got, side in zip(acts[split], data.examples(split), strict=True):
            expected = collect_activations(model, tokenizer, side, layers=[6], batch_size=8)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_statistics_survive_a_worker_killed_mid_shard(real_model, tmp_path):
    model, tokenizer = real_model
    pairs = load_dataset("sentiment").train[:24]
    reports, killed = [], []

    def kill_a_busy_worker(done):
        reports.append(done)
        deadline = time.monotonic() + 5
        while not killed and time.monotonic() < deadline:
            pid = busy_worker_pid()
            if pid is not None and pid != done.pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    stats = distributed_statistics(
        pairs, layers=LAYERS, batch_size=4, outer=True, progress=False,
        cluster=cluster(tmp_path, shard_size=4), on_shard=kill_a_busy_worker,
    )  # fmt: skip
    assert killed, "no worker was busy with a shard when the test tried to kill one"
    # every shard reported exactly once, none by the killed process after its death, one by its restart
    assert sorted(r.name for r in reports) == [f"train-{k:05d}" for k in range(6)]
    assert killed[0] not in {r.pid for r in reports[1:]}
    assert len({r.pid for r in reports} - {killed[0]}) >= 2
    assert stats.pos.count == stats.neg.count == stats.diff.count == 24
    assert not list((tmp_path / "shards").glob(".*"))  # the dead worker's partial shard is cleaned up

    expected = stream_statistics(model, tokenizer, pairs, layers=LAYERS, batch_size=4, outer=True)
    for i in range(len(LAYERS)):
        assert relative(stats.mean_difference()[i], expected.mean_difference()[i]) < 1e-6
        assert abs(float(stats.pca_diff()[i] @ expected.pca_diff()[i])) > 1 - 1e-6


def test_a_rerun_after_an_interruption_resumes_and_gives_the_same_result(real_model, tmp_path):
    pairs = load_dataset("sentiment").train[:24]
    args = {"layers": LAYERS, "batch_size": 4, "spill": True, "progress": False}

    class Interrupted(Exception):
        pass

    def stop_after_two(done, seen=[]):  # noqa: B006 (a counter local to this test)
        seen.append(done.name)
        if len(seen) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        distributed_statistics(
            pairs, cluster=cluster(tmp_path, shard_size=4), on_shard=stop_after_two, **args
        )
    done_before = {p.name for p in (tmp_path / "shards").iterdir() if p.is_dir()}
    assert 2 <= len(done_before) < 6

    computed = []
    stats = distributed_statistics(
        pairs, cluster=cluster(tmp_path, shard_size=4), on_shard=computed.append, **args
    )
    assert {d.name for d in computed} == {f"train-{k:05d}" for k in range(6)} - done_before
    expected = stream_statistics(real_model[0], real_model[1], pairs, layers=LAYERS, batch_size=4)
    assert relative(stats.mean_difference(), expected.mean_difference()) < 1e-6
    assert stats.pos.count == 24
    pos, neg = read_shards(tmp_path, "train")
    assert pos.shape == neg.shape == (len(LAYERS), 24, 576)
    mean_difference = pos.double().mean(1) - neg.double().mean(1)
    assert relative(stats.mean_difference(), mean_difference.float()) < 1e-6

    with pytest.raises(ValueError, match=r"holds shards of another job.*layers"):
        distributed_statistics(pairs, cluster=cluster(tmp_path, shard_size=4), **{**args, "layers": [5]})


def test_a_layer_past_the_model_and_a_model_that_cannot_load_are_one_line_errors(tmp_path):
    pairs = load_dataset("sentiment").train[:8]
    args = {"batch_size": 8, "progress": False}
    with pytest.raises(ValueError) as info:
        distributed_statistics(pairs, layers=[6, 99], cluster=cluster(tmp_path / "layers"), **args)
    assert type(info.value) is ValueError  # raised by the driver, not a RayTaskError from inside a worker
    assert str(info.value) == "layers must be indices in 0..29, got '99'"
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError) as info:
        distributed_statistics(
            pairs, layers=[6], cluster=cluster(tmp_path / "missing", model=str(missing)), **args
        )
    assert str(info.value).startswith(
        f"the Ray workers could not load '{missing}' with model_kwargs={{}}: FileNotFoundError: "
    )
    assert "\n" not in str(info.value)


def test_cli_extract_with_the_ray_backend(real_model, small, tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text(
        "".join(json.dumps({"pos": p.pos, "neg": p.neg, "split": p.split}) + "\n" for p in small.pairs)
    )
    out = tmp_path / "run"
    argv = ["extract", "--data", str(data), "--layers", "6,14", "--methods", "mean_diff", "probe",
            "--no-report", "--out", str(out), "--backend", "ray", "--workers", "2", "--shard-size", "8"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split_sizes"] == {"train": 24, "val": 8, "test": 8}
    assert summary["chosen"]["test"]["accuracy"] >= 0.75
    assert len([p for p in (out / "shards").iterdir() if p.is_dir()]) == 5
    written = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*/stats.safetensors")}
    assert main(argv) == 2  # a finished run is kept, unless told to replace it
    assert main([*argv, "--overwrite"]) == 0  # everything is done: the rerun reuses every shard
    assert written == {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*/stats.safetensors")}
