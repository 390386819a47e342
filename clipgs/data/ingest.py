"""Ingestion: assets -> triplets (gaussians, views, text) with teacher embeddings -> shards.

Resumable and whole-or-nothing: objects are assigned to shards deterministically; each shard is
written whole, then its record (``<shard>.json``: count, checksum, keys, rejects, the plan it
was made from); a re-run skips every shard whose record matches its plan. The manifest is
written last, so a dataset without one is unfinished. A bad object is reported in
``rejects.jsonl`` and skipped, never the end of the run.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from clipgs.config import IngestConfig
from clipgs.data import shards, storage
from clipgs.data.axes import format_up
from clipgs.data.gaussians import resample
from clipgs.data.sources import Asset, discover
from clipgs.data.views import load_image, render_views
from clipgs.models.teacher import Teacher

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    output: str
    manifest: dict
    written_shards: int
    skipped_shards: int
    rejects: list[dict]


def object_up(asset: Asset, config: IngestConfig) -> str:
    """The axis an object's views are rendered around: its sidecar's, else the ingest's (auto:
    its format's convention)."""
    if asset.up:
        return asset.up
    return format_up(asset.source) if config.up == "auto" else config.up


def _plan_hash(config: IngestConfig, teacher_sha: str, items: list[Asset]) -> str:
    # what changes a shard's content: not how many processes made it, nor how it was uploaded
    # (nor shard_mb: which objects a shard holds is in its keys)
    spec = {"config": config.model_dump(mode="json", exclude={"limit", "workers", "multipart_mb",
                                                              "shard_mb", "up"}),
            "teacher": teacher_sha,
            "keys": [a.key for a in items], "format_version": shards.FORMAT_VERSION}
    # the up axis of each object rendered around another than +z; a shard of +z objects keeps
    # the hash it had before the up axis existed (its views are the same)
    ups = {a.key: object_up(a, config) for a in items}
    ups = {k: u for k, u in ups.items() if u != "+z"}
    if ups:
        spec["up"] = ups
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


STAGES = ("read", "resample", "render", "teacher", "write")


class Stopwatch:
    """Seconds spent per stage, summed: where ingestion time goes (logged in the manifest)."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def add(self, seconds: dict[str, float]) -> None:
        for k, v in seconds.items():
            self.seconds[k] += v


def make_triplet(asset: Asset, config: IngestConfig, image_size: int,
                 clock: Stopwatch | None = None):
    """One asset -> (gaussians [M,14], views uint8 [K,S,S,3]); raises on a bad object."""
    clock = clock or Stopwatch()
    with clock("read"):
        cloud = asset.load()
        views = []
        for url in asset.image_urls:  # a broken thumbnail costs a rendered view, not the object
            try:
                views.append(load_image(storage.read_bytes(url), image_size))
            except Exception as exc:
                log.warning("%s: image not used (%s); rendering a view instead", url, exc)
    with clock("resample"):
        rng = np.random.default_rng(zlib.crc32(asset.key.encode()) + config.seed)
        points = resample(cloud.activated(), config.points, rng)
    views = views[: config.views]
    if len(views) < config.views:
        with clock("render"):
            views += render_views(points, config.views - len(views), image_size,
                                  up=object_up(asset, config))
    return points, np.stack(views)


def _safe_triplet(asset: Asset, config: IngestConfig, image_size: int):
    """(points, views, seconds) or (None, error line, seconds): one bad object never ends the
    batch, it is reported and skipped."""
    clock = Stopwatch()
    try:
        points, views = make_triplet(asset, config, image_size, clock)
        return points, views, clock.seconds
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}", clock.seconds


_WORK: tuple = ()  # (assets, config, image_size), inherited by forked workers


def _work(i: int):
    assets, config, image_size = _WORK
    return _safe_triplet(assets[i], config, image_size)


def _init_worker() -> None:
    torch.set_num_threads(1)  # many small ops; one thread per process is fastest


def triplets(assets: list[Asset], config: IngestConfig, image_size: int) -> Iterator[tuple]:
    """``_safe_triplet`` of each asset, in order; with ``config.workers`` processes they are
    made ahead of the consumer (the teacher) by forked workers."""
    if config.workers == 0 or len(assets) < 2:
        for a in assets:
            yield _safe_triplet(a, config, image_size)
        return
    global _WORK
    _WORK = (assets, config, image_size)
    workers = min(config.workers, len(assets))
    window = 4 * workers  # made ahead of the consumer, in order; memory stays bounded
    pool = _pool(workers)
    pending: collections.deque = collections.deque()
    ahead = 0
    try:
        while ahead < len(assets) or pending:
            while ahead < len(assets) and len(pending) < window:
                pending.append((ahead, pool.submit(_work, ahead)))
                ahead += 1
            try:
                result = pending[0][1].result()
            except BrokenProcessPool:
                # a worker died (the OOM killer, a crash in a native reader): multiprocessing's
                # Pool would wait for its lost task for ever. Each object that was in flight is
                # made again alone; the one that kills its worker again is rejected.
                pool.shutdown(wait=False, cancel_futures=True)
                for i, _ in pending:
                    yield _alone(i, assets[i])
                pending.clear()
                pool = _pool(workers)
                continue
            pending.popleft()
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        _WORK = ()


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork: assets hold closures (how to load each), which a spawned worker could not unpickle
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker)


def _alone(i: int, asset: Asset) -> tuple:
    """``_work(i)`` in a worker of its own; its death rejects this object only."""
    with _pool(1) as pool:
        try:
            return pool.submit(_work, i).result()
        except BrokenProcessPool:
            log.error("%s: the worker reading it died", asset.source)
            return None, ("WorkerDied: the process reading it died (killed by the system - out "
                          "of memory? - or crashed in a native reader)"), {}


class TextCache:
    """Captions repeat (a labelled set has one per class): each is encoded once per run."""

    def __init__(self, teacher: Teacher):
        self.teacher, self.cache = teacher, {}

    def __call__(self, captions: list[str]) -> np.ndarray:
        todo = sorted({c for c in captions if c not in self.cache})
        if todo:
            self.cache.update(zip(todo, self.teacher.encode_text(todo)))
        return np.stack([self.cache[c] for c in captions])


def _meta(asset: Asset) -> dict:
    return {"caption": asset.caption, "label": asset.label, "split": asset.split,
            "source": asset.source}


def plan_shards(items: list[Asset], config: IngestConfig,
                sizer: shards.SampleSizer) -> list[list[Asset]]:
    """Consecutive objects per shard: ``shard_size`` of them, or with ``shard_mb`` as many as
    fit in that many bytes (exact, from ``sizer``; a rejected object only makes its shard
    smaller). Decided before anything is made, so a re-run plans the same shards."""
    if config.shard_mb is None:
        return [items[i:i + config.shard_size] for i in range(0, len(items), config.shard_size)]
    limit = config.shard_mb * 1e6
    groups: list[list[Asset]] = []
    size = 0
    for asset in items:
        nbytes = sizer(_meta(asset))
        if groups and shards.tar_size(size + nbytes) <= limit:
            groups[-1].append(asset)
            size += nbytes
        else:
            if shards.tar_size(nbytes) > limit:
                log.warning("%s: %d bytes in a shard, more than shard_mb=%g; it gets a shard "
                            "of its own", asset.source, shards.tar_size(nbytes), config.shard_mb)
            groups.append([asset])
            size = nbytes
    return groups


def _write_shard(name: str, made: list[tuple[Asset, tuple]], config: IngestConfig,
                 teacher: Teacher, texts: TextCache, clock: Stopwatch) -> dict:
    done, rejects = [], []
    for asset, (points, views, _) in made:
        if points is None:
            rejects.append({"key": asset.key, "source": asset.source, "error": views})
            log.warning("rejected %s: %s", asset.source, views)
        else:
            done.append((asset, points, views))
    samples = []
    if done:
        with clock("teacher"):
            img = teacher.encode_images(np.concatenate([d[2] for d in done]))
            img = img.reshape(len(done), config.views, -1)
            txt = texts([d[0].caption for d in done])
        for i, (asset, points, views) in enumerate(done):
            samples.append(shards.encode_sample(asset.key, points, views, img[i], txt[i],
                                                _meta(asset)))
    with clock("write"):
        data = shards.tar_bytes(samples)
    return {"name": name, "count": len(samples), "bytes": len(data),
            "sha256": shards.sha256(data), "keys": [d[0].key for d in done],
            "rejects": rejects, "_data": data}


def ingest(source: str, output: str, config: IngestConfig | None = None,
           teacher: Teacher | None = None) -> IngestResult:
    config = config or IngestConfig()
    teacher = teacher or Teacher(config.teacher)
    identity = teacher.identity()
    assets = discover(source, limit=config.limit, mesh_samples=config.points)
    if not assets:
        raise storage.StorageError(f"{source}: no objects found (expected .ply, .splat or "
                                   ".npz files)")
    manifest_url = storage.join(output, shards.MANIFEST)
    if storage.exists(manifest_url):  # about to change: never leave it looking complete
        storage.remove(manifest_url)

    embed_dim = int(teacher.encode_text(["x"]).shape[1])
    sizer = shards.SampleSizer(config.points, config.views, teacher.image_size, embed_dim)
    plan: list[tuple[str, str, list[Asset]]] = []
    for split in ("train", "test"):
        groups = plan_shards([a for a in assets if a.split == split], config, sizer)
        plan += [(split, f"{split}-{n:05d}.tar", group) for n, group in enumerate(groups)]

    records: dict[str, dict] = {}
    todo = []
    for split, name, items in plan:  # finished shards (record matches the plan) are skipped
        plan_hash = _plan_hash(config, identity["sha256"], items)
        # and the same versions of their files: an object fixed or changed in place (same
        # key) redoes its shard; a record from before versions were kept is taken as is
        versions = {a.key: a.version for a in items}
        record_url = storage.join(output, name + ".json")
        if storage.exists(record_url) and storage.exists(storage.join(output, name)):
            record = json.loads(storage.read_bytes(record_url))
            if record.get("plan") == plan_hash and record.get("versions", versions) == versions:
                records[name] = record
                continue
        todo.append((split, name, items, plan_hash, record_url))
    skipped, written = len(records), 0
    clock, texts = Stopwatch(), TextCache(teacher)
    start = time.time()
    pending = [a for _, _, items, _, _ in todo for a in items]
    rejected = sum(len(r["rejects"]) for r in records.values())
    stream = triplets(pending, config, teacher.image_size)
    # closed on the way out of a failed write too: the workers and the progress bar must not
    # outlive it while something (a retrying flow, a traceback) still holds this frame
    with tqdm(total=len(assets), initial=len(assets) - len(pending), desc="ingest", unit="obj",
              mininterval=2.0, smoothing=0.1) as progress, contextlib.closing(stream):
        for split, name, items, plan_hash, record_url in todo:
            made = []
            for asset in items:
                made.append((asset, next(stream)))
                clock.add(made[-1][1][2])
                rejected += made[-1][1][0] is None
                progress.update(1)
                progress.set_postfix(rejects=rejected, refresh=False)
            record = _write_shard(name, made, config, teacher, texts, clock)
            data = record.pop("_data")
            record.update(split=split, plan=plan_hash,
                          versions={a.key: a.version for a in items})
            with clock("write"):
                storage.write_bytes(storage.join(output, name), data, config.multipart_mb)  # whole
                storage.write_bytes(record_url, json.dumps(record).encode())  # then its record
            records[name] = record
            written += 1

    rejects = [r for rec in records.values() for r in rec["rejects"]]
    storage.write_bytes(storage.join(output, shards.REJECTS),
                        "".join(json.dumps(r) + "\n" for r in rejects).encode())
    labels = sorted({a.label for a in assets if a.label})
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "created": shards.timestamp(),
        "source": source,
        "config": config.model_dump(mode="json"),
        "teacher": identity,
        "embed_dim": embed_dim,
        "image_size": teacher.image_size,
        "classes": labels,
        "rejected": len(rejects),
        # this run's seconds per stage (objects from finished shards were not redone)
        "seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
        "splits": {
            split: {
                "count": sum(r["count"] for r in records.values() if r["split"] == split),
                "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256")}
                           for n, r in sorted(records.items()) if r["split"] == split],
            } for split in ("train", "test")
        },
    }
    storage.write_bytes(manifest_url, json.dumps(manifest, indent=1).encode())  # last
    log.info("ingested %d objects (%d rejected) into %s in %.1fs: %d shards written, %d "
             "already done", len(assets) - len(rejects), len(rejects), output,
             time.time() - start, written, skipped)
    return IngestResult(output, manifest, written, skipped, rejects)
