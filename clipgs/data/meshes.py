"""Meshes to gaussians by direct surface splatting (method.md section 6): area-uniform surface
samples, one flat gaussian per sample oriented to the face normal, coloured from the mesh."""

from __future__ import annotations

import numpy as np

from clipgs.data.gaussians import GaussianCloud


def quaternion_z_to(normals: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z) that rotate +z onto each unit normal."""
    n = normals / (np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12)
    q = np.stack([1.0 + n[:, 2], -n[:, 1], n[:, 0], np.zeros(len(n))], axis=1)
    flipped = q[:, 0] < 1e-6  # normal is -z: any half-turn about a horizontal axis
    q[flipped] = [0.0, 1.0, 0.0, 0.0]
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def mesh_to_gaussians(mesh, count: int, rng: np.random.Generator,
                      rgb: np.ndarray | None = None, thickness: float = 0.1) -> GaussianCloud:
    """``count`` flat gaussians on a ``trimesh.Trimesh``; colour from ``rgb`` (one colour) or the
    mesh's face colours."""
    import trimesh

    points, faces = trimesh.sample.sample_surface(mesh, count, seed=int(rng.integers(2**31)))
    normals = mesh.face_normals[faces]
    spacing = np.sqrt(mesh.area / count)  # disks of about the sample spacing cover the surface
    if rgb is None:
        colours = np.asarray(mesh.visual.face_colors, np.float32)[faces, :3] / 255.0
    else:
        colours = np.broadcast_to(np.asarray(rgb, np.float32), (count, 3))
    scale = np.tile([spacing, spacing, spacing * thickness], (count, 1)).astype(np.float32)
    return GaussianCloud.from_activated(
        xyz=points.astype(np.float32), rgb=colours, opacity=np.full(count, 0.95, np.float32),
        scale=scale, rotation=quaternion_z_to(normals))
