"""Sharded extraction on a Ray cluster: the same statistics and activations as one process, from many.

The pairs of each split are cut into fixed shards of ``shard_size`` pairs (shard ``train-00003`` holds
train pairs ``3 * shard_size .. 4 * shard_size - 1``). A pool of Ray actors, each holding the model on its
GPU (or CPU), runs ``stream_statistics`` on one shard at a time and writes the result into the shared output
folder ``out_dir/shards/<split>-<k>/``: ``stats.safetensors`` (the shard's ``ContrastiveStats``, float64
moments) and, with ``spill=True``, its activations ``batch_*.safetensors`` (``pos`` / ``neg``,
``[layer, n, hidden]``, and the pair ``index`` of each row: the format of
``stream_statistics(spill_to=...)``).

Exactly once, whatever fails:

- a shard is written into a temporary folder and renamed into place when complete, so a shard is done if
  and only if ``stats.safetensors`` is in its folder; a rerun of an interrupted job skips the done shards
  (resume) and computes the others again (a folder without its statistics is removed first);
- a worker that dies is restarted by Ray and its shard is run again (``retries`` times); a second run of a
  shard finds it done and keeps the first result, so nothing is counted twice;
- the driver merges the shard files, never in-flight results, in shard order, so the float64 sums (and the
  vectors) do not depend on which worker ran what, or when.

Before any shard runs, the driver asks the first worker what it loaded: ``layers`` are checked against its
number of decoder layers, and its weights (their dtype and the float64 sum of each parameter) against the
driver model's (``distributed_activations``) and against those recorded in the manifest.

``out_dir/shards/manifest.json`` records what the shards were computed with (model, ``model_kwargs``,
layers in the order given, position, shard size, data hash, the number of pairs of each split, and the
first worker's weights); a rerun with other settings, or whose workers load other weights (a checkpoint
replaced at the same path), is refused instead of mixing shards. While no shard is done (a job that failed
before its first shard), a rerun replaces the manifest.

Ray is an optional dependency (``pip install 'traitlens[ray]'``); it is imported only when a function here
runs. On a multi-node cluster ``out_dir`` must be a folder that every node sees at the same path (NFS or
similar), and every node needs traitlens and the model; see ``docs/distributed.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from traitlens.dataset import SPLITS, ContrastiveDataset, Pair
from traitlens.models import dtype_name, model_dtype
from traitlens.stats import ContrastiveStats

RAY_MISSING = "the ray backend needs Ray: pip install 'traitlens[ray]'"
STATS = "stats.safetensors"  # a shard is done when its folder holds this file (written last)


@dataclass
class RayCluster:
    """Where and how sharded extraction runs.

    Args:
        address: the Ray cluster to join (``"auto"``, ``"HEAD_IP:6379"``, ``"ray://HEAD_IP:10001"``); ``None``
            joins the one in ``$RAY_ADDRESS``, the one already initialised in this process, or one started on
            this machine with ``ray start``; else it starts a local Ray instance for the duration of the job.
        workers: number of actors; each loads the model once.
        model: what the workers load with ``traitlens.load_model`` (a hub id or a folder that exists on every
            node); ``None`` for the bundled model, or, in ``extract_trait``, the driver model's name.
        model_kwargs: more ``load_model`` arguments for the workers (``dtype``, ``revision``, ``device_map``).
            Without a ``dtype``, ``extract_trait`` and ``distributed_activations`` give the workers the driver
            model's dtype; ``distributed_statistics`` leaves ``load_model``'s default (float32 for the bundled
            model, the checkpoint's otherwise).
        out_dir: the shared output folder (shards, activations, manifest); a relative path is taken from
            the driver's working directory. ``None``: a temporary folder on the driver, deleted afterwards
            (fine for a local instance; no resume).
        shard_size: pairs per shard; fixed for a job (part of what a rerun must match).
        cpus_per_worker, gpus_per_worker: Ray resources of one actor. ``gpus_per_worker=None`` means 1 when
            the cluster has GPUs, else 0 (the worker then runs on CPU with ``cpus_per_worker`` threads).
        retries: how many times a dead worker is restarted and its shard rerun before the job fails.
    """

    address: str | None = None
    workers: int = 2
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    out_dir: str | Path | None = None
    shard_size: int = 64
    cpus_per_worker: float = 1
    gpus_per_worker: float | None = None
    retries: int = 2

    def __post_init__(self):
        for name in ("workers", "shard_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


@dataclass(frozen=True)
class Shard:
    """One fixed slice of a split: ``pairs[start:stop]``; ``name`` is ``"<split>-<k>"``."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


@dataclass(frozen=True)
class ShardDone:
    """What a worker reports for a shard it computed: where and how long (for progress and checks)."""

    name: str
    pairs: int
    seconds: float
    host: str
    pid: int


# --------------------------------------------------------------------------------------------------------
# Public entry points


def distributed_statistics(
    pairs: Sequence[Pair],
    *,
    layers: Sequence[int] | None = None,
    position: str = "prompt_last",
    batch_size: int = 16,
    outer: bool = False,
    spill: bool = False,
    cluster: RayCluster | None = None,
    progress: bool = True,
    on_shard: Callable[[ShardDone], None] | None = None,
) -> ContrastiveStats:
    """``stream_statistics`` over ``pairs`` on a Ray cluster: the per-layer moments of the positives,
    negatives and paired differences, merged from the shards in shard order.

    Equal to ``stream_statistics(model, tokenizer, pairs, ...)`` up to float32 noise in the activations
    (batches are cut differently). With ``spill=True`` the activations stay in the shard folders of
    ``cluster.out_dir``; read them back with ``read_shards``. ``on_shard`` is called on the driver after
    each shard that this run computed (not for shards found done).
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty; distributed_statistics needs at least one pair")
    cluster = cluster or RayCluster()
    if spill and cluster.out_dir is None:
        raise ValueError("spill=True needs RayCluster(out_dir=...): the activations are written there")
    stats = _run({"train": pairs}, cluster, _settings(layers, position, outer, spill, cluster),
                 batch_size, progress, on_shard)  # fmt: skip
    return stats["train"]


def distributed_activations(
    model: torch.nn.Module,
    dataset: ContrastiveDataset,
    *,
    layers: Sequence[int],
    position: str = "prompt_last",
    batch_size: int = 16,
    cluster: RayCluster | None = None,
    progress: bool = True,
    on_shard: Callable[[ShardDone], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The activations of every split of ``dataset``, computed on a Ray cluster: split -> ``(pos, neg)``,
    each ``[layer, n, hidden]`` float32 on CPU, rows in dataset order (what ``extract_trait`` collects).

    ``model`` is the driver's copy: the workers load ``cluster.model`` (default: the same name) in
    ``cluster.model_kwargs["dtype"]`` (default: the driver model's dtype), and their weights are compared
    with the driver's before any shard runs. A PEFT-wrapped ``model`` is refused: the workers could not
    rebuild its adapter.
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            f"model is a PEFT-wrapped {type(model).__name__}: the Ray workers load the model by name and "
            "cannot rebuild its adapter; merge it (model = model.merge_and_unload()), save it "
            "(model.save_pretrained(folder) and tokenizer.save_pretrained(folder)) and load that folder"
        )
    cluster = cluster or RayCluster()
    for split in SPLITS:
        if not dataset.split(split):
            raise ValueError(f"dataset {dataset.name!r} has no {split!r} examples; every split is needed")
    if cluster.model is None:
        cluster = replace(cluster, model=_name_to_load(model))
    if not {"dtype", "torch_dtype"} & cluster.model_kwargs.keys():
        # load_model's default (float32 for the bundled model) need not be the driver's: a bf16 driver model
        # would fail the weight check against float32 workers
        cluster = replace(cluster, model_kwargs={**cluster.model_kwargs, "dtype": model_dtype(model)})
    settings = _settings(layers, position, False, True, cluster)
    pairs = {split: list(dataset.split(split)) for split in SPLITS}
    with _out_dir(cluster) as cluster:
        stats = _run(pairs, cluster, settings, batch_size, progress, on_shard, expect=_fingerprint(model))
        acts = {split: read_shards(cluster.out_dir, split) for split in SPLITS}
    for split, (pos, _) in acts.items():
        if pos.shape[1] != stats[split].pos.count:
            raise RuntimeError(
                f"the {split} shards hold {pos.shape[1]} activation rows but their statistics count "
                f"{stats[split].pos.count}: the shard folders were changed while the job ran"
            )
    return acts


def read_shards(out_dir: str | Path, split: str, layer_index: int | None = None):
    """The spilled activations of one split from ``out_dir/shards``, in dataset order: ``(pos, neg)``,
    each ``[layer, n, hidden]``, or ``[n, hidden]`` of one layer (its index among the extracted layers).

    Every shard of the split must be done (a ``FileNotFoundError`` names the first one missing); with a
    manifest written before traitlens recorded the number of pairs of each split, only a gap is seen, not
    missing shards at the end."""
    from traitlens.pipeline import read_spilled

    shards_dir = Path(out_dir) / "shards"
    folders = _done_folders(shards_dir, split)
    count = _shard_count(shards_dir, split)
    if count is None:
        count = _shard_index(folders[-1]) + 1 if folders else 0
    if not count:
        raise FileNotFoundError(f"no {split} shards in {shards_dir}; run with spill=True")
    missing = next((k for k, folder in enumerate(folders) if _shard_index(folder) != k), len(folders))
    if missing < count:
        raise FileNotFoundError(
            f"shard {Shard(split, missing, 0, 0).name} is missing from {shards_dir}: the job that computed "
            "the shards did not finish; run it again to finish it"
        )
    folders = folders[:count]
    if not any(folders[0].glob("batch_*.safetensors")):
        raise FileNotFoundError(f"the shards in {folders[0].parent} hold no activations; run with spill=True")
    return read_spilled(folders, layer_index)


# --------------------------------------------------------------------------------------------------------
# The worker


class _ShardWorker:
    """A Ray actor: loads the model once, then computes shards (see ``_run_shard``)."""

    def __init__(self, model: str | None, model_kwargs: dict):
        from traitlens.models import load_model

        kwargs = dict(model_kwargs)
        if torch.cuda.is_available() and "device_map" not in kwargs:
            kwargs.setdefault("device", "cuda")
        self.model, self.tokenizer = load_model(model, **kwargs)

    def describe(self) -> dict:
        """What the driver checks before any shard runs: the number of decoder layers, and the weights."""
        from traitlens.hooks import decoder_layer_paths

        return {"layers": len(decoder_layer_paths(self.model)), "weights": _fingerprint(self.model)}

    def run(
        self, shard: Shard, pairs: list[Pair], settings: dict, batch_size: int, out_dir: str
    ) -> ShardDone:
        return _run_shard(self.model, self.tokenizer, shard, pairs, settings, batch_size, Path(out_dir))


def _run_shard(model, tokenizer, shard, pairs, settings, batch_size, out_dir: Path) -> ShardDone:
    """Compute one shard into a temporary folder and rename it into place; idempotent."""
    from traitlens.pipeline import stream_statistics
    from traitlens.vector import save_tensors

    start = time.perf_counter()
    shards = out_dir / "shards"
    final = shards / shard.name
    if not (final / STATS).is_file():
        tmp = shards / f".{shard.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            stats = stream_statistics(
                model, tokenizer, pairs, layers=settings["layers"], position=settings["position"],
                batch_size=batch_size, outer=settings["outer"], spill_to=tmp if settings["spill"] else None,
            )  # fmt: skip
            save_tensors(stats.state_dict(), tmp / STATS)
            tmp.rename(final)  # atomic; fails if another run of this shard got there first
        except OSError:
            if not (final / STATS).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ShardDone(shard.name, len(pairs), time.perf_counter() - start, socket.gethostname(), os.getpid())


# --------------------------------------------------------------------------------------------------------
# The driver


def _run(
    pairs: Mapping[str, list[Pair]],
    cluster: RayCluster,
    settings: dict,
    batch_size: int,
    progress: bool,
    on_shard: Callable[[ShardDone], None] | None,
    expect: dict | None = None,
) -> dict[str, ContrastiveStats]:
    """Run every shard not done yet on the cluster, then merge each split's shard files in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from traitlens.pipeline import check_one_row_per_example

    check_one_row_per_example(settings["position"], "sharded extraction")
    if cluster.out_dir is None:
        with _out_dir(cluster) as temporary:
            return _run(pairs, temporary, settings, batch_size, progress, on_shard, expect)
    ray = require_ray()
    # a relative out_dir is the driver's: each worker would resolve it against its own working directory
    cluster = replace(cluster, out_dir=Path(cluster.out_dir).absolute())
    shards_dir = cluster.out_dir / "shards"
    manifest = {
        **settings, "data": _data_hash(pairs), "shard_size": cluster.shard_size,
        "split_sizes": {split: len(rows) for split, rows in pairs.items()},
    }  # fmt: skip
    recorded = _check_manifest(shards_dir, manifest)
    jobs = [
        Shard(split, k, start, min(start + cluster.shard_size, len(rows)))
        for split, rows in pairs.items()
        for k, start in enumerate(range(0, len(rows), cluster.shard_size))
    ]
    todo = deque(job for job in jobs if not (shards_dir / job.name / STATS).is_file())
    for job in todo:  # a folder without its statistics (a partial copy, a deleted file) is not a done shard
        shutil.rmtree(shards_dir / job.name, ignore_errors=True)

    def check(loaded: dict) -> None:
        """The first worker's model, before any shard runs: its depth against ``layers``, its weights against
        the driver model's and those of the shards already done."""
        from traitlens.pipeline import _check_layers

        if settings["layers"] is not None:
            _check_layers(settings["layers"], loaded["layers"])
        _check_fingerprint(loaded["weights"], expect, cluster)
        _check_recorded_weights(shards_dir, manifest, recorded, loaded["weights"], cluster)

    started = False
    if todo:
        started = not ray.is_initialized()
        if started:
            ray.init(address=cluster.address)
        try:
            _compute(ray, todo, len(jobs), pairs, cluster, settings, batch_size, progress, on_shard, check)
        finally:
            if started:
                ray.shutdown()
    missing = [job.name for job in jobs if not (shards_dir / job.name / STATS).is_file()]
    if missing:
        raise RuntimeError(
            f"the workers finished but {len(missing)} shards are missing from {shards_dir} "
            f"({missing[0]}, ...): out_dir must be a folder that every node of the cluster sees at the same path"
        )
    for stale in shards_dir.glob(".*.tmp-*"):  # left by workers that died mid-shard
        shutil.rmtree(stale, ignore_errors=True)
    stats = {}
    for split in pairs:  # one shard file in memory at a time, merged in shard order
        for job in (job for job in jobs if job.split == split):
            part = _load_stats(shards_dir / job.name)
            stats[split] = part if split not in stats else stats[split].merge(part)
    return stats


def _compute(ray, todo, total, pairs, cluster, settings, batch_size, progress, on_shard, check) -> None:
    """Keep every worker busy with one shard at a time until ``todo`` is empty, once ``check`` has passed
    what the first worker loaded (``_ShardWorker.describe``)."""
    from ray.exceptions import RayActorError

    gpus = cluster.gpus_per_worker
    resources = ray.cluster_resources()
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    workers = min(cluster.workers, len(todo))
    for name, each in (("CPU", cluster.cpus_per_worker), ("GPU", gpus)):
        if workers * each > resources.get(name, 0):
            raise ValueError(
                f"{workers} workers x {each} {name} need {workers * each:g} {name}s, but the Ray cluster has "
                f"{resources.get(name, 0):g}; use fewer workers or smaller cpus_per_worker / gpus_per_worker"
            )
    actor_class = ray.remote(_ShardWorker).options(
        num_cpus=cluster.cpus_per_worker, num_gpus=gpus,
        max_restarts=cluster.retries, max_task_retries=cluster.retries,
    )  # fmt: skip
    actors = [actor_class.remote(cluster.model, cluster.model_kwargs) for _ in range(workers)]
    bar = _bar(total, total - len(todo), progress, workers)
    try:
        try:
            loaded = ray.get(actors[0].describe.remote())
        except RayActorError as err:
            raise _could_not_load(err, cluster) from None
        check(loaded)
        out_dir = str(cluster.out_dir)
        running = {}

        def submit(actor) -> None:
            if todo:
                shard = todo.popleft()
                rows = pairs[shard.split][shard.start : shard.stop]
                running[actor.run.remote(shard, rows, settings, batch_size, out_dir)] = (shard, actor)

        for actor in actors:
            submit(actor)
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            shard, actor = running.pop(ready)
            try:
                done = ray.get(ready)
            except RayActorError as err:
                if "creation task" in str(err):  # this worker's node could not load the model: no retry helps
                    raise _could_not_load(err, cluster) from None
                raise RuntimeError(
                    f"shard {shard.name} failed: its worker died and was restarted up to {cluster.retries} "
                    f"times ({err}). "
                    f"The shards done so far are kept in {cluster.out_dir}; run again to resume"
                ) from None
            if bar is not None:
                bar.update(1)
            if on_shard is not None:
                on_shard(done)
            submit(actor)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _could_not_load(err: Exception, cluster: RayCluster) -> RuntimeError:
    """The error for a worker that died making itself (loading the model): the last line of Ray's message
    is the worker's own error."""
    return RuntimeError(
        f"the Ray workers could not load {cluster.model!r} with model_kwargs="
        f"{_as_json(cluster.model_kwargs)}: {str(err).strip().splitlines()[-1]}"
    )


def require_ray():
    """The ``ray`` module, or an ``ImportError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


def _settings(layers, position, outer, spill, cluster: RayCluster) -> dict:
    from traitlens._validation import check_choice
    from traitlens.pipeline import _check_layers
    from traitlens.positions import POSITION_RULES

    check_choice(position, "position", POSITION_RULES)
    layers = _check_layers(layers, None)  # against the model's depth once a worker has loaded it
    model_kwargs = _as_json(cluster.model_kwargs)
    if isinstance(model_kwargs.get("dtype"), str):  # torch.bfloat16, "bfloat16", "torch.bfloat16": the same
        model_kwargs["dtype"] = dtype_name(model_kwargs["dtype"])
    return {
        "model": cluster.model, "model_kwargs": model_kwargs, "layers": layers, "position": position,
        "outer": outer, "spill": spill,
    }  # fmt: skip


def _as_json(value):
    """``value`` in a form that JSON keeps as it is (for the manifest): dtypes by name (``"bfloat16"``),
    configs with ``to_dict()`` (quantization) as their dict, tuples as lists, other objects by ``repr``."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _data_hash(pairs: Mapping[str, list[Pair]]) -> str:
    digest = hashlib.sha256()
    for split, rows in pairs.items():
        digest.update(split.encode())
        for pair in rows:
            digest.update(repr((pair.pos_example, pair.neg_example)).encode())
    return digest.hexdigest()


def _check_manifest(shards_dir: Path, manifest: dict) -> dict | None:
    """Write the job's manifest, or check that the shards already done there were computed the same way and
    return the weights recorded with them (``None`` when none are). With no shard done yet (a job that
    failed before its first), the manifest there is replaced."""
    path = shards_dir / "manifest.json"
    if path.is_file() and any(shards_dir.glob(f"[!.]*/{STATS}")):  # not the temporary folders
        found = json.loads(path.read_text())
        weights = found.pop("weights", None)  # compared with the first worker's once it has loaded
        # recorded since 2026-11-27; older manifests match on the data hash, which covers them
        found.setdefault("split_sizes", manifest["split_sizes"])
        if "model_kwargs" not in found:  # written before traitlens recorded them (2026-11-27)
            warnings.warn(
                f"{path} predates recorded model_kwargs: resuming it with model_kwargs="
                f"{manifest.get('model_kwargs')!r}, which cannot be checked against the shards already done",
                stacklevel=4,
            )
            found["model_kwargs"] = manifest.get("model_kwargs")
        differ = sorted(k for k in manifest.keys() | found.keys() if found.get(k) != manifest.get(k))
        if differ:
            shown = [
                f"the pairs differ (data hash {str(found.get('data'))[:12]}, now {manifest['data'][:12]})"
                if k == "data"
                else f"{k}={found.get(k)!r} (now {manifest.get(k)!r})"
                for k in differ
            ]
            raise ValueError(
                f"{shards_dir} holds shards of another job ({'; '.join(shown)}); "
                "use another out_dir, or delete that folder to start over"
            )
        return weights
    _write_manifest(shards_dir, manifest)
    return None


def _check_recorded_weights(
    shards_dir: Path, manifest: dict, recorded: dict | None, weights: dict | None, cluster: RayCluster
) -> None:
    """Record the first worker's ``weights`` in the manifest, or check them against those ``recorded`` there
    with the shards already done (a manifest written before traitlens recorded weights has none: no check)."""
    if weights is None:  # not in memory (meta device): nothing to record or compare
        return
    if recorded is None:
        _write_manifest(shards_dir, {**manifest, "weights": weights})
        return
    difference = _weights_difference(weights, recorded, "in the workers now", "in the manifest")
    if difference:
        raise ValueError(
            f"{shards_dir} holds shards computed with other weights than those the workers loaded now from "
            f"{cluster.model!r} ({difference}): the checkpoint changed since; load the one the shards were "
            "computed with, or use another out_dir, or delete that folder to start over"
        )


def _write_manifest(shards_dir: Path, manifest: dict) -> None:
    shards_dir.mkdir(parents=True, exist_ok=True)
    tmp = shards_dir / f".manifest.json.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(shards_dir / "manifest.json")


def _done_folders(shards_dir: Path, split: str) -> list[Path]:
    """The done shard folders of ``split`` (those holding their statistics), in shard order: ``train-100000``
    after ``train-99999``."""
    return sorted((p for p in shards_dir.glob(f"{split}-*") if (p / STATS).is_file()), key=_shard_index)


def _shard_index(folder: Path) -> int:
    return int(folder.name.rpartition("-")[2])


def _shard_count(shards_dir: Path, split: str) -> int | None:
    """How many shards ``split`` has, by the manifest (``None`` when it does not record the split sizes)."""
    path = shards_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if "split_sizes" not in manifest:
        return None
    return math.ceil(manifest["split_sizes"].get(split, 0) / manifest["shard_size"])


def _load_stats(folder: Path) -> ContrastiveStats:
    from safetensors.torch import load_file

    return ContrastiveStats.from_state_dict(load_file(folder / STATS))


def _name_to_load(model: torch.nn.Module) -> str | None:
    """What ``load_model`` should load in the workers for the driver's ``model``."""
    from traitlens.models import BUNDLED, BUNDLED_ID

    name = str(getattr(model.config, "_name_or_path", "") or "")
    if name == BUNDLED_ID:
        return BUNDLED  # checked against the driver's weights by fingerprint before any shard runs
    if not name:
        raise ValueError(
            f"cannot tell which model the workers should load for a {type(model).__name__} without "
            "config._name_or_path; set RayCluster(model=...)"
        )
    return name


def _fingerprint(model: torch.nn.Module) -> dict | None:
    """``{"dtype": ..., "sums": {name: [sum, sum of magnitudes]}}``: the model's dtype and, per named
    parameter, the sums of its values and of their magnitudes, accumulated in float64 (``None`` when weights
    are on the meta device, not in memory). Equal for equal weights in equal dtypes, wherever they were
    loaded, up to the order of the summation (see ``_weights_difference``)."""
    params = dict(model.named_parameters())
    if any(param.device.type == "meta" for param in params.values()):
        return None
    sums = {name: _float64_sums(param) for name, param in params.items()}
    return {"dtype": _as_json(model_dtype(model)), "sums": sums}


def _float64_sums(param: torch.Tensor) -> list[float]:
    """``[sum of values, sum of magnitudes]`` of ``param`` in float64, chunk by chunk (2**20 values), read to
    the host once: ``torch.sum(x, dtype=float64)`` copies all of ``x`` into float64 first (on CPU), and
    ``x.abs()`` would copy it once more; for an embedding matrix either is gigabytes."""
    chunks = param.detach().reshape(-1).split(1 << 20)
    parts = [
        torch.stack((torch.sum(c, dtype=torch.float64), torch.sum(c.abs(), dtype=torch.float64)))
        for c in chunks
    ]
    return torch.stack(parts).sum(0).tolist()


def _weights_difference(got: dict, expect: dict, got_where: str, expect_where: str) -> str | None:
    """Where two fingerprints first differ, in words (``None`` where they agree): the dtype, a parameter one
    of them lacks, or a sum further apart than 1e-9 of the sum of magnitudes. The order of a float64
    summation differs across devices; its rounding error is bounded by ~1e-10 of the sum of magnitudes for
    chunks of 2**20 values, while a sum of values near zero (a centred weight matrix) leaves a relative
    tolerance nothing to stand on."""
    if got["dtype"] != expect["dtype"]:
        return f"dtype {got['dtype']} {got_where}, {expect['dtype']} {expect_where}"
    sums, expected = got["sums"], expect["sums"]
    for name in [*expected, *(name for name in sums if name not in expected)]:
        if name not in sums or name not in expected:
            return f"parameter {name} only {expect_where if name not in sums else got_where}"
        (total, size), (expected_total, expected_size) = sums[name], expected[name]
        if any(
            abs(a - b) > 1e-9 * max(size, expected_size)
            for a, b in ((total, expected_total), (size, expected_size))
        ):
            return f"first at {name}: sum {total:.10g} {got_where}, {expected_total:.10g} {expect_where}"
    return None


def _check_fingerprint(got: dict | None, expect: dict | None, cluster: RayCluster) -> None:
    if got is None or expect is None:
        return
    difference = _weights_difference(got, expect, "in the workers", "in the driver's model")
    if difference:
        raise ValueError(
            f"the workers loaded {cluster.model!r} with model_kwargs={_as_json(cluster.model_kwargs)} but "
            f"their weights differ from the driver's model ({difference}); the workers must load the same "
            "model in the same dtype: set RayCluster(model=...) to what the driver loaded and model_kwargs "
            "to how (dtype, revision, quantization); save a model changed in memory and load that folder"
        )


@contextmanager
def _out_dir(cluster: RayCluster) -> Iterator[RayCluster]:
    """``cluster`` itself when it has an ``out_dir``, else a copy with a temporary one, deleted on exit."""
    if cluster.out_dir is not None:
        yield cluster
        return
    tmp = tempfile.mkdtemp(prefix="traitlens-shards-")
    try:
        yield replace(cluster, out_dir=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bar(total: int, done: int, progress: bool, workers: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc=f"shards ({workers} Ray workers)", unit="shard")
