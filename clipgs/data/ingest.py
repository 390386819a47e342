"""Ingestion: assets -> triplets (gaussians, views, text) with teacher embeddings -> shards.

Resumable and whole-or-nothing: objects are assigned to shards deterministically; each shard is
written whole, then its record (``<shard>.json``: count, checksum, keys, rejects, the plan it
was made from); a re-run skips every shard whose record matches its plan. The manifest is
written last, so a dataset without one is unfinished. A bad object is reported in
``rejects.jsonl`` and skipped, never the end of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from clipgs.config import IngestConfig
from clipgs.data import shards, storage
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


def _plan_hash(config: IngestConfig, teacher_sha: str, keys: list[str]) -> str:
    spec = {"config": config.model_dump(mode="json", exclude={"limit"}), "teacher": teacher_sha,
            "keys": keys, "format_version": shards.FORMAT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def make_triplet(asset: Asset, config: IngestConfig, image_size: int):
    """One asset -> (gaussians [M,14], views uint8 [K,S,S,3]); raises on a bad object."""
    cloud = asset.load()
    rng = np.random.default_rng(zlib.crc32(asset.key.encode()) + config.seed)
    points = resample(cloud.activated(), config.points, rng)
    views = [load_image(storage.read_bytes(u), image_size) for u in asset.image_urls]
    views = views[: config.views]
    if len(views) < config.views:
        views += render_views(points, config.views - len(views), image_size)
    return points, np.stack(views)


def _write_shard(name: str, assets: list[Asset], config: IngestConfig, teacher: Teacher,
                 progress: tqdm) -> dict:
    done, rejects = [], []
    for asset in assets:
        try:
            done.append((asset, *make_triplet(asset, config, teacher.image_size)))
        except Exception as exc:  # one bad object never ends the batch: report it and go on
            rejects.append({"key": asset.key, "source": asset.source,
                            "error": f"{type(exc).__name__}: {exc}"})
            log.warning("rejected %s: %s", asset.source, exc)
        progress.update(1)
        progress.set_postfix(rejects=progress.rejects + len(rejects), refresh=False)
    samples = []
    if done:
        img = teacher.encode_images(np.concatenate([d[2] for d in done]))
        img = img.reshape(len(done), config.views, -1)
        txt = teacher.encode_text([d[0].caption for d in done])
        for i, (asset, points, views) in enumerate(done):
            meta = {"caption": asset.caption, "label": asset.label, "split": asset.split,
                    "source": asset.source}
            samples.append(shards.encode_sample(asset.key, points, views, img[i], txt[i], meta))
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

    plan: list[tuple[str, str, list[Asset]]] = []
    for split in ("train", "test"):
        items = [a for a in assets if a.split == split]
        for i in range(0, len(items), config.shard_size):
            plan.append((split, f"{split}-{i // config.shard_size:05d}.tar",
                         items[i:i + config.shard_size]))

    records: dict[str, dict] = {}
    written = skipped = 0
    progress = tqdm(total=len(assets), desc="ingest", unit="obj", mininterval=2.0)
    progress.rejects = 0
    start = time.time()
    for split, name, items in plan:
        plan_hash = _plan_hash(config, identity["sha256"], [a.key for a in items])
        record_url = storage.join(output, name + ".json")
        if storage.exists(record_url) and storage.exists(storage.join(output, name)):
            record = json.loads(storage.read_bytes(record_url))
            if record.get("plan") == plan_hash:
                records[name] = record
                skipped += 1
                progress.update(len(items))
                progress.rejects += len(record["rejects"])
                continue
        record = _write_shard(name, items, config, teacher, progress)
        data = record.pop("_data")
        record.update(split=split, plan=plan_hash)
        storage.write_bytes(storage.join(output, name), data)  # the shard first, whole
        storage.write_bytes(record_url, json.dumps(record).encode())  # then its record
        progress.rejects += len(record["rejects"])
        records[name] = record
        written += 1
    progress.close()

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
        "embed_dim": int(teacher.encode_text(["x"]).shape[1]),
        "image_size": teacher.image_size,
        "classes": labels,
        "rejected": len(rejects),
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
