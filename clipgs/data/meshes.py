"""Meshes to gaussians by direct surface splatting (method.md section 6): area-uniform surface
samples, one flat gaussian per sample oriented to the face normal, coloured from the mesh -
vertex colours (interpolated), face colours, a texture (sampled at the interpolated UV, times
the material's base colour) or the material's colour.

Meshes are read by trimesh from bytes, so they come from a folder or ``s3://`` alike; the files
a mesh names (an .obj's .mtl and textures, a .gltf's buffers) are fetched from beside it.
"""

from __future__ import annotations

import io
import os
import posixpath

import numpy as np

from clipgs.data.gaussians import GaussianCloud
from clipgs.errors import GaussianFormatError

GREY = np.array([0.6, 0.6, 0.6], np.float32)
OPACITY = 0.95
THICKNESS = 0.1  # a splat's thickness relative to its radius: flat disks on the surface
MAX_FACES = 20_000_000


def quaternion_z_to(normals: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z) that rotate +z onto each unit normal."""
    n = normals / (np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12)
    q = np.stack([1.0 + n[:, 2], -n[:, 1], n[:, 0], np.zeros(len(n))], axis=1)
    flipped = q[:, 0] < 1e-6  # normal is -z: any half-turn about a horizontal axis
    q[flipped] = [0.0, 1.0, 0.0, 0.0]
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform samples: (points [count, 3], face index [count], barycentric [count, 3])."""
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    points = np.einsum("nk,nkd->nd", bary, tri[face])
    return points, face, bary


def _texture_colour(material, uv: np.ndarray) -> np.ndarray | None:
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    factor = getattr(material, "baseColorFactor", None)
    factor = np.asarray(factor, np.float32)[:3] / 255.0 if factor is not None else None
    if image is None:  # no texture: the factor if any, else the material's colour (OBJ's Kd)
        return None if factor is None else np.broadcast_to(factor, (len(uv), 3))
    if factor is None:
        factor = np.ones(3, np.float32)
    pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
    h, w = pixels.shape[:2]
    u = np.mod(uv[:, 0], 1.0) * (w - 1)
    v = (1.0 - np.mod(uv[:, 1], 1.0)) * (h - 1)  # UV origin is bottom-left, images top-left
    return pixels[v.round().astype(int), u.round().astype(int)] * factor


def surface_colours(mesh, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """[count, 3] in [0, 1] from whatever colour the mesh carries; grey if none."""
    visual = mesh.visual
    tri = mesh.faces[face]
    if visual.kind == "texture":
        uv = getattr(visual, "uv", None)
        material = getattr(visual, "material", None)
        if uv is not None and len(uv) == len(mesh.vertices) and material is not None:
            colour = _texture_colour(material, np.einsum("nk,nkd->nd", bary, uv[tri]))
            if colour is not None:
                return colour
        if material is not None and hasattr(material, "main_color"):
            return np.broadcast_to(np.asarray(material.main_color, np.float32)[:3] / 255.0,
                                   (len(face), 3))
    elif visual.kind == "vertex":
        vc = np.asarray(visual.vertex_colors, np.float32)[:, :3] / 255.0
        return np.einsum("nk,nkd->nd", bary, vc[tri])
    elif visual.kind == "face":
        return np.asarray(visual.face_colors, np.float32)[face, :3] / 255.0
    return np.broadcast_to(GREY, (len(face), 3))


def mesh_to_gaussians(mesh, count: int, rng: np.random.Generator,
                      rgb: np.ndarray | None = None, thickness: float = THICKNESS
                      ) -> GaussianCloud:
    """``count`` flat gaussians on one ``trimesh.Trimesh``; colour ``rgb`` (one colour) or the
    mesh's own."""
    return meshes_to_gaussians([mesh], count, rng, rgb, thickness)


def meshes_to_gaussians(meshes: list, count: int, rng: np.random.Generator,
                        rgb: np.ndarray | None = None, thickness: float = THICKNESS,
                        path: str = "<mesh>") -> GaussianCloud:
    """``count`` samples over several meshes (a scene's parts), spread by surface area."""
    meshes = [m for m in meshes if len(getattr(m, "faces", ())) and m.area > 0]
    if not meshes:
        raise GaussianFormatError(path, "no triangles with area; expected a surface mesh",
                                  field="faces")
    areas = np.array([m.area for m in meshes])
    total = float(areas.sum())
    if not np.isfinite(total):
        raise GaussianFormatError(path, "non-finite vertex positions (NaN/Inf)",
                                  field="vertices")
    # largest-remainder split of the samples across parts
    share = areas / total * count
    per = np.floor(share).astype(int)
    per[np.argsort(share - per)[::-1][: count - per.sum()]] += 1
    spacing = np.sqrt(total / count)  # disks of about the sample spacing cover the surface
    parts = []
    for mesh, n in zip(meshes, per):
        if n == 0:
            continue
        points, face, bary = sample_surface(np.asarray(mesh.vertices, np.float64),
                                            np.asarray(mesh.faces), int(n), rng)
        colour = (np.broadcast_to(np.asarray(rgb, np.float32), (int(n), 3)) if rgb is not None
                  else surface_colours(mesh, face, bary))
        parts.append((points, mesh.face_normals[face], colour))
    points = np.concatenate([p[0] for p in parts])
    normals = np.concatenate([p[1] for p in parts])
    colours = np.concatenate([p[2] for p in parts])
    scale = np.tile([spacing, spacing, spacing * thickness], (count, 1)).astype(np.float32)
    return GaussianCloud.from_activated(
        xyz=points.astype(np.float32), rgb=colours, opacity=np.full(count, OPACITY, np.float32),
        scale=scale, rotation=quaternion_z_to(normals))


def _resolver(path: str):
    """trimesh resolver that fetches the files a mesh names from beside it (folder or s3)."""
    import trimesh

    from clipgs.data import storage

    class StorageResolver(trimesh.resolvers.Resolver):
        def __init__(self, base: str):
            self.base = base

        def get(self, name: str) -> bytes:
            # only files beside the mesh (or below it): a mesh from an untrusted source must
            # not make ingestion read /etc/... or another tenant's prefix into a shard
            clean = name.replace("\\", "/")
            if clean.startswith("/") or ":" in clean or ".." in clean.split("/"):
                raise GaussianFormatError(path, f"names the resource {name!r}; expected a "
                                          "relative path inside the mesh's folder",
                                          field="uri")
            return storage.read_bytes(storage.join(self.base, clean))

        def keys(self):
            return iter(())

        def write(self, name, data):
            raise NotImplementedError("read only")

        def namespaced(self, namespace: str):
            return StorageResolver(storage.join(self.base, namespace))

    base = posixpath.dirname(path) if storage.is_s3(path) else os.path.dirname(
        path.removeprefix("file://"))
    return StorageResolver(base)


def load_mesh_gaussians(data: bytes, path: str, count: int, seed: int = 0) -> GaussianCloud:
    """A mesh file's bytes (.obj, .glb, .gltf, .stl, .off, .ply with faces) -> ``count``
    surface splats."""
    import trimesh

    from clipgs.data.formats import file_suffix

    suffix = file_suffix(path).lstrip(".")
    try:
        loaded = trimesh.load(io.BytesIO(data), file_type=suffix, resolver=_resolver(path),
                              process=False)
    except Exception as exc:  # trimesh's loaders raise many types on bad files
        raise GaussianFormatError(path, f"not a readable .{suffix} mesh ({type(exc).__name__}: "
                                  f"{exc})") from None
    meshes = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    meshes = [m for m in meshes if isinstance(m, trimesh.Trimesh)]
    faces = sum(len(m.faces) for m in meshes)
    if faces > MAX_FACES:
        raise GaussianFormatError(path, f"{faces:,} faces, over the limit of {MAX_FACES:,}",
                                  field="faces")
    return meshes_to_gaussians(meshes, count, np.random.default_rng(seed), path=path)
