"""Reading and writing 3DGS files: INRIA .ply (plyfile) and the antimatter15 .splat.

Every failure is a :class:`GaussianFormatError` naming the file, the field and what was
expected; nothing else escapes :func:`read_gaussians`.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from clipgs.data.gaussians import GaussianCloud, logit, rgb_to_sh0
from clipgs.errors import GaussianFormatError

log = logging.getLogger(__name__)

# A memory guard: files claiming more gaussians than this are refused before reading.
MAX_GAUSSIANS = int(os.environ.get("CLIPGS_MAX_GAUSSIANS", 20_000_000))
SPLAT_RECORD_BYTES = 32
PLY_REQUIRED = (
    ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)
FORMATS = (".ply", ".splat")


def _check_finite(path: str, name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.nonzero(bad.reshape(len(values), -1).any(axis=1))[0]
        raise GaussianFormatError(
            path, f"{len(rows)} non-finite values (NaN/Inf), first at gaussian {rows[0]}; "
            "expected finite numbers", field=name,
        )


def _check_rotation(path: str, rotation: np.ndarray, tolerance: float) -> None:
    """Zero quaternions are an error; others off unit length earn a warning. The stored values
    are kept as they are (lossless writing); ``GaussianCloud.activated`` normalises them."""
    norm = np.linalg.norm(rotation, axis=1)
    if (norm == 0).any():
        raise GaussianFormatError(
            path, f"{int((norm == 0).sum())} zero-length quaternions; expected non-zero",
            field="rot_0..3",
        )
    off = np.abs(norm - 1.0) > tolerance
    if off.any():
        log.warning("%s: %d of %d quaternions are not unit length; normalised",
                    path, int(off.sum()), len(rotation))


def _finish(path: str, cloud: GaussianCloud, tolerance: float = 1e-3) -> GaussianCloud:
    """Checks shared by every format; ``tolerance`` is how far from unit length a quaternion
    may be before normalising it earns a warning (uint8 .splat quaternions are never exact)."""
    if len(cloud) == 0:
        raise GaussianFormatError(path, "zero gaussians; expected at least one")
    for name in ("xyz", "f_dc", "opacity", "scale", "rotation", "f_rest"):
        _check_finite(path, name, getattr(cloud, name))
    _check_rotation(path, cloud.rotation, tolerance)
    return cloud


def read_ply(data: bytes, path: str = "<bytes>") -> GaussianCloud:
    """An INRIA 3DGS .ply (binary either byte order, or ASCII) at SH degree 0 to 3."""
    try:
        ply = PlyData.read(io.BytesIO(data))
    except Exception as exc:  # plyfile raises several types for bad headers and short bodies
        raise GaussianFormatError(path, f"not a readable .ply ({exc}); expected a PLY header "
                                  "and a body matching it") from None
    try:
        vertex = ply["vertex"]
    except KeyError:
        raise GaussianFormatError(path, "no 'vertex' element; expected the gaussians as "
                                  "vertices", field="vertex") from None
    if vertex.count > MAX_GAUSSIANS:
        raise GaussianFormatError(path, f"{vertex.count} gaussians exceeds the limit of "
                                  f"{MAX_GAUSSIANS} (CLIPGS_MAX_GAUSSIANS)", field="vertex")
    names = vertex.data.dtype.names or ()
    for name in PLY_REQUIRED:
        if name not in names:
            raise GaussianFormatError(path, "missing; expected an INRIA 3DGS .ply with "
                                      + ", ".join(PLY_REQUIRED), field=name)
        if vertex.data.dtype[name].kind != "f":
            raise GaussianFormatError(path, f"has type {vertex.data.dtype[name]}; expected a "
                                      "float property", field=name)
    rest = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n[7:]))
    if len(rest) not in (0, 9, 24, 45):
        raise GaussianFormatError(path, f"{len(rest)} f_rest_* fields; expected 0, 9, 24 or 45 "
                                  "(SH degree 0-3)", field="f_rest_*")

    def cols(fields: list[str]) -> np.ndarray:
        return np.stack([np.asarray(vertex.data[f], np.float32) for f in fields], axis=1)

    normals = cols(["nx", "ny", "nz"]) if {"nx", "ny", "nz"} <= set(names) else None
    cloud = GaussianCloud(
        xyz=cols(["x", "y", "z"]),
        f_dc=cols(["f_dc_0", "f_dc_1", "f_dc_2"]),
        opacity=np.asarray(vertex.data["opacity"], np.float32),
        scale=cols([f"scale_{i}" for i in range(3)]),
        rotation=cols([f"rot_{i}" for i in range(4)]),
        f_rest=cols(rest) if rest else np.zeros((vertex.count, 0), np.float32),
        normals=normals,
    )
    return _finish(path, cloud)


def read_splat(data: bytes, path: str = "<bytes>") -> GaussianCloud:
    """The antimatter15 .splat: 32 bytes a gaussian - xyz float32, linear scale float32 x3,
    RGBA uint8, quaternion uint8 x4 stored as (q + 1) * 128."""
    if len(data) % SPLAT_RECORD_BYTES:
        raise GaussianFormatError(path, f"size {len(data)} bytes is not a multiple of "
                                  f"{SPLAT_RECORD_BYTES}; the file is truncated or not a .splat")
    n = len(data) // SPLAT_RECORD_BYTES
    if n > MAX_GAUSSIANS:
        raise GaussianFormatError(path, f"{n} gaussians exceeds the limit of {MAX_GAUSSIANS}")
    record = np.dtype([("xyz", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4),
                       ("rot", "u1", 4)])
    arr = np.frombuffer(data, dtype=record, count=n)
    scale = arr["scale"].astype(np.float32)
    if n and (scale <= 0).any():
        raise GaussianFormatError(path, "non-positive linear scale; expected > 0", field="scale")
    rgba = arr["rgba"].astype(np.float32) / 255.0
    with np.errstate(divide="ignore"):
        log_scale = np.log(scale)
    cloud = GaussianCloud(
        xyz=arr["xyz"].astype(np.float32),
        f_dc=rgb_to_sh0(rgba[:, :3]).astype(np.float32),
        opacity=logit(rgba[:, 3]).astype(np.float32),
        scale=log_scale.astype(np.float32),
        rotation=(arr["rot"].astype(np.float32) - 128.0) / 128.0,
    )
    return _finish(path, cloud, tolerance=0.05)


def read_gaussians(data: bytes, path: str) -> GaussianCloud:
    """Read a 3DGS file's bytes; the format comes from ``path``'s suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ply":
        return read_ply(data, path)
    if suffix == ".splat":
        return read_splat(data, path)
    raise GaussianFormatError(path, f"unknown suffix '{suffix}'; expected one of {FORMATS}")


def load_gaussians(path: str | os.PathLike) -> GaussianCloud:
    """Read a 3DGS file from a local path or ``s3://`` URL."""
    from clipgs.data.storage import read_bytes

    return read_gaussians(read_bytes(str(path)), str(path))


def write_ply(cloud: GaussianCloud, path: str | os.PathLike | io.BytesIO) -> None:
    """Write INRIA's binary little-endian .ply, every stored field kept (lossless)."""
    fields = ["x", "y", "z"]
    columns = [cloud.xyz]
    if cloud.normals is not None:
        fields += ["nx", "ny", "nz"]
        columns.append(cloud.normals)
    fields += ["f_dc_0", "f_dc_1", "f_dc_2"]
    columns.append(cloud.f_dc)
    fields += [f"f_rest_{i}" for i in range(cloud.f_rest.shape[1])]
    columns.append(cloud.f_rest)
    fields += ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    columns += [cloud.opacity[:, None], cloud.scale, cloud.rotation]
    columns = [np.asarray(c, np.float32) for c in columns]
    table = np.concatenate([c.reshape(len(cloud), c.shape[1] if c.ndim > 1 else 1)
                            for c in columns], axis=1)
    vertex = np.empty(len(cloud), dtype=[(f, "<f4") for f in fields])
    for i, f in enumerate(fields):
        vertex[f] = table[:, i]
    PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(path)


def summarize(cloud: GaussianCloud) -> dict:
    """A short description of one object, for ``clipgs inspect``."""
    act = cloud.activated()
    lo, hi = cloud.xyz.min(axis=0), cloud.xyz.max(axis=0)
    return {
        "gaussians": len(cloud),
        "sh_degree": cloud.sh_degree,
        "normals": cloud.normals is not None,
        "bbox_min": [round(float(v), 4) for v in lo],
        "bbox_max": [round(float(v), 4) for v in hi],
        "mean_rgb": [round(float(v), 3) for v in act[:, 3:6].mean(axis=0)],
        "mean_opacity": round(float(act[:, 6].mean()), 3),
        "median_scale": round(float(np.median(np.exp(cloud.scale))), 6),
    }
