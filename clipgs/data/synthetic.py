"""The project's own small dataset, for a fresh clone with no data: coloured primitive shapes
made by direct surface splatting, written as INRIA .ply files with a ``meta.json`` each (title,
tags, label, split) - the same layout users' folders have, so it goes through real ingestion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipgs.data.formats import write_ply
from clipgs.data.meshes import mesh_to_gaussians

COLOURS = {
    "red": (0.85, 0.12, 0.1), "green": (0.15, 0.7, 0.2), "blue": (0.1, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.5, 0.05),
}


def _shapes():
    import trimesh.creation as c

    return {
        "sphere": lambda: c.icosphere(subdivisions=3, radius=0.5),
        "cube": lambda: c.box(extents=(1, 1, 1)),
        "cylinder": lambda: c.cylinder(radius=0.4, height=1.0, sections=32),
        "cone": lambda: c.cone(radius=0.5, height=1.0, sections=32),
        "torus": lambda: c.torus(major_radius=0.5, minor_radius=0.18),
        "pyramid": lambda: c.cone(radius=0.6, height=0.9, sections=4),
    }


SHAPES = tuple(sorted(["sphere", "cube", "cylinder", "cone", "torus", "pyramid"]))


def generate(out: str | Path, per_class: int = 40, gaussians: int = 4096, seed: int = 0,
             test_fraction: float = 0.25) -> Path:
    """Write ``per_class`` objects of each shape into ``out`` (skipped if already complete)."""
    import trimesh.transformations as tf

    out = Path(out)
    done = out / "DONE.json"
    spec = {"per_class": per_class, "gaussians": gaussians, "seed": seed,
            "test_fraction": test_fraction, "shapes": list(SHAPES)}
    if done.exists() and json.loads(done.read_text()) == spec:
        return out
    rng = np.random.default_rng(seed)
    builders = _shapes()
    colour_names = sorted(COLOURS)
    for shape in SHAPES:
        n_test = int(round(per_class * test_fraction))
        for i in range(per_class):
            colour = colour_names[int(rng.integers(len(colour_names)))]
            mesh = builders[shape]()
            stretch = np.diag(np.r_[rng.uniform(0.75, 1.3, 3), 1.0])
            turn = tf.rotation_matrix(rng.uniform(0, 2 * np.pi), [0, 0, 1])
            tilt = tf.rotation_matrix(rng.uniform(-0.3, 0.3), [1, 0, 0])
            mesh.apply_transform(turn @ tilt @ stretch)
            rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 0.04, 3), 0, 1)
            cloud = mesh_to_gaussians(mesh, gaussians, rng, rgb=rgb)
            key = f"{shape}_{i:03d}"
            folder = out / key
            folder.mkdir(parents=True, exist_ok=True)
            write_ply(cloud, folder / f"{key}.ply")
            meta = {"title": f"a {colour} {shape}", "tags": [shape, colour, "primitive"],
                    "label": shape, "split": "test" if i < n_test else "train"}
            (folder / "meta.json").write_text(json.dumps(meta))
    done.write_text(json.dumps(spec))
    return out
