import json

import numpy as np
import pytest

from clipgs.config import IngestConfig
from clipgs.data import shards, storage
from clipgs.data.ingest import ingest
from clipgs.data.sources import discover, voxels_to_gaussians
from clipgs.data.views import render, ring_cameras


def test_discover_real_data(shared_data):
    assets = {a.key: a for a in discover(str(shared_data), limit=5)}
    boat = assets["splats_boat"]
    assert boat.caption.startswith("a 3D model of a boat") and "ship" in boat.caption
    assert boat.image_urls and boat.image_urls[0].endswith("thumb.png")
    grids = [a for a in assets.values() if a.source.endswith(tuple(f"/{i}" for i in range(5000)))]
    assert {a.split for a in grids} == {"train", "test"} and len(grids) == 10
    assert all(a.caption.startswith("a 3D model of a ") and a.label for a in grids)
    assert "gaussians_donut" in assets


def test_voxels_to_gaussians_surface_only():
    grid = np.zeros((8, 8, 8), int)
    grid[2:6, 2:6, 2:6] = 1
    cloud = voxels_to_gaussians(grid)
    assert len(cloud) == 64 - 8  # a 4^3 cube minus its 2^3 interior


def test_rendered_silhouette_matches_projected_points():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(3000, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True) * 2  # sphere of radius 0.5
    pts = np.zeros((3000, 14), np.float32)
    pts[:, :3], pts[:, 3:6], pts[:, 6], pts[:, 7:10], pts[:, 10] = xyz, 0.0, 0.95, 0.02, 1.0
    size = 64
    image = render(pts, ring_cameras(1)[0], size).numpy()
    drawn = image.mean(axis=2) < 0.5
    cam = xyz @ ring_cameras(1)[0].numpy().T
    u = ((cam[:, 0] * 0.95 + 1) * size / 2).astype(int)
    v = ((1 - cam[:, 2] * 0.95) * size / 2).astype(int)
    projected = np.zeros_like(drawn)
    projected[v, u] = True
    iou = (drawn & projected).sum() / (drawn | projected).sum()
    assert iou > 0.85, iou


def test_ingest_resumes_and_reports_bad_objects(shared_data, tmp_path, teacher):
    src = tmp_path / "src"
    for name in ("cat", "cube", "fish"):
        (src / name).mkdir(parents=True)
        for f in (shared_data / "splats" / name).iterdir():
            (src / name / f.name).write_bytes(f.read_bytes())
    (src / "broken").mkdir()
    (src / "broken" / "broken.splat").write_bytes(b"\0" * 33)
    out = tmp_path / "shards"
    config = IngestConfig(shard_size=2, points=512, views=2)
    first = ingest(str(src), str(out), config, teacher=teacher)
    assert first.manifest["rejected"] == 1 and first.rejects[0]["key"] == "broken"
    assert "not a multiple of 32" in first.rejects[0]["error"]
    report = (out / shards.REJECTS).read_text().splitlines()
    assert json.loads(report[0])["source"].endswith("broken.splat")
    total = sum(first.manifest["splits"][s]["count"] for s in ("train", "test"))
    assert total == 3
    second = ingest(str(src), str(out), config, teacher=teacher)
    assert second.written_shards == 0 and second.skipped_shards == first.written_shards
    samples = list(shards.iterate([str(p) for p in sorted(out.glob("*.tar"))]))
    assert len(samples) == 3
    s = samples[0]
    assert s["gaussians"].shape == (512, 14) and s["img_emb"].shape[0] == 2
    assert s["img_emb"].dtype == np.float16 and s["views"].shape[0] == 2
    # a shard whose plan (config) changed is redone
    third = ingest(str(src), str(out), IngestConfig(shard_size=2, points=256, views=2),
                   teacher=teacher)
    assert third.written_shards == first.written_shards


def test_teacher_is_deterministic_and_semantic(teacher):
    from clipgs.models.teacher import Teacher

    again = Teacher()
    assert again.identity()["sha256"] == teacher.identity()["sha256"]
    e = teacher.encode_text(["a 3D model of a chair", "a 3D model of a sofa",
                             "a 3D model of a toilet"])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
    img = teacher.encode_images(np.zeros((2, teacher.image_size, teacher.image_size, 3), np.uint8))
    assert img.shape == (2, e.shape[1]) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)


def test_ingest_from_and_to_s3(shared_data, s3_server, teacher):
    for name in ("torus", "ring"):
        for f in (shared_data / "splats" / name).iterdir():
            storage.write_bytes(f"{s3_server}/assets/{name}/{f.name}", f.read_bytes())
    config = IngestConfig(shard_size=4, points=256, views=2)
    result = ingest(f"{s3_server}/assets", f"{s3_server}/shards", config, teacher=teacher)
    manifest = shards.read_manifest(f"{s3_server}/shards")
    assert manifest == result.manifest
    urls = shards.shard_urls(f"{s3_server}/shards", manifest, "train") + shards.shard_urls(
        f"{s3_server}/shards", manifest, "test")
    keys = sorted(s["key"] for s in shards.iterate(urls))
    assert keys == ["ring", "torus"]
    again = ingest(f"{s3_server}/assets", f"{s3_server}/shards", config, teacher=teacher)
    assert again.written_shards == 0
