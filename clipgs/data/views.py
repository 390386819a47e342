"""Rendered views of a gaussian object: alpha-composited, depth-sorted splatting in PyTorch.

Thin on purpose (see README): each gaussian is drawn as an isotropic 2D gaussian whose radius is
the geometric mean of its scales, under an orthographic camera on a ring around the object.
Fragments are sorted by (pixel, depth) and composited front to back in one vectorised pass.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch
from PIL import Image

from clipgs.data.gaussians import SLICES


def ring_cameras(k: int, elevation_deg: float = 20.0, offset_deg: float = 30.0) -> torch.Tensor:
    """[k, 3, 3] world-to-camera rotations for k cameras evenly spaced in azimuth."""
    out = []
    el = math.radians(elevation_deg)
    for i in range(k):
        az = math.radians(offset_deg + 360.0 * i / k)
        rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0],
                           [0, 0, 1]], dtype=torch.float32)
        rx = torch.tensor([[1, 0, 0], [0, math.cos(el), -math.sin(el)],
                           [0, math.sin(el), math.cos(el)]], dtype=torch.float32)
        # camera looks along +y after rotation; image x = world x, image up = world z
        out.append(rx @ rz)
    return torch.stack(out)


@torch.no_grad()
def render(points: np.ndarray | torch.Tensor, rotation: torch.Tensor, size: int = 64,
           background: float = 1.0, max_radius: int = 4) -> torch.Tensor:
    """Render activated gaussians [N, 14] (normalised to the unit ball) from one camera.

    Returns an image [size, size, 3] in [0, 1].
    """
    p = torch.as_tensor(points, dtype=torch.float32)
    xyz = p[:, SLICES["xyz"]] @ rotation.T
    rgb = p[:, SLICES["rgb"]]
    opacity = p[:, SLICES["opacity"]][:, 0]
    sigma_world = p[:, SLICES["scale"]].clamp_min(1e-6).log().mean(dim=1).exp()
    half = size / 2.0
    px = (xyz[:, 0] * 0.95 + 1.0) * half  # unit ball fills the frame with a small margin
    py = (1.0 - xyz[:, 2] * 0.95) * half
    depth = xyz[:, 1]
    sigma = (sigma_world * 0.95 * half).clamp(0.5, max_radius / 2.0)

    offs = torch.arange(-max_radius, max_radius + 1, dtype=torch.float32)
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    cx, cy = px.floor(), py.floor()
    fx = cx[:, None] + ox.reshape(1, -1)  # [N, W] pixel columns of each fragment
    fy = cy[:, None] + oy.reshape(1, -1)
    d2 = (fx + 0.5 - px[:, None]) ** 2 + (fy + 0.5 - py[:, None]) ** 2
    alpha = (opacity[:, None] * torch.exp(-0.5 * d2 / sigma[:, None] ** 2)).clamp(max=0.99)
    keep = (alpha > 1.0 / 255.0) & (fx >= 0) & (fx < size) & (fy >= 0) & (fy < size)
    gidx = torch.arange(len(p))[:, None].expand_as(fx)[keep]
    pix = (fy[keep] * size + fx[keep]).long()
    alpha = alpha[keep]
    if pix.numel() == 0:
        return torch.full((size, size, 3), background)

    # sort fragments by pixel, then front to back (smaller depth first)
    depth_rank = torch.empty_like(depth, dtype=torch.long)
    depth_rank[torch.argsort(depth)] = torch.arange(len(depth))
    order = torch.argsort(pix * len(p) + depth_rank[gidx])
    pix, alpha, gidx = pix[order], alpha[order], gidx[order]
    log_t = torch.log1p(-alpha)
    exclusive = torch.cumsum(log_t, 0) - log_t
    starts = torch.ones_like(pix, dtype=torch.bool)
    starts[1:] = pix[1:] != pix[:-1]
    seg = torch.cumsum(starts.long(), 0) - 1
    seg_base = exclusive[starts][seg]
    weight = alpha * torch.exp(exclusive - seg_base)

    image = torch.zeros(size * size, 3)
    image.index_add_(0, pix, weight[:, None] * rgb[gidx])
    coverage = torch.zeros(size * size).index_add_(0, pix, weight)
    image += (1.0 - coverage).clamp(0, 1)[:, None] * background
    return image.reshape(size, size, 3).clamp(0, 1)


@contextlib.contextmanager
def single_thread():
    """Rendering is many small ops: one intra-op thread is fastest, and on a busy machine
    OpenMP's spinning threads made it 10-25x slower (measured: 64 ms vs 4.5 ms a view)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def render_views(points: np.ndarray, k: int, size: int) -> list[np.ndarray]:
    """K views on a ring, as uint8 [size, size, 3] arrays."""
    with single_thread():
        return [(render(points, r, size) * 255).round().byte().numpy() for r in ring_cameras(k)]


def to_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def load_image(data: bytes, size: int) -> np.ndarray:
    """A PNG/JPEG as uint8 [size, size, 3], alpha composited on white."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
