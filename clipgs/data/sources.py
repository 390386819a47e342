"""From what users have to gaussian objects with text: the sources of method.md section 6.

A source is a folder or ``s3://`` prefix. What is in it decides how each object is read:

- object files - 3DGS (``.ply``, ``.splat``, ``.spz``, PlayCanvas compressed ``.ply``), meshes
  (``.obj``, ``.glb``, ``.gltf``, ``.stl``, ``.off``, ``.ply`` with faces) and point clouds
  (``.ply`` without 3DGS fields, ``.xyz``) - with sidecars: ``meta.json`` (title, tags, optional
  label and split) when the file is alone in its folder, or ``<stem>.json`` / ``<stem>.txt``;
  and ``thumb.png`` (alone in its folder) / ``<stem>.thumb.png`` as views, and for 3DGS files
  ``<stem>.png`` too (for meshes that name is usually a texture, so it is not a view);
- ``*.npz`` labelled occupancy grids (``X_train``, ``y_train``, ``X_test``, ``y_test``, as
  ModelNet10): occupied surface voxels become gaussians, text "a 3D model of a {class}".
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import os
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from clipgs.data.axes import UP_AXES, parse_up
from clipgs.data.formats import (FORMATS, GAUSSIAN_SUFFIXES, MAX_FILE_BYTES, read_gaussians,
                                  too_large)
from clipgs.data.gaussians import GaussianCloud
from clipgs.data.storage import is_s3, list_stats, local_path, read_bytes
from clipgs.errors import ClipgsError, GaussianFormatError, StorageError

MODELNET10_CLASSES = ("bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand",
                      "sofa", "table", "toilet")
PROMPT = "a 3D model of a {}"
TEST_FRACTION = 0.2


@dataclass
class Asset:
    """One object to ingest: how to load its gaussians, its text, label, split and images."""

    key: str  # unique, safe as a webdataset key (no dots)
    source: str
    caption: str
    split: str  # "train" or "test"
    load: Callable[[], GaussianCloud]
    label: str | None = None
    image_urls: list[str] = field(default_factory=list)
    # changes when any file the object is made from does (a re-run then redoes its shard)
    version: str = ""
    up: str | None = None  # its sidecar's "up" axis, if it has one (else the ingest's ``up``)


def _version(stats: dict[str, tuple[int, str]], urls: list[str | None]) -> str:
    blob = "|".join(f"{u}:{stats[u][0]}:{stats[u][1]}" for u in urls if u and u in stats)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def safe_key(text: str) -> str:
    """A webdataset key from a path: runs of anything but [A-Za-z0-9_-] become one "_". A name
    with characters beyond ASCII (or none left) also gets a short hash of itself, so that
    "猫" and "犬" stay two objects and no key is empty; ASCII names keep their plain keys."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    if not key or not text.isascii():
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        key = f"{key}_{digest}" if key else digest
    return key


def hashed_split(key: str) -> str:
    digest = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return "test" if digest % 1000 < TEST_FRACTION * 1000 else "train"


def class_text(label: str) -> str:
    return label.replace("_", " ")


def _sidecar_text(meta: dict, fallback: str) -> str:
    title = str(meta.get("caption") or meta.get("title") or fallback)
    tags = [str(t) for t in meta.get("tags", []) if str(t).lower() != title.lower()]
    text = title if title.lower().startswith(("a ", "an ", "the ")) else PROMPT.format(
        title.lower())
    return f"{text}, tagged {', '.join(tags)}" if tags else text


def _try_read(url: str) -> bytes | StorageError:
    try:
        return read_bytes(url)
    except StorageError as exc:
        return exc


def _fetch(urls: list[str]) -> dict[str, bytes | StorageError]:
    """Sidecars of thousands of objects in object storage: fetched concurrently (latency-bound),
    a failure kept as the value (it rejects that object, not the run)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(urls, pool.map(_try_read, urls)))


def _meta(url: str | None, fetched: dict) -> dict:
    if url is None:
        return {}
    data = fetched[url]
    if isinstance(data, Exception):
        return {"_error": str(data)}
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {"_error": f"{url}: not valid JSON ({exc}); expected an object with a title"}
    if not isinstance(meta, dict):
        return {"_error": f"{url}: a JSON {type(meta).__name__}; expected an object with a "
                          "title"}
    tags = meta.get("tags")
    if tags is None:
        meta["tags"] = []
    elif not isinstance(tags, list) or not all(isinstance(t, (str, int, float))
                                               for t in tags):
        return {"_error": f"{url}: field 'tags' is {json.dumps(tags)[:60]}; expected a list "
                          "of strings"}
    if "up" in meta and parse_up(meta["up"]) is None:
        return {"_error": f"{url}: field 'up' is {json.dumps(meta['up'])[:60]}; expected one "
                          f"of {', '.join(UP_AXES)} (the object's up axis)"}
    return meta


def _sidecars(f: str, siblings: set[str]) -> tuple[bool, str | None, str | None]:
    """Whether object file ``f`` is the only object among ``siblings`` (the files of its
    folder), its meta sidecar (``<stem>.json``, else ``meta.json`` when alone) and its caption
    file (``<stem>.txt``), each None where absent."""
    folder, name = posixpath.split(f)
    stem = posixpath.splitext(name)[0]
    alone = sum(posixpath.splitext(s)[1].lower() in FORMATS for s in siblings) == 1
    candidates = [posixpath.join(folder, stem + ".json")] + (
        [posixpath.join(folder, "meta.json")] if alone else [])
    txt = posixpath.join(folder, stem + ".txt")
    return (alone, next((c for c in candidates if c in siblings), None),
            txt if txt in siblings else None)


def sidecar_up(url: str) -> tuple[str | None, str | None]:
    """The up axis an object file's sidecar names, read as ingest reads it (``<stem>.json``,
    or ``meta.json`` beside an object alone in its folder), and that sidecar: (None, None)
    without one or without ``"up"``. A sidecar ingest would reject is an error naming it."""
    url = url if is_s3(url) else str(local_path(url))  # file:// too, and "./x" as "x"
    folder = posixpath.dirname(url)
    siblings = set(list_stats(folder or ".", recursive=False))
    meta_url = _sidecars(url, siblings | {url})[1]
    meta = _meta(meta_url, {meta_url: _try_read(meta_url)} if meta_url else {})
    if "_error" in meta:
        raise ClipgsError(meta["_error"])  # it names the sidecar
    return (parse_up(meta["up"]), meta_url) if "up" in meta else (None, None)


def _object_assets(stats: dict[str, tuple[int, str]], root: str, mesh_samples: int,
                   only: str | None = None) -> list[Asset]:
    """The objects among ``stats`` with their sidecars (``only``: that file's object alone,
    the rest of ``stats`` its folder, where its sidecars are found)."""
    sizes = {url: size for url, (size, _) in stats.items()}
    by_dir: dict[str, list[str]] = defaultdict(list)
    for f in sizes:
        by_dir[posixpath.dirname(f)].append(f)
    plan = []
    for f in sizes:  # pass 1: which sidecars each object has
        folder, name = posixpath.split(f)
        stem, suffix = posixpath.splitext(name)
        if suffix.lower() not in FORMATS or only is not None and f != only:
            continue
        siblings = set(by_dir[folder])
        alone, meta_url, txt = _sidecars(f, siblings)
        plan.append((f, folder, name, stem, suffix, siblings, alone, meta_url, txt))
    fetched = _fetch(sorted({u for p in plan for u in p[7:] if u}))
    assets = []
    for f, folder, name, stem, suffix, siblings, alone, meta_url, txt in plan:  # pass 2
        meta = _meta(meta_url, fetched)
        caption = None
        if txt and not isinstance(fetched[txt], Exception):
            caption = fetched[txt].decode("utf-8", "replace").strip()
        base = re.sub(r"_\d+k$", "", stem)  # boat_10k -> boat
        caption = caption or _sidecar_text(meta, base.replace("_", " "))
        names = [stem + ".thumb.png"] + ([stem + ".png"] if suffix.lower() in GAUSSIAN_SUFFIXES
                                         else []) + (["thumb.png"] if alone else [])
        images = [posixpath.join(folder, n) for n in names if posixpath.join(folder, n) in siblings]
        rel = posixpath.relpath(f, root) if f != root else name
        # an object alone in its folder is named by the folder (splats/boat/boat_10k -> boat)
        rel = posixpath.dirname(rel) if alone and posixpath.dirname(rel) else rel
        key = safe_key(name if only else posixpath.splitext(rel)[0] if not alone else rel)
        split = meta.get("split") if meta.get("split") in ("train", "test") else hashed_split(key)
        label = meta.get("label")

        def load(url=f, meta=meta, size=sizes[f], seed=zlib.crc32(key.encode())
                 ) -> GaussianCloud:
            if "_error" in meta:
                raise GaussianFormatError(url, meta["_error"])
            error = too_large(url, size, MAX_FILE_BYTES)  # before a byte is read
            if error:
                raise error
            return read_gaussians(read_bytes(url), url, mesh_samples=mesh_samples, seed=seed)

        assets.append(Asset(key=key, source=f, caption=caption, split=split, load=load,
                            label=str(label) if label is not None else None,
                            image_urls=images,
                            version=_version(stats, [f, meta_url, txt, *images]),
                            up=parse_up(meta["up"]) if "up" in meta else None))
    return assets


# a voxel gaussian's extent along each axis of its frame, in voxels: at least this thick (the
# flat side of a disk), and isotropic VOXEL_SCALE where a voxel has too few neighbours for a frame
MIN_VOXEL_SCALE = 0.1
VOXEL_SCALE = 0.6


def _surface_frames(surface: np.ndarray, outward: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each surface voxel's gaussian fitted to its neighbourhood: the covariance of the surface
    voxels among its 26 neighbours and itself, as a rotation (unit quaternions w, x, y, z) and
    three scales (voxels). The frame's z axis is the direction of least spread (the surface
    normal, turned to agree with ``outward`` where that says something), x the direction of
    most spread, y = z cross x; so a flat piece of surface gets a disk in its plane, a one-voxel
    rod a needle along it, and the same neighbourhood always the same quaternion (w >= 0)."""
    s = surface.astype(np.float64)
    offsets = np.arange(-1.0, 2.0)
    d = np.meshgrid(offsets, offsets, offsets, indexing="ij")  # offsets along axes 0, 1, 2
    count = ndimage.correlate(s, np.ones((3, 3, 3)), mode="constant")[surface]
    mean = np.stack([ndimage.correlate(s, d[a], mode="constant")[surface] for a in range(3)],
                    axis=1) / count[:, None]
    cov = np.empty((len(count), 3, 3))
    for a in range(3):
        for b in range(a, 3):
            m = ndimage.correlate(s, d[a] * d[b], mode="constant")[surface] / count
            cov[:, a, b] = cov[:, b, a] = m - mean[:, a] * mean[:, b]
    spread, axes = np.linalg.eigh(cov)  # ascending: axes[..., 0] is the normal
    normal, major = axes[..., 0], axes[..., 2]
    normal *= np.where((normal * outward).sum(1) < 0, -1.0, 1.0)[:, None]
    major *= np.where(major @ np.array([1.0, 1e-3, 1e-6]) < 0, -1.0, 1.0)[:, None]
    frame = np.stack([major, np.cross(normal, major), normal], axis=2)  # columns x, y, z
    q = Rotation.from_matrix(frame).as_quat()  # (x, y, z, w)
    q = np.concatenate([q[:, 3:], q[:, :3]], axis=1)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    scale = np.clip(np.sqrt(np.clip(spread[:, ::-1], 0, None)), MIN_VOXEL_SCALE, None)
    alone = count < 3  # no plane or line to fit: a small round gaussian, as before
    q[alone], scale[alone] = (1.0, 0.0, 0.0, 0.0), VOXEL_SCALE
    return q.astype(np.float32), scale.astype(np.float32)


def voxels_to_gaussians(grid: np.ndarray, path: str = "<grid>", field: str | None = None
                        ) -> GaussianCloud:
    """Occupied surface voxels of a [D, H, W] occupancy grid to gaussians: each voxel's gaussian
    takes the shape of the surface around it (a disk on a wall or a table top, a needle along a
    chair leg: ``_surface_frames``), as a 3DGS fit of the surface would, and is shaded by a fixed
    light through the occupancy gradient so that rendered views show the shape."""
    occ = grid > 0
    if not occ.any():  # ModelNet10 as shipped has 34 of these
        raise GaussianFormatError(path, "empty occupancy grid (no voxel > 0); expected a shape",
                                  field=field)
    padded = np.pad(occ, 1)
    interior = np.ones_like(occ)
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    surface = occ & ~interior
    idx = np.argwhere(surface).astype(np.float32)
    grad = np.stack(np.gradient(padded.astype(np.float32)), axis=-1)[1:-1, 1:-1, 1:-1]
    normal = -grad[surface]
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-6
    light = np.array([0.4, 0.3, 0.85], np.float32)
    shade = 0.35 + 0.55 * np.clip(normal @ (light / np.linalg.norm(light)), 0, 1)
    n = len(idx)
    rotation, scale = _surface_frames(surface, normal)
    return GaussianCloud.from_activated(
        xyz=idx + 0.5, rgb=np.repeat(shade[:, None], 3, axis=1),
        opacity=np.full(n, 0.9, np.float32), scale=scale, rotation=rotation)


def _grid_prefix(url: str, root: str) -> str:
    return safe_key(posixpath.splitext(posixpath.relpath(url, root) if url != root
                                       else posixpath.basename(url))[0])


def _rejected(key: str, source: str, split: str, error: GaussianFormatError) -> Asset:
    """An asset known bad before loading: ingestion rejects it with ``error``."""
    def load() -> GaussianCloud:
        raise error

    return Asset(key=key, source=source, caption="", split=split, load=load)


def _unreadable_grids(url: str, root: str, error: GaussianFormatError) -> list[Asset]:
    """A grid file that cannot be used at all: one rejected asset that says why."""
    key = _grid_prefix(url, root)
    return [_rejected(key, url, hashed_split(key), error)]


def _grid_arrays(url: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The split arrays and class names of a grid file, checked: shapes, lengths, dtypes."""
    import zipfile

    try:
        data = np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise GaussianFormatError(url, "a single array; expected an .npz archive")
        missing = [k for k in ("X_train", "y_train", "X_test", "y_test")
                   if k not in data.files]
        if missing:
            raise GaussianFormatError(url, f"missing arrays {missing}; expected X_train, "
                                      "y_train, X_test, y_test", field=missing[0])
        arrays = {k: data[k] for k in ("X_train", "y_train", "X_test", "y_test")}
        names = [str(c) for c in data["classes"]] if "classes" in data.files else None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise GaussianFormatError(url, f"not a readable .npz ({type(exc).__name__}: {exc})"
                                  ) from None
    for split in ("train", "test"):
        X, y = arrays[f"X_{split}"], arrays[f"y_{split}"]
        if X.ndim != 4 or X.dtype.kind not in "biuf":
            raise GaussianFormatError(url, f"shape {X.shape} {X.dtype}; expected numeric "
                                      "[N, D, H, W] occupancy grids", field=f"X_{split}")
        if y.shape != (len(X),) or y.dtype.kind not in "iu":
            raise GaussianFormatError(url, f"shape {y.shape} {y.dtype}; expected {len(X)} "
                                      "integer labels, one per grid", field=f"y_{split}")
    if names is not None:
        return arrays, names
    top = max((int(arrays[k].max()) for k in ("y_train", "y_test") if len(arrays[k])),
              default=-1)
    if top >= len(MODELNET10_CLASSES):
        raise GaussianFormatError(url, "no 'classes' array and labels beyond ModelNet10's "
                                  "ten; expected class names", field="classes")
    return arrays, list(MODELNET10_CLASSES)


def _grid_assets(url: str, root: str, limit: int | None) -> list[Asset]:
    try:
        arrays, classes = _grid_arrays(url)
    except (GaussianFormatError, StorageError) as exc:
        error = exc if isinstance(exc, GaussianFormatError) else GaussianFormatError(
            url, str(exc))
        return _unreadable_grids(url, root, error)
    prefix = _grid_prefix(url, root)
    assets = []
    for split in ("train", "test"):
        X, y = arrays[f"X_{split}"], arrays[f"y_{split}"]
        index = np.arange(len(X))
        if limit is not None and limit < len(X):  # evenly spaced keeps the class balance
            index = np.unique(np.linspace(0, len(X) - 1, limit).round().astype(int))
        for i in index:
            where = f"{url}#{split}/{i}"
            if not 0 <= int(y[i]) < len(classes):  # this grid is rejected, not the file
                error = GaussianFormatError(where, f"label {int(y[i])}; expected 0.."
                                            f"{len(classes) - 1} ({len(classes)} classes)",
                                            field=f"y_{split}[{i}]")
                assets.append(_rejected(f"{prefix}_{split}_{i:05d}", where, split, error))
                continue
            label = classes[int(y[i])]

            def load(grid=X[i], where=where, field=f"X_{split}[{i}]") -> GaussianCloud:
                return voxels_to_gaussians(grid, where, field)

            assets.append(Asset(key=f"{prefix}_{split}_{i:05d}", source=where,
                                caption=PROMPT.format(class_text(label)), split=split,
                                load=load, label=label))
    return assets


def discover(source: str, limit: int | None = None, mesh_samples: int = 10_000) -> list[Asset]:
    """Every object in a folder, file or ``s3://`` prefix, sorted by key. Meshes are splatted
    with ``mesh_samples`` gaussians."""
    stats = list_stats(source)
    files = list(stats)
    single = len(files) == 1 and (files[0] == source or not is_s3(source) and
                                  os.path.normpath(files[0]) == os.path.normpath(source))
    root = (posixpath.dirname(files[0]) or ".") if single else source.rstrip("/")
    if single:  # one file: its object, with the sidecars its folder has for it
        assets = _object_assets({**list_stats(root, recursive=False), **stats}, root,
                                mesh_samples, only=files[0])
    else:
        assets = _object_assets(stats, root, mesh_samples)
    for f in files:
        if f.lower().endswith(".npz"):
            error = too_large(f, stats[f][0], MAX_FILE_BYTES)
            grids = _unreadable_grids(f, root, error) if error else _grid_assets(f, root, limit)
            for a in grids:
                a.version = _version(stats, [f])
            assets += grids
    seen: dict[str, str] = {}
    for a in assets:
        if a.key in seen:
            raise GaussianFormatError(a.source, f"same key '{a.key}' as {seen[a.key]}; rename "
                                      "one of them")
        seen[a.key] = a.source
    return sorted(assets, key=lambda a: a.key)
