"""The Ray backend's argument checks, its error without Ray, and what the driver gives its workers, on a
stand-in for Ray that runs the workers in this process (the cluster runs are in
tests/integration/test_distributed_ray.py)."""

import json
import random
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_word_tokenizer
from traitlens import load_dataset, load_model
from traitlens.cli import main
from traitlens.dataset import SPLITS
from traitlens.distributed import (
    RAY_MISSING,
    RayCluster,
    distributed_activations,
    distributed_statistics,
    require_ray,
)
from traitlens.pipeline import collect_activations, stream_statistics


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match="pip install 'traitlens\\[ray\\]'"):
        require_ray()
    assert main(["extract", "--trait", "sentiment", "--backend", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"traitlens extract: error: {RAY_MISSING}\n"  # one line, no traceback
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("field", "value"), [("workers", 0), ("shard_size", 0), ("shard_size", 2.5), ("retries", -1)]
)
def test_cluster_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        RayCluster(**{field: value})


class StandInRay(types.ModuleType):
    """The few Ray calls traitlens.distributed makes, run in this process: an actor is an instance of its
    class (kept in ``workers``), a method call runs at once, and ``ray.get`` returns its result or raises
    its error. Fast, and enough for what the driver passes to its workers; the real cluster (processes,
    restarts) is tested in tests/integration/test_distributed_ray.py."""

    def __init__(self):
        super().__init__("ray")
        self.exceptions = types.ModuleType("ray.exceptions")
        self.exceptions.RayActorError = type("RayActorError", (Exception,), {})
        self.initialized = False
        self.workers = []

    def remote(self, cls):
        ray = self

        class ActorClass:
            def options(self, **resources):
                return self

            def remote(self, *args):
                ray.workers.append(cls(*args))
                return Actor(ray.workers[-1])

        return ActorClass()

    def is_initialized(self):
        return self.initialized

    def init(self, address=None):
        self.initialized = True

    def shutdown(self):
        self.initialized = False

    def cluster_resources(self):
        return {"CPU": 4}

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor, no_restart=False):
        pass


class Actor:
    def __init__(self, worker):
        self.worker = worker

    def __getattr__(self, name):
        return Method(getattr(self.worker, name))


class Method:
    def __init__(self, method):
        self.method = method

    def remote(self, *args):
        return Called(self.method, args)


class Called:
    """A finished remote call: its value, or the error it raised."""

    def __init__(self, method, args):
        self.value = self.error = None
        try:
            self.value = method(*args)
        except Exception as err:
            self.error = err


@pytest.fixture
def ray(monkeypatch):
    stand_in = StandInRay()
    monkeypatch.setitem(sys.modules, "ray", stand_in)
    monkeypatch.setitem(sys.modules, "ray.exceptions", stand_in.exceptions)
    return stand_in


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama (float32) with a word-level tokenizer, saved where ``load_model`` reads it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 / 4 / 4 pairs of random words of the tiny vocabulary, positives and negatives from two ranges."""
    rng = random.Random(0)

    def text(low: int) -> str:
        return " ".join(f"w{rng.randrange(low, low + 60)}" for _ in range(rng.randint(2, 7)))

    rows = [
        {"pos": text(0), "neg": text(60), "split": s} for s in ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    ]
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_dataset(path)


def test_a_bf16_driver_model_gets_bf16_workers(ray, tiny_folder, data, tmp_path):
    model, tokenizer = load_model(str(tiny_folder), dtype=torch.bfloat16)  # the checkpoint is float32
    cluster = RayCluster(workers=2, out_dir=tmp_path, shard_size=4)
    acts = distributed_activations(model, data, layers=[0, 2], batch_size=4, cluster=cluster, progress=False)
    assert [worker.model.dtype for worker in ray.workers] == [torch.bfloat16] * 2
    assert cluster.model_kwargs == {}  # the caller's cluster is not changed
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["model_kwargs"] == {"dtype": "bfloat16"}
    for split in SPLITS:
        for got, side in zip(acts[split], data.examples(split), strict=True):
            expected = collect_activations(model, tokenizer, side, layers=[0, 2], batch_size=4)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_workers_in_another_dtype_than_the_driver_are_refused_naming_the_dtype(
    ray, tiny_folder, data, tmp_path
):
    model, _ = load_model(str(tiny_folder), dtype=torch.bfloat16)
    cluster = RayCluster(workers=1, out_dir=tmp_path, model_kwargs={"dtype": torch.float32})
    with pytest.raises(ValueError, match=r"'dtype': 'float32'.*float32.*driver's: bfloat16.*same dtype"):
        distributed_activations(model, data, layers=[1], cluster=cluster, progress=False)
    assert not [p for p in (tmp_path / "shards").iterdir() if p.is_dir()]  # no shard was computed


def test_a_rerun_with_other_model_kwargs_is_refused(ray, tiny_folder, data, tmp_path):
    def run(dtype):
        cluster = RayCluster(
            workers=1, model=str(tiny_folder), model_kwargs={"dtype": dtype}, out_dir=tmp_path
        )
        return distributed_statistics(data.train, layers=[1], batch_size=4, cluster=cluster, progress=False)

    stats = run(torch.bfloat16)
    model, tokenizer = load_model(str(tiny_folder), dtype=torch.bfloat16)
    expected = stream_statistics(model, tokenizer, data.train, layers=[1], batch_size=4)
    torch.testing.assert_close(stats.mean_difference(), expected.mean_difference(), rtol=0, atol=0)
    assert ray.workers[0].model.dtype == torch.bfloat16
    run("torch.bfloat16")  # the same setting, spelled otherwise: every shard is reused
    assert len(ray.workers) == 1
    with pytest.raises(ValueError, match=r"model_kwargs differ.*'bfloat16'.*now.*'float32'"):
        run(torch.float32)
    manifest = tmp_path / "shards" / "manifest.json"  # one written before model_kwargs were recorded
    old = json.loads(manifest.read_text())
    del old["model_kwargs"]
    manifest.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="predates recorded model_kwargs"):
        run(torch.bfloat16)  # resumed: every shard is reused
    assert len(ray.workers) == 1


def test_no_pairs_are_refused_up_front(ray):
    with pytest.raises(ValueError, match="pairs is empty"):
        distributed_statistics([], layers=[0], progress=False)
    assert not ray.initialized and not ray.workers


def test_a_dataset_without_a_split_is_refused_up_front(ray, tiny_folder, data):
    model, _ = load_model(str(tiny_folder))
    no_val = replace(data, pairs=data.train + data.test)
    with pytest.raises(ValueError, match="has no 'val' examples"):
        distributed_activations(model, no_val, layers=[0], progress=False)
    assert not ray.initialized and not ray.workers
