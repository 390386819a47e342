"""Reading and writing objects as gaussians: INRIA 3DGS .ply (SH degree 0-3, normals or not,
binary either byte order or ASCII), PlayCanvas compressed .ply and Niantic .spz (through
``gsply``), the antimatter15 .splat; meshes and point clouds (``.obj``/``.glb``/``.gltf``/``.stl``/
``.off``, or a .ply with faces or without 3DGS fields) become gaussians by surface splatting.

Every failure is a :class:`GaussianFormatError` naming the file, the field and what was
expected; nothing else escapes :func:`read_gaussians` / :func:`load_gaussians`.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import struct
import tempfile
import zlib

import numpy as np

from clipgs.data import ply
from clipgs.data.gaussians import GaussianCloud, logit, rgb_to_sh0
from clipgs.data.ply import MAX_GAUSSIANS  # noqa: F401  (re-exported: the memory guard)
from clipgs.errors import ClipgsError, GaussianFormatError

log = logging.getLogger(__name__)

SPLAT_RECORD_BYTES = 32
PLY_REQUIRED = (
    ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)
GAUSSIAN_SUFFIXES = (".ply", ".splat", ".spz")
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".stl", ".off")
POINT_SUFFIXES = (".xyz",)
FORMATS = GAUSSIAN_SUFFIXES + MESH_SUFFIXES + POINT_SUFFIXES
# how far from unit length a quaternion may be before normalising it earns a warning
QUAT_TOLERANCE = 1e-3
# the memory guard of every reader: a file above this is refused before a byte is read
MAX_FILE_BYTES = int(float(os.environ.get("CLIPGS_MAX_FILE_MB", 4096)) * 2**20)
# log-scales above this are no splat: exp() of them overflows float32 near 88.7, and the
# activated scale (exp / the object's radius) with them
MAX_LOG_SCALE = 80.0


def file_suffix(path: str) -> str:
    """A file's suffix, lower case. "#" is part of the name ("scan#1.ply"); only where the
    name itself has no known suffix is the part after the last "#" taken for a fragment."""
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in FORMATS and "#" in path:
        suffix = posixpath.splitext(path.rsplit("#", 1)[0])[1].lower()
    return suffix


def _check_finite(path: str, name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.nonzero(bad.reshape(len(values), -1).any(axis=1))[0]
        raise GaussianFormatError(
            path, f"{len(rows)} non-finite values (NaN/Inf), first at gaussian {rows[0]}; "
            "expected finite numbers", field=name,
        )


def _check_rotation(path: str, q: np.ndarray, tolerance: float) -> None:
    """Zero quaternions are an error; others off unit length earn a warning. The stored values
    are kept as they are (lossless writing); ``GaussianCloud.activated`` normalises them.
    Column by column: 3x faster than a norm over the strided [N, 4] view."""
    with np.errstate(over="ignore"):  # absurd values give inf: off unit, as they should
        n2 = q[:, 0] * q[:, 0] + q[:, 1] * q[:, 1] + q[:, 2] * q[:, 2] + q[:, 3] * q[:, 3]
    zero = int((n2 == 0).sum())
    if zero:
        raise GaussianFormatError(path, f"{zero} zero-length quaternions; expected non-zero",
                                  field="rot_0..3")
    off = (n2 < (1 - tolerance) ** 2) | (n2 > (1 + tolerance) ** 2)  # |q|^2 vs (1 +- tol)^2
    _warn_off_unit(path, int(off.sum()), len(q))


def _warn_off_unit(path: str, off: int, total: int) -> None:
    if off:
        log.warning("%s: %d of %d quaternions are not unit length; normalised", path, off,
                    total)


def finish(path: str, cloud: GaussianCloud, tolerance: float = QUAT_TOLERANCE,
           matrix: np.ndarray | None = None, rot_column: int = -1) -> GaussianCloud:
    """Checks shared by every format. ``matrix``: the whole float body when the fields are
    views of it (the common case; ``rot_column`` is where its quaternion starts), so one
    compiled pass checks it all; only when that finds a problem do the field-by-field checks
    run, to name it."""
    if len(cloud) == 0:
        raise GaussianFormatError(path, "zero gaussians; expected at least one")
    if matrix is not None:
        from clipgs.data.checks import scan

        finite, zero, off = scan(matrix, rot_column, tolerance)
        if finite and zero == 0:
            _warn_off_unit(path, off, len(cloud))
            return _check_scale(path, cloud)
    for name in ("xyz", "f_dc", "opacity", "scale", "rotation", "f_rest", "normals"):
        if getattr(cloud, name) is not None:
            _check_finite(path, name, getattr(cloud, name))
    _check_rotation(path, cloud.rotation, tolerance)
    return _check_scale(path, cloud)


def _check_scale(path: str, cloud: GaussianCloud) -> GaussianCloud:
    """Finite but absurd log-scales would turn into inf in the shards (and blank renders)."""
    high = cloud.scale.max(axis=1) > MAX_LOG_SCALE
    if high.any():
        row = int(np.argmax(high))
        raise GaussianFormatError(
            path, f"{int(high.sum())} gaussians with a log-scale above {MAX_LOG_SCALE:g} (first "
            f"at gaussian {row}: {float(cloud.scale[row].max()):g}); expected natural-log "
            "scales, whose exp fits float32", field="scale")
    return cloud


def _gaussians_from_ply(source, header: ply.Header, path: str) -> GaussianCloud:
    body = ply.read_vertices(source, header, path)
    names = header.element("vertex").names()
    rest = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n[7:]))
    if len(rest) not in (0, 9, 24, 45):
        raise GaussianFormatError(path, f"{len(rest)} f_rest_* fields; expected 0, 9, 24 or 45 "
                                  "(SH degree 0-3)", field="f_rest_*")
    normals = ["nx", "ny", "nz"] if {"nx", "ny", "nz"} <= set(names) else []
    # every missing or mistyped field named before any column work
    ply.check_fields(header, PLY_REQUIRED + rest + normals, path)

    def cols(fields: list[str]) -> np.ndarray:
        return ply.columns(body, header, fields, path, checked=True)

    n = header.element("vertex").count
    cloud = GaussianCloud(
        xyz=cols(["x", "y", "z"]),
        f_dc=cols(["f_dc_0", "f_dc_1", "f_dc_2"]),
        opacity=cols(["opacity"])[:, 0],
        scale=cols([f"scale_{i}" for i in range(3)]),
        rotation=cols([f"rot_{i}" for i in range(4)]),
        f_rest=cols(rest) if rest else np.zeros((n, 0), np.float32),
        normals=cols(normals) if normals else None,
    )
    rot = [names.index(f"rot_{i}") for i in range(4)]
    if isinstance(body, np.ndarray) and rot == list(range(rot[0], rot[0] + 4)):
        return finish(path, cloud, matrix=body, rot_column=rot[0])
    return finish(path, cloud)


def _from_gsdata(data, path: str) -> GaussianCloud:
    """gsply's GSData (PLY conventions: log scales, logit opacities, wxyz quats, shN [N,K,3])
    -> our container, f_rest in INRIA's channel-grouped order."""
    n = int(data.means.shape[0])
    shn = np.asarray(data.shN, np.float32).reshape(n, -1, 3) if data.shN is not None else None
    f_rest = (shn.transpose(0, 2, 1).reshape(n, -1) if shn is not None and shn.size
              else np.zeros((n, 0), np.float32))
    return GaussianCloud(
        xyz=np.asarray(data.means, np.float32), f_dc=np.asarray(data.sh0, np.float32),
        opacity=np.asarray(data.opacities, np.float32).reshape(n),
        scale=np.asarray(data.scales, np.float32), rotation=np.asarray(data.quats, np.float32),
        f_rest=np.ascontiguousarray(f_rest, np.float32))


def read_compressed_ply(data: bytes, header: ply.Header, path: str) -> GaussianCloud:
    """PlayCanvas' compressed .ply (chunked, quantised), decoded by gsply."""
    vertex = header.element("vertex")
    if vertex is None:
        raise GaussianFormatError(path, "compressed .ply without a 'vertex' element",
                                  field="vertex")
    ply._guard(path, vertex)
    import gsply

    try:
        cloud = _from_gsdata(gsply.decompress_from_bytes(bytes(data)), path)
    except Exception as exc:  # gsply raises several types on a damaged body
        raise GaussianFormatError(path, f"not a readable compressed .ply ({type(exc).__name__}:"
                                  f" {exc}); expected PlayCanvas' chunk/vertex layout") from None
    return finish(path, cloud, tolerance=0.05)  # quantised quaternions are never exact


def _spz_count(data: bytes, path: str) -> int:
    """The point count in an .spz header, read before decoding (a gzip bomb or a lying header
    must not allocate)."""
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 16)
        except zlib.error as exc:
            raise GaussianFormatError(path, f"not a readable .spz ({exc}); expected a gzip "
                                      "stream") from None
    else:
        head = data[:16]
    if len(head) < 16 or head[:4] != b"NGSP":
        raise GaussianFormatError(path, "not an .spz: no NGSP header; expected Niantic's .spz")
    return struct.unpack_from("<I", head, 8)[0]


def read_spz(data: bytes, path: str) -> GaussianCloud:
    """Niantic's .spz (gzip v1-3 or NGSP v4), decoded by gsply."""
    n = _spz_count(data, path)
    if n > MAX_GAUSSIANS:
        raise GaussianFormatError(path, f"header declares {n:,} gaussians, over the limit of "
                                  f"{MAX_GAUSSIANS:,} (CLIPGS_MAX_GAUSSIANS)")
    import gsply

    with tempfile.NamedTemporaryFile(suffix=".spz") as tmp:  # gsply reads from a path
        tmp.write(data)
        tmp.flush()
        try:
            cloud = _from_gsdata(gsply.read_spz(tmp.name), path)
        except Exception as exc:
            raise GaussianFormatError(path, f"not a readable .spz ({type(exc).__name__}: "
                                      f"{str(exc).replace(tmp.name, path)})") from None
    if len(cloud) != n:
        raise GaussianFormatError(path, f"header declares {n:,} gaussians, decoded {len(cloud):,}")
    return finish(path, cloud, tolerance=0.05)


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
    if n and not (scale > 0).all():  # also catches NaN
        raise GaussianFormatError(path, "non-positive or NaN linear scale; expected > 0",
                                  field="scale")
    rgba = arr["rgba"].astype(np.float32) / 255.0
    cloud = GaussianCloud(
        xyz=arr["xyz"].astype(np.float32),
        f_dc=rgb_to_sh0(rgba[:, :3]).astype(np.float32),
        opacity=logit(rgba[:, 3]).astype(np.float32),
        scale=np.log(scale).astype(np.float32),
        rotation=(arr["rot"].astype(np.float32) - 128.0) / 128.0,
    )
    return finish(path, cloud, tolerance=0.05)  # uint8 quaternions are never exact


def _read(source: bytes | str, path: str, mesh_samples: int, seed: int,
          suffix: str | None = None) -> GaussianCloud:
    suffix = suffix or file_suffix(path)
    if suffix == ".ply":
        head = ply.read_head(source) if isinstance(source, str) else source[:ply.MAX_HEADER_BYTES]
        header = ply.parse_header(bytes(head), path)
        what = ply.kind(header)
        if what == "gaussians":
            return _gaussians_from_ply(source, header, path)
        data = _bytes(source)
        if what == "compressed":
            return read_compressed_ply(data, header, path)
        if what == "points":
            from clipgs.data.pointclouds import ply_points_to_gaussians

            return ply_points_to_gaussians(source, header, path)
        from clipgs.data.meshes import load_mesh_gaussians

        return load_mesh_gaussians(data, path, mesh_samples, seed)
    if suffix in MESH_SUFFIXES:
        from clipgs.data.meshes import load_mesh_gaussians

        return load_mesh_gaussians(_bytes(source), path, mesh_samples, seed)
    if suffix in POINT_SUFFIXES:
        from clipgs.data.pointclouds import read_xyz

        return read_xyz(_bytes(source), path)
    if suffix == ".splat":
        return read_splat(_bytes(source), path)
    if suffix == ".spz":
        return read_spz(_bytes(source), path)
    raise GaussianFormatError(path, f"unknown suffix '{suffix}'; expected one of {FORMATS}")


def _bytes(source: bytes | str) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read()
    return source


def _guarded(source: bytes | str, path: str, mesh_samples: int, seed: int,
             suffix: str | None = None) -> GaussianCloud:
    try:
        return _read(source, path, mesh_samples, seed, suffix)
    except ClipgsError:
        raise
    except MemoryError:
        raise GaussianFormatError(path, "out of memory while reading; the file is larger than "
                                  "this machine can hold") from None
    except Exception as exc:  # a bug or a library's surprise: still one line naming the file
        raise GaussianFormatError(path, f"unreadable ({type(exc).__name__}: {exc})") from None


def read_gaussians(data: bytes, path: str, mesh_samples: int = 10_000, seed: int = 0
                   ) -> GaussianCloud:
    """A file's bytes as gaussians; the format comes from ``path``'s suffix (and, for .ply,
    from what its header declares). Meshes are splatted with ``mesh_samples`` gaussians."""
    return _guarded(data, path, mesh_samples, seed)


def too_large(path: str, nbytes: int, limit: int | None = None) -> GaussianFormatError | None:
    """``CLIPGS_MAX_FILE_MB``, the memory guard of every reader: the error for a file of
    ``nbytes`` over ``limit`` (default MAX_FILE_BYTES), else None."""
    limit = MAX_FILE_BYTES if limit is None else limit
    if nbytes <= limit:
        return None
    return GaussianFormatError(path, f"{nbytes:,} bytes, over the limit of {limit:,} "
                               "(CLIPGS_MAX_FILE_MB)")


def check_file_size(path: str) -> None:
    """A file over the guard is refused before it is read (one stat, or one HEAD in S3)."""
    from clipgs.data.storage import size

    error = too_large(path, size(path))
    if error:
        raise error


def read_file_bytes(path: str) -> bytes:
    """A file's bytes (local or ``s3://``), after the size guard."""
    from clipgs.data.storage import is_s3, read_bytes

    if not is_s3(path) and not os.path.exists(path.removeprefix("file://")):  # pipes too
        raise GaussianFormatError(path, "no such file")
    check_file_size(path)
    return read_bytes(path)


def load_gaussians(path: str | os.PathLike, mesh_samples: int = 10_000, seed: int = 0
                   ) -> GaussianCloud:
    """Read a file from a local path (binary .ply straight into one array) or ``s3://``."""
    from clipgs.data.storage import is_s3

    path = str(path)
    if is_s3(path):
        return read_gaussians(read_file_bytes(path), path, mesh_samples, seed)
    local = path.removeprefix("file://")
    if not os.path.isfile(local):
        raise GaussianFormatError(path, "no such file")
    check_file_size(local)
    return _guarded(local, path, mesh_samples, seed)


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
    columns += [np.asarray(cloud.opacity)[:, None], cloud.scale, cloud.rotation]
    table = np.concatenate([np.asarray(c, "<f4").reshape(len(cloud), np.shape(c)[1])
                            for c in columns], axis=1)
    out = path if isinstance(path, io.IOBase) else open(path, "wb")
    try:
        ply.write_header(out, len(cloud), fields)
        out.write(np.ascontiguousarray(table).tobytes())
    finally:
        if out is not path:
            out.close()


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


def read_ply(data: bytes, path: str = "<bytes>.ply") -> GaussianCloud:
    """A .ply's bytes, whatever the suffix of ``path``."""
    return _guarded(data, path, 10_000, 0, suffix=".ply")
