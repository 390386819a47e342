"""Coloured point clouds to gaussians (method.md section 6's cheapest source): one isotropic
gaussian per point, its size the mean distance to its three nearest neighbours - as the 3DGS
optimisation initialises from a point cloud - coloured from the point, identity rotation."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from clipgs.data import ply
from clipgs.data.gaussians import GaussianCloud
from clipgs.errors import GaussianFormatError

OPACITY = 0.9
DEFAULT_RGB = 0.6  # grey for points without colours


def points_to_gaussians(xyz: np.ndarray, rgb: np.ndarray | None, path: str) -> GaussianCloud:
    """[N, 3] positions and [N, 3] colours in [0, 1] (or None) -> gaussians."""
    xyz = np.asarray(xyz, np.float32)
    if len(xyz) == 0:
        raise GaussianFormatError(path, "zero points; expected at least one", field="vertex")
    if not np.isfinite(xyz).all():
        raise GaussianFormatError(path, "non-finite positions (NaN/Inf); expected finite "
                                  "numbers", field="x, y, z")
    if len(xyz) > 1:
        k = min(4, len(xyz))
        dist, _ = cKDTree(xyz).query(xyz, k=k)
        spacing = dist[:, 1:].mean(axis=1)
        floor = max(float(np.median(spacing)), 1e-6) * 0.1  # duplicates get a small disk
        spacing = np.maximum(spacing, floor)
    else:
        spacing = np.ones(1)
    if rgb is None:
        rgb = np.full((len(xyz), 3), DEFAULT_RGB, np.float32)
    n = len(xyz)
    return GaussianCloud.from_activated(
        xyz=xyz, rgb=np.clip(rgb, 0, 1), opacity=np.full(n, OPACITY, np.float32),
        scale=np.repeat(spacing[:, None], 3, axis=1).astype(np.float32),
        rotation=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)))


def _colours(values: list[np.ndarray]) -> np.ndarray:
    rgb = np.stack([np.asarray(v) for v in values], axis=1)
    if rgb.dtype.kind in "ui" or rgb.max(initial=0) > 1.0:  # 0-255 integers (or floats)
        return rgb.astype(np.float32) / 255.0
    return rgb.astype(np.float32)


def ply_points_to_gaussians(source, header: ply.Header, path: str) -> GaussianCloud:
    """A .ply whose vertices are points: x, y, z and optionally red, green, blue."""
    body = ply.read_vertices(source, header, path)
    names = header.element("vertex").names()
    xyz = ply.columns(body, header, ["x", "y", "z"], path)
    rgb = None
    for trio in (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green",
                                                             "diffuse_blue")):
        if set(trio) <= set(names):
            if isinstance(body, np.ndarray):
                rgb = _colours([body[:, names.index(c)] for c in trio])
            else:
                rgb = _colours([body[c] for c in trio])
            break
    return points_to_gaussians(xyz, rgb, path)


def read_xyz(data: bytes, path: str) -> GaussianCloud:
    """ASCII ``x y z [r g b]`` rows (colours 0-255 or 0-1)."""
    try:
        rows = [line.split() for line in data.decode("ascii").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        if len(rows) > ply.MAX_GAUSSIANS:
            raise GaussianFormatError(path, f"{len(rows):,} points, over the limit of "
                                      f"{ply.MAX_GAUSSIANS:,} (CLIPGS_MAX_GAUSSIANS)")
        widths = {len(r) for r in rows}
        table = np.array(rows, dtype=np.float64)
    except UnicodeDecodeError:
        raise GaussianFormatError(path, "not ASCII text; expected 'x y z [r g b]' rows") from None
    except ValueError:
        raise GaussianFormatError(path, "rows that are not all numbers of the same width; "
                                  "expected 'x y z [r g b]' rows") from None
    if len(rows) == 0:
        raise GaussianFormatError(path, "zero points; expected at least one")
    if widths not in ({3}, {6}, {7}):
        raise GaussianFormatError(path, f"rows of {sorted(widths)} numbers; expected 3 (x y z)"
                                  " or 6 (x y z r g b)")
    rgb = _colours([table[:, i] for i in (3, 4, 5)]) if table.shape[1] >= 6 else None
    return points_to_gaussians(table[:, :3], rgb, path)
