"""The ModelNet10 benchmark's cache, built once per teacher and point count: each grid's surface
voxels as gaussians (clipgs.data.sources.voxels_to_gaussians) resampled to a fixed count, K
rendered views (clipgs.data.views.render at the teacher's image size) and the teacher's text and
image embeddings; and what those image embeddings carry (teacher_view_checks). Used by
benchmarks/modelnet10.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from clipgs.data.gaussians import resample
from clipgs.data.sources import MODELNET10_CLASSES, PROMPT, class_text, voxels_to_gaussians
from clipgs.data.views import render, ring_cameras
from clipgs.eval.fewshot import fit_linear_probe
from clipgs.eval.metrics import topk_accuracy
from clipgs.models.teacher import Teacher

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shapes" / \
    "modelnet10.npz"
# 3: views composited in float64 (stop 32: float32 left 0.4% of these pixels 1/255 off);
# 2: voxel gaussians shaped and oriented by the surface around them (stop 19); 1: round ones
CACHE_VERSION = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the cache (built once)

def build_cache(path: Path, points: int, views: int, teacher: Teacher,
                limit: int | None = None) -> dict:
    data = np.load(DATA, allow_pickle=False)
    grids = {s: data[f"X_{s}"] for s in ("train", "test")}  # each access re-reads the npz
    labels = {s: data[f"y_{s}"] for s in ("train", "test")}
    if limit:  # a smoke-test subset, evenly spaced (the splits are sorted by class)
        for s in grids:
            keep = np.unique(np.linspace(0, len(grids[s]) - 1, limit).round().astype(int))
            grids[s], labels[s] = grids[s][keep], labels[s][keep]
    cams = ring_cameras(views)
    out = {"points": [], "label": [], "split": [], "valid": [], "img": []}
    rng = np.random.default_rng(0)
    t0 = time.time()
    total = sum(len(g) for g in grids.values())
    done = 0
    for split, X in grids.items():
        for i, grid in enumerate(X):
            done += 1
            out["label"].append(int(labels[split][i]))
            out["split"].append(0 if split == "train" else 1)
            if not grid.any():
                log(f"skipping {split}/{i} ({MODELNET10_CLASSES[labels[split][i]]}): empty "
                    "occupancy grid, no gaussians")
                out["valid"].append(False)
                out["points"].append(np.zeros((points, 14), np.float32))
                out["img"].append(np.zeros((views, teacher.image_size, teacher.image_size, 3),
                                           np.uint8))
                continue
            p = resample(voxels_to_gaussians(grid).activated(), points, rng)
            out["valid"].append(True)
            out["points"].append(p)
            # max_radius 2: voxel gaussians are about 1 px wide at 64 px, so 5x5 footprints
            # lose nothing and render 3x faster than the default 9x9
            out["img"].append(np.stack([(render(p, r, teacher.image_size, max_radius=2) * 255)
                                        .round().byte().numpy() for r in cams]))
            if done % 500 == 0:
                log(f"cache: {done}/{total} objects rendered ({time.time() - t0:.0f} s)")
    images = np.stack(out.pop("img"))
    n = len(images)
    log(f"cache: teacher image embeddings of {n} x {views} views")
    flat = images.reshape(n * views, *images.shape[2:])
    img_emb = []
    for i in range(0, len(flat), 2048):
        img_emb.append(teacher.encode_images(flat[i:i + 2048]))
        log(f"cache: {min(i + 2048, len(flat))}/{len(flat)} views embedded")
    img_emb = np.concatenate(img_emb)
    captions = [PROMPT.format(class_text(c)) for c in MODELNET10_CLASSES]  # as ingest writes
    cache = {"points": np.stack(out["points"]), "label": np.array(out["label"]),
             "split": np.array(out["split"]), "valid": np.array(out["valid"]),
             "img_emb": img_emb.reshape(n, views, -1).astype(np.float32),
             "txt_emb": teacher.encode_text(captions).astype(np.float32),
             "view0": images[:8, 0], "teacher_sha256": np.array(teacher.identity()["sha256"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **cache)
    tmp.rename(path)  # a half-written cache never looks complete
    log(f"cache: written {path} in {time.time() - t0:.0f} s")
    return cache


def load_cache(args, teacher: Teacher) -> dict:
    sha = teacher.identity()["sha256"][:12]
    key = f"v{CACHE_VERSION}-M{args.cache_points}-K{args.views}-{sha}"
    key += f"-limit{args.limit}" if args.limit else ""
    path = Path(args.workdir) / f"cache-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            cache = {k: f[k] for k in f.files}
        log(f"cache: {path} ({len(cache['label'])} objects)")
        return cache
    return build_cache(path, args.cache_points, args.views, teacher, args.limit)


def teacher_view_checks(cache: dict, test: np.ndarray, text: np.ndarray) -> dict:
    """What the teacher's image embeddings carry: a linear probe fitted on the training views
    (mean of each object's K views, standardised) and scored on the test views, against the
    image-text agreement (views classified by the class prompts, as zero-shot does). A probe
    far above chance with agreement at chance means the views see the shape but live in a
    space unrelated to the text tower's."""
    train = np.nonzero((cache["split"] == 0) & cache["valid"])[0]
    views = cache["img_emb"].mean(1)
    mu, sd = views[train].mean(0), views[train].std(0) + 1e-8
    probe = fit_linear_probe((views[train] - mu) / sd, cache["label"][train], 10)
    with torch.no_grad():
        pred = probe(torch.from_numpy((views[test] - mu) / sd).float()).argmax(1).numpy()
    unit = views[test] / np.linalg.norm(views[test], axis=1, keepdims=True)
    return {"teacher_view_probe_top1": float((pred == cache["label"][test]).mean()),
            "teacher_view_zeroshot_top1": topk_accuracy(unit @ text.T, cache["label"][test], 1)}
