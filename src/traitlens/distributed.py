"""Sharded extraction on a Ray cluster: the same statistics and activations as one process, from many.

The pairs of each split are cut into fixed shards of ``shard_size`` pairs (shard ``train-00003`` holds
train pairs ``3 * shard_size .. 4 * shard_size - 1``). A pool of Ray actors, each holding the model on its
GPU (or CPU), runs ``stream_statistics`` on one shard at a time and writes the result into the shared output
folder ``out_dir/shards/<split>-<k>/``: ``stats.safetensors`` (the shard's ``ContrastiveStats``, float64
moments) and, with ``spill=True``, its activations ``batch_*.safetensors`` (``pos`` / ``neg``,
``[layer, n, hidden]``, and the pair ``index`` of each row: the format of
``stream_statistics(spill_to=...)``).

Exactly once, whatever fails:

- a shard is written into a temporary folder and renamed into place when complete, so a shard folder
  exists if and only if the shard is done; a rerun of an interrupted job skips the done shards (resume);
- a worker that dies is restarted by Ray and its shard is run again (``retries`` times); a second run of a
  shard finds the folder in place and keeps the first result, so nothing is counted twice;
- the driver merges the shard files, never in-flight results, in shard order, so the float64 sums (and the
  vectors) do not depend on which worker ran what, or when.

``out_dir/shards/manifest.json`` records what the shards were computed with (model, ``model_kwargs``,
layers, position, shard size, data hash); a rerun with other settings is refused instead of mixing shards.

Ray is an optional dependency (``pip install 'traitlens[ray]'``); it is imported only when a function here
runs. On a multi-node cluster ``out_dir`` must be a folder that every node sees at the same path (NFS or
similar), and every node needs traitlens and the model; see ``docs/distributed.md``.
"""

from __future__ import annotations

import hashlib
import json
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
from traitlens.stats import ContrastiveStats

RAY_MISSING = "the ray backend needs Ray: pip install 'traitlens[ray]'"


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
        out_dir: the shared output folder (shards, activations, manifest). ``None``: a temporary folder on
            the driver, deleted afterwards (fine for a local instance; no resume).
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
    with the driver's before any shard runs.
    """
    cluster = cluster or RayCluster()
    for split in SPLITS:
        if not dataset.split(split):
            raise ValueError(f"dataset {dataset.name!r} has no {split!r} examples; every split is needed")
    if cluster.model is None:
        cluster = replace(cluster, model=_name_to_load(model))
    if not {"dtype", "torch_dtype"} & cluster.model_kwargs.keys():
        # load_model's default (float32 for the bundled model) need not be the driver's: a bf16 driver model
        # would fail the weight check against float32 workers
        cluster = replace(cluster, model_kwargs={**cluster.model_kwargs, "dtype": _dtype_of(model)})
    settings = _settings(list(layers), position, False, True, cluster)
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
    each ``[layer, n, hidden]``, or ``[n, hidden]`` of one layer (its index among the extracted layers)."""
    from traitlens.pipeline import read_spilled

    folders = _done_folders(Path(out_dir) / "shards", split)
    if not folders:
        raise FileNotFoundError(f"no {split} shards in {Path(out_dir) / 'shards'}; run with spill=True")
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

    def fingerprint(self) -> tuple[str, float, float] | None:
        return _fingerprint(self.model)

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
    if not final.is_dir():
        tmp = shards / f".{shard.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            stats = stream_statistics(
                model, tokenizer, pairs, layers=settings["layers"], position=settings["position"],
                batch_size=batch_size, outer=settings["outer"], spill_to=tmp if settings["spill"] else None,
            )  # fmt: skip
            save_tensors(stats.state_dict(), tmp / "stats.safetensors")
            tmp.rename(final)  # atomic; fails if another run of this shard got there first
        except OSError:
            if not final.is_dir():
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
    expect: tuple[str, float, float] | None = None,
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
    shards_dir = Path(cluster.out_dir) / "shards"
    _check_manifest(shards_dir, {**settings, "data": _data_hash(pairs), "shard_size": cluster.shard_size})
    jobs = [
        Shard(split, k, start, min(start + cluster.shard_size, len(rows)))
        for split, rows in pairs.items()
        for k, start in enumerate(range(0, len(rows), cluster.shard_size))
    ]
    todo = deque(job for job in jobs if not (shards_dir / job.name).is_dir())
    started = False
    if todo:
        started = not ray.is_initialized()
        if started:
            ray.init(address=cluster.address)
        try:
            _compute(ray, todo, len(jobs), pairs, cluster, settings, batch_size, progress, on_shard, expect)
        finally:
            if started:
                ray.shutdown()
    missing = [job.name for job in jobs if not (shards_dir / job.name).is_dir()]
    if missing:
        raise RuntimeError(
            f"the workers finished but {len(missing)} shard folders are missing from {shards_dir} "
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


def _compute(ray, todo, total, pairs, cluster, settings, batch_size, progress, on_shard, expect) -> None:
    """Keep every worker busy with one shard at a time until ``todo`` is empty."""
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
        if expect is not None:
            _check_fingerprint(ray.get(actors[0].fingerprint.remote()), expect, cluster)
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


def require_ray():
    """The ``ray`` module, or an ``ImportError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


def _settings(layers, position, outer, spill, cluster: RayCluster) -> dict:
    from traitlens._validation import check_choice
    from traitlens.positions import POSITION_RULES

    check_choice(position, "position", POSITION_RULES)
    if layers is not None:
        layers = sorted(set(int(layer) for layer in layers))
    model_kwargs = _as_json(cluster.model_kwargs)
    if isinstance(model_kwargs.get("dtype"), str):  # torch.bfloat16, "bfloat16", "torch.bfloat16": the same
        model_kwargs["dtype"] = model_kwargs["dtype"].removeprefix("torch.")
    return {
        "model": cluster.model, "model_kwargs": model_kwargs, "layers": layers, "position": position,
        "outer": outer, "spill": spill,
    }  # fmt: skip


def _as_json(value):
    """``value`` in a form that JSON keeps as it is (for the manifest): dtypes by name (``"bfloat16"``),
    configs with ``to_dict()`` (quantization) as their dict, tuples as lists, other objects by ``repr``."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
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


def _check_manifest(shards_dir: Path, manifest: dict) -> None:
    """Write the job's manifest, or check that the shards already there were computed the same way."""
    path = shards_dir / "manifest.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if "model_kwargs" not in found:  # written before traitlens recorded them (2026-11-27)
            warnings.warn(
                f"{path} predates recorded model_kwargs: resuming it with model_kwargs="
                f"{manifest.get('model_kwargs')!r}, which cannot be checked against the shards already done",
                stacklevel=4,
            )
            found["model_kwargs"] = manifest.get("model_kwargs")
        differ = sorted(k for k in manifest.keys() | found.keys() if found.get(k) != manifest.get(k))
        if differ:
            shown = [f"{k}={found.get(k)!r} (now {manifest.get(k)!r})" for k in differ if k != "data"]
            raise ValueError(
                f"{shards_dir} holds shards of another job ({', '.join(differ)} differ: {', '.join(shown)}); "
                "use another out_dir, or delete that folder to start over"
            )
        return
    shards_dir.mkdir(parents=True, exist_ok=True)
    tmp = shards_dir / f".manifest.json.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def _done_folders(shards_dir: Path, split: str) -> list[Path]:
    return sorted(p for p in shards_dir.glob(f"{split}-*") if p.is_dir())


def _load_stats(folder: Path) -> ContrastiveStats:
    from safetensors.torch import load_file

    return ContrastiveStats.from_state_dict(load_file(folder / "stats.safetensors"))


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


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``load_model`` should give the workers' copy of the driver's ``model``."""
    dtype = getattr(model, "dtype", None)  # transformers models: the dtype of their floating weights
    return dtype if isinstance(dtype, torch.dtype) else model.get_input_embeddings().weight.dtype


def _fingerprint(model: torch.nn.Module) -> tuple[str, float, float] | None:
    """The input embeddings' dtype, and their sum and sum of squares in float64 (``None`` when they are not
    in memory). Equal for equal weights in equal dtypes, wherever they were loaded."""
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":
        return None
    w = weight.detach().double()
    return _as_json(weight.dtype), float(w.sum()), float(w.square().sum())


def _check_fingerprint(got, expect, cluster: RayCluster) -> None:
    if got is None or expect is None:
        return
    (got_dtype, *got_sums), (dtype, *sums) = got, expect
    close = all(abs(g - e) <= 1e-6 * max(abs(e), 1.0) for g, e in zip(got_sums, sums, strict=True))
    if got_dtype != dtype or not close:
        raise ValueError(
            f"the workers loaded {cluster.model!r} with model_kwargs={_as_json(cluster.model_kwargs)} but "
            f"their weights differ from the driver's model (input embeddings: {got_dtype}, sums "
            f"{tuple(got_sums)}; the driver's: {dtype}, sums {tuple(sums)}); the workers must load the same "
            "model in the same dtype: set RayCluster(model=...) to what the driver loaded and model_kwargs "
            "to how (dtype, revision, quantization)"
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
