"""The Ray backend's argument checks, its error without Ray, and what the driver gives its workers, on a
stand-in for Ray that runs the workers in this process (the cluster runs are in
tests/integration/test_distributed_ray.py)."""

import json
import os
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
    _done_folders,
    _ShardWorker,
    distributed_activations,
    distributed_statistics,
    read_shards,
    require_ray,
)
from traitlens.pipeline import collect_activations, extract_trait, stream_statistics


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
    class (kept in ``workers``), a method call runs at once (its name is kept in ``calls``), and ``ray.get``
    returns its result or raises its error. An actor whose class raised when it was made is dead, as in
    Ray: each call to it raises a ``RayActorError`` whose last line is that error. Fast, and enough for
    what the driver passes to its workers; the real cluster (processes, restarts) is tested in
    tests/integration/test_distributed_ray.py."""

    def __init__(self):
        super().__init__("ray")
        self.exceptions = types.ModuleType("ray.exceptions")
        self.exceptions.RayActorError = type("RayActorError", (Exception,), {})
        self.initialized = False
        self.workers = []
        self.calls = []

    def remote(self, cls):
        ray = self

        class ActorClass:
            def options(self, **resources):
                return self

            def remote(self, *args):
                try:
                    ray.workers.append(cls(*args))
                except Exception as err:
                    died = ray.exceptions.RayActorError(
                        f"The actor died because of an error raised in its creation task, ...\n"
                        f"{type(err).__name__}: {err}"
                    )
                    return Actor(None, ray.calls, died)
                return Actor(ray.workers[-1], ray.calls)

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
    def __init__(self, worker, calls, died=None):
        self.worker, self.calls, self.died = worker, calls, died

    def __getattr__(self, name):
        self.calls.append(name)
        return Method(getattr(self.worker, name) if self.died is None else self.dead)

    def dead(self, *args):
        raise self.died


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
    with pytest.raises(
        ValueError,
        match=r"'dtype': 'float32'.*dtype float32 in the workers, bfloat16 in the driver's.*same dtype",
    ):
        distributed_activations(model, data, layers=[1], cluster=cluster, progress=False)
    assert not [p for p in (tmp_path / "shards").iterdir() if p.is_dir()]  # no shard was computed
    # no shard is done: the corrected rerun replaces the failed job's manifest instead of refusing it
    distributed_activations(
        model, data, layers=[1], cluster=replace(cluster, model_kwargs={}), progress=False
    )
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["model_kwargs"] == {"dtype": "bfloat16"}


def test_a_peft_wrapped_driver_model_is_refused(ray, tiny_folder, data):
    import peft

    model, tokenizer = load_model(str(tiny_folder))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    match = r"PEFT-wrapped PeftModel: the Ray workers load the model by name.*merge_and_unload"
    with pytest.raises(ValueError, match=match):
        distributed_activations(wrapped, data, layers=[1], progress=False)
    with pytest.raises(ValueError, match=match):
        extract_trait(wrapped, tokenizer, data, layers=[1], backend="ray", progress=False)
    assert not ray.initialized and not ray.workers


def test_a_driver_model_changed_in_memory_is_refused_naming_the_parameter(ray, tiny_folder, data, tmp_path):
    model, _ = load_model(str(tiny_folder))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # the input embeddings are unchanged
    cluster = RayCluster(workers=1, out_dir=tmp_path)
    with pytest.raises(
        ValueError, match=r"differ from the driver's model \(first at model\.layers\.1\.mlp\.down_proj"
    ):
        distributed_activations(model, data, layers=[1], cluster=cluster, progress=False)
    assert "run" not in ray.calls  # no shard was computed


def test_layers_keep_the_order_given(ray, tiny_folder, data, tmp_path):
    model, tokenizer = load_model(str(tiny_folder))
    cluster = RayCluster(workers=2, model=str(tiny_folder), out_dir=tmp_path, shard_size=4)
    stats = distributed_statistics(data.train, layers=[2, 0], batch_size=4, cluster=cluster, progress=False)
    expected = stream_statistics(model, tokenizer, data.train, layers=[2, 0], batch_size=4)
    torch.testing.assert_close(stats.mean_difference(), expected.mean_difference())
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["layers"] == [2, 0]


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        ([1, 1], ValueError, r"layers must each be given once, got \[1, 1\]"),
        ([1.7], TypeError, r"layers must be ints, got 1\.7 \(float\)"),
        ([True], TypeError, r"layers must be ints, got True \(bool\)"),
        ([-1], ValueError, r"layers must be indices >= 0, got '-1'"),
        ([], ValueError, r"layers is empty"),
        (1, TypeError, r"layers must be a sequence of ints"),
    ],
)
def test_bad_layers_are_refused_before_ray_starts(ray, tiny_folder, data, layers, error, match):
    cluster = RayCluster(workers=1, model=str(tiny_folder))
    with pytest.raises(error, match=match):
        distributed_statistics(data.train, layers=layers, cluster=cluster, progress=False)
    assert not ray.initialized and not ray.workers


def test_a_layer_past_the_workers_model_is_refused_before_any_shard_runs(ray, tiny_folder, data, tmp_path):
    cluster = RayCluster(workers=1, model=str(tiny_folder), out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^layers must be indices in 0\.\.2, got '99'$"):
        distributed_statistics(data.train, layers=[0, 99], cluster=cluster, progress=False)
    assert "run" not in ray.calls


def test_workers_that_cannot_load_the_model_say_so_and_the_fixed_rerun_runs(ray, tiny_folder, data, tmp_path):
    missing = tmp_path / "tiny-lama"  # a typo
    cluster = RayCluster(workers=2, model=str(missing), out_dir=tmp_path, shard_size=4)
    args = {"layers": [1], "batch_size": 4, "progress": False}
    match = (
        rf"^the Ray workers could not load '{missing}' with model_kwargs=\{{\}}: FileNotFoundError: no model"
    )
    with pytest.raises(RuntimeError, match=match):
        distributed_statistics(data.train, cluster=cluster, **args)
    assert "run" not in ray.calls
    driver, tokenizer = load_model(str(tiny_folder))
    with pytest.raises(RuntimeError, match="could not load"):
        extract_trait(driver, tokenizer, data, backend="ray", cluster=cluster, **args)
    # no shard is done: the corrected rerun replaces the manifest of the failed job instead of refusing it
    stats = distributed_statistics(data.train, cluster=replace(cluster, model=str(tiny_folder)), **args)
    assert stats.pos.count == len(data.train)


def test_a_second_worker_that_cannot_load_says_so_too(ray, tiny_folder, data, tmp_path, monkeypatch):
    """The first worker loaded; another (a node without the model) could not: it said "restarted, run again
    to resume", which no rerun mends."""
    made = []

    class SecondFails(_ShardWorker):
        def __init__(self, *args):
            made.append(1)
            if len(made) == 2:
                raise FileNotFoundError("no model at /models/x on this node")
            super().__init__(*args)

    monkeypatch.setattr("traitlens.distributed._ShardWorker", SecondFails)
    cluster = RayCluster(workers=2, model=str(tiny_folder), out_dir=tmp_path, shard_size=4)
    with pytest.raises(RuntimeError, match=r"could not load .*: FileNotFoundError: no model at /models/x"):
        distributed_statistics(data.train, layers=[1], batch_size=4, cluster=cluster, progress=False)


def test_a_rerun_with_other_pairs_says_the_pairs_differ(ray, tiny_folder, data, tmp_path):
    cluster = RayCluster(workers=1, model=str(tiny_folder), out_dir=tmp_path, shard_size=4)
    distributed_statistics(data.train, layers=[1], cluster=cluster, progress=False)
    with pytest.raises(
        ValueError, match=r"another job \(the pairs differ \(data hash [0-9a-f]{12}, now [0-9a-f]{12}\)"
    ):
        distributed_statistics(data.train[:-1] + data.val[:1], layers=[1], cluster=cluster, progress=False)


class Interrupted(Exception):
    pass


def stop(done):
    """An ``on_shard`` that ends the job after its first shard, as a Ctrl-C would."""
    raise Interrupted


def test_a_resume_after_the_checkpoint_changed_is_refused(ray, data, tmp_path):
    checkpoint = tmp_path / "latest"  # e.g. a fine-tuning run that keeps writing its last checkpoint here

    def save(seed):
        make_tiny_model("llama", seed=seed).save_pretrained(checkpoint)
        make_word_tokenizer().save_pretrained(checkpoint)

    save(seed=0)
    cluster = RayCluster(workers=1, model=str(checkpoint), out_dir=tmp_path / "run", shard_size=4)
    args = {"layers": [1, 2], "batch_size": 4, "progress": False, "cluster": cluster}
    with pytest.raises(Interrupted):
        distributed_statistics(data.train, on_shard=stop, **args)
    save(seed=1)
    with pytest.raises(ValueError, match=r"other weights .*\(first at model\.embed_tokens\.weight: sum"):
        distributed_statistics(data.train, **args)
    assert ray.calls.count("run") == 1  # the shard of the first run alone
    manifest_path = tmp_path / "run" / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # make it one written before weights were recorded
    assert "model.embed_tokens.weight" in manifest["weights"]["sums"]
    del manifest["weights"]
    manifest_path.write_text(json.dumps(manifest))
    stats = distributed_statistics(data.train, **args)  # resumed, unchecked, as before
    assert stats.pos.count == len(data.train)
    assert "weights" in json.loads(manifest_path.read_text())  # recorded from now on


def test_read_shards_of_an_unfinished_job_names_the_missing_shard(ray, tiny_folder, data, tmp_path):
    cluster = RayCluster(workers=1, model=str(tiny_folder), out_dir=tmp_path, shard_size=4)
    args = {"layers": [1], "batch_size": 4, "spill": True, "progress": False, "cluster": cluster}
    with pytest.raises(Interrupted):
        distributed_statistics(data.train, on_shard=stop, **args)  # 1 of 3 shards done
    with pytest.raises(FileNotFoundError, match=r"shard train-00001 is missing .*run it again to finish it"):
        read_shards(tmp_path, "train")
    distributed_statistics(data.train, **args)
    pos, neg = read_shards(tmp_path, "train")
    assert pos.shape == neg.shape == (1, len(data.train), 32)
    shards = tmp_path / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())  # one written before split sizes were
    del manifest["split_sizes"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    (shards / "train-00001" / "stats.safetensors").unlink()  # not done
    with pytest.raises(FileNotFoundError, match=r"shard train-00001 is missing"):
        read_shards(tmp_path, "train")


def test_shard_folders_are_read_in_the_order_of_their_index(tmp_path):
    for k in (100001, 9999, 100000, 99999, 10000):
        (tmp_path / f"train-{k:05d}").mkdir()
        (tmp_path / f"train-{k:05d}" / "stats.safetensors").touch()
    (tmp_path / "train-00003").mkdir()  # no statistics: not done
    assert [p.name for p in _done_folders(tmp_path, "train")] == [
        "train-09999", "train-10000", "train-99999", "train-100000", "train-100001",
    ]  # fmt: skip


def test_a_shard_folder_without_its_statistics_is_computed_again(ray, tiny_folder, data, tmp_path):
    cluster = RayCluster(workers=1, model=str(tiny_folder), out_dir=tmp_path, shard_size=4)
    args = {"layers": [1], "batch_size": 4, "spill": True, "progress": False, "cluster": cluster}
    expected = distributed_statistics(data.train, **args)
    (tmp_path / "shards" / "train-00001" / "stats.safetensors").unlink()  # e.g. a partial copy
    computed = []
    stats = distributed_statistics(data.train, on_shard=computed.append, **args)
    assert [done.name for done in computed] == ["train-00001"]
    torch.testing.assert_close(stats.mean_difference(), expected.mean_difference(), rtol=0, atol=0)
    assert read_shards(tmp_path, "train")[0].shape[1] == len(data.train)


def test_a_relative_out_dir_is_taken_from_the_drivers_working_directory(
    ray, tiny_folder, data, tmp_path, monkeypatch
):
    elsewhere = tmp_path / "worker"  # a worker on another node starts in its own working directory
    elsewhere.mkdir()
    run = _ShardWorker.run

    def run_elsewhere(self, *args):
        here = os.getcwd()
        os.chdir(elsewhere)
        try:
            return run(self, *args)
        finally:
            os.chdir(here)

    monkeypatch.setattr(_ShardWorker, "run", run_elsewhere)
    monkeypatch.chdir(tmp_path)
    cluster = RayCluster(workers=1, model=str(tiny_folder), out_dir="run", shard_size=4)
    stats = distributed_statistics(data.train, layers=[1], batch_size=4, cluster=cluster, progress=False)
    assert stats.pos.count == len(data.train)
    assert (tmp_path / "run" / "shards" / "train-00002" / "stats.safetensors").is_file()
    assert not (elsewhere / "run").exists()


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
    with pytest.raises(ValueError, match=r"another job \(model_kwargs=.*'bfloat16'.*now.*'float32'"):
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
