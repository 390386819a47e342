"""Grouping for the GS tokenizer (method.md section 2.1): FPS picks G centres, kNN takes the k
nearest gaussians of each; neighbour positions become relative to their centre.

Two paths that give the same groups: a CPU path for data-loader workers (fpsample's exact bucket
FPS + scipy's cKDTree) and a batched torch path for the GPU. fpsample's bucket FPS picks its own
first centre (``start_idx`` indexes its kd-ordered points, not ours); given that first index,
the torch path picks the same centres in the same order.
"""

from __future__ import annotations

import fpsample
import numpy as np
import torch
from scipy.spatial import cKDTree

from clipgs.data.gaussians import SLICES

XYZ = SLICES["xyz"]


def fps_numpy(xyz: np.ndarray, groups: int) -> np.ndarray:
    """Exact farthest point sampling of [M, 3] -> [G] indices, in sampling order."""
    # the kd-line height: fpsample suggests 5-7, but measured here (benchmarks/tokenizer.py)
    # 5 is fastest for 10k points and 3 below 4k; the first centre depends on it
    height = 3 if len(xyz) < 4096 else 5
    height = max(1, min(height, int(np.log2(max(len(xyz), 2)))))
    # start_idx must be given: with None fpsample starts at a random point (nondeterministic
    # embeddings); with 0 its (kd-ordered) first centre is fixed.
    return fpsample.bucket_fps_kdline_sampling(np.ascontiguousarray(xyz, dtype=np.float32),
                                               groups, h=height, start_idx=0).astype(np.int64)


def group_numpy(points: np.ndarray, groups: int, group_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """[M, 14] -> patches [G, k, 14] (xyz relative to the centre), centres [G, 3]."""
    if len(points) < max(groups, group_size):
        raise ValueError(f"{len(points)} gaussians cannot make {groups} patches of "
                         f"{group_size}; resample to at least {max(groups, group_size)}")
    xyz = np.ascontiguousarray(points[:, XYZ], dtype=np.float32)
    centres = xyz[fps_numpy(xyz, groups)]
    # an unbalanced, non-compacted tree builds in about half the time and queries as fast
    tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
    _, nbr = tree.query(centres, k=group_size)
    patches = np.asarray(points, np.float32)[nbr]  # [G, k, 14], a copy
    patches[..., XYZ] -= centres[:, None, :]
    return patches, centres


def fps_torch(xyz: torch.Tensor, groups: int, start: int | torch.Tensor = 0) -> torch.Tensor:
    """Batched farthest point sampling: [B, M, 3] -> indices [B, G]; ``start`` is the first
    centre, one for all objects or one per object ([B])."""
    b, m, _ = xyz.shape
    idx = torch.empty(b, groups, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, m), float("inf"), device=xyz.device, dtype=xyz.dtype)
    farthest = torch.as_tensor(start, dtype=torch.long, device=xyz.device).expand(b).clone()
    rows = torch.arange(b, device=xyz.device)
    for i in range(groups):
        idx[:, i] = farthest
        centre = xyz[rows, farthest][:, None, :]
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        farthest = dist.argmax(dim=1)
    return idx


def group_torch(points: torch.Tensor, groups: int, group_size: int,
                start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched [B, M, 14] -> patches [B, G, k, 14], centres [B, G, 3] (the GPU path). Given
    ``start`` = each object's ``fps_numpy(xyz, G)[0]``, the groups are group_numpy's."""
    xyz = points[..., XYZ]
    rows = torch.arange(points.shape[0], device=points.device)[:, None]
    centres = xyz[rows, fps_torch(xyz, groups, start)]
    nbr = torch.cdist(centres, xyz).topk(group_size, dim=-1, largest=False).indices
    patches = points[rows[..., None], nbr].clone()
    patches[..., XYZ] -= centres[:, :, None, :]
    return patches, centres
