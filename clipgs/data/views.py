"""Rendered views of a gaussian object: alpha-composited, depth-sorted splatting in PyTorch.

Each gaussian's covariance is projected to the image (EWA splatting) under an orthographic
camera on a ring around the object; fragments are sorted by (pixel, depth) and composited front
to back in one vectorised pass. On a GPU with ``gsplat`` installed, :func:`render_views` uses
gsplat's rasteriser instead (same cameras, orthographic).
"""

from __future__ import annotations

import contextlib
import io
import math
import os

import numpy as np
import torch
from PIL import Image

from clipgs.data.axes import UP_AXES, parse_up
from clipgs.data.gaussians import SLICES


def up_rotation(up: str) -> torch.Tensor:
    """[3, 3] proper rotation taking the axis ``up`` (one of ``UP_AXES``) to world +z, by the
    shortest turn (a half-turn about x for -z)."""
    axis = parse_up(up)
    if axis is None:
        raise ValueError(f"up axis {up!r}; expected one of {', '.join(UP_AXES)}")
    a = torch.zeros(3)
    a["xyz".index(axis[1])] = 1.0 if axis[0] == "+" else -1.0
    z = torch.tensor([0.0, 0.0, 1.0])
    if torch.equal(a, z):
        return torch.eye(3)
    if torch.equal(a, -z):
        return torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    k = torch.linalg.cross(a, z)  # unit: a is orthogonal to z here; turn by 90 degrees about k
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return torch.eye(3) + kx + kx @ kx


def ring_cameras(k: int, elevation_deg: float = 20.0, offset_deg: float = 30.0,
                 up: str = "+z") -> torch.Tensor:
    """[k, 3, 3] object-to-camera rotations for k cameras evenly spaced in azimuth around the
    object's ``up`` axis, looking 20 degrees down at it."""
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
    return torch.stack(out) @ up_rotation(up)


def quaternion_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (w, x, y, z) [N, 4] -> rotation matrices [N, 3, 3]."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).view(-1, 3, 3)


@torch.no_grad()
def render(points: np.ndarray | torch.Tensor, rotation: torch.Tensor, size: int = 64,
           background: float = 1.0, max_radius: int | None = None,
           accumulate: torch.dtype = torch.float64) -> torch.Tensor:
    """Render activated gaussians [N, 14] (normalised to the unit ball) from one camera.

    Each gaussian's 3D covariance R S S^T R^T is projected to the image (EWA splatting under an
    orthographic camera, plus 3DGS's 0.3 px^2 low-pass), so flat splats look flat. Footprints
    are cut at ``max_radius`` pixels, and a splat wider than that is narrowed to fit; by
    default it grows with the image (4 px at 64 px, 14 at 224) - a fixed 4 px thinned every
    splat of an object at CLIP's 224 px to speckles. ``accumulate``: see :func:`composite`.
    Returns an image [size, size, 3] in [0, 1].
    """
    if max_radius is None:
        max_radius = max(4, round(4 * size / 64))
    p = torch.as_tensor(points, dtype=torch.float32)
    xyz = p[:, SLICES["xyz"]] @ rotation.T
    rgb = p[:, SLICES["rgb"]]
    opacity = p[:, SLICES["opacity"]][:, 0]
    half = size / 2.0
    px = (xyz[:, 0] * 0.95 + 1.0) * half  # unit ball fills the frame with a small margin
    py = (1.0 - xyz[:, 2] * 0.95) * half
    depth = xyz[:, 1]
    # image-plane covariance: rows x and z of the camera frame, in pixels
    m = rotation[[0, 2]] @ quaternion_matrix(p[:, SLICES["rotation"]])  # [N, 2, 3]
    m = m * p[:, None, SLICES["scale"]] * (0.95 * half)
    cov = m @ m.transpose(1, 2)
    # the image's z row points down: flip the sign of the off-diagonal term
    a, b, c = cov[:, 0, 0], -cov[:, 0, 1], cov[:, 1, 1]
    biggest = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
    shrink = ((max_radius / 2.0) ** 2 / biggest.clamp_min(1e-12)).clamp(max=1.0)
    a, b, c = a * shrink + 0.3, b * shrink, c * shrink + 0.3
    det = a * c - b * b
    ia, ib, ic = c / det, -b / det, a / det  # the conic (inverse covariance)

    offs = torch.arange(-max_radius, max_radius + 1, dtype=torch.float32)
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    cx, cy = px.floor(), py.floor()
    fx = cx[:, None] + ox.reshape(1, -1)  # [N, W] pixel columns of each fragment
    fy = cy[:, None] + oy.reshape(1, -1)
    dx, dy = fx + 0.5 - px[:, None], fy + 0.5 - py[:, None]
    power = ia[:, None] * dx * dx + 2 * ib[:, None] * dx * dy + ic[:, None] * dy * dy
    alpha = (opacity[:, None] * torch.exp(-0.5 * power)).clamp(max=0.99)
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
    pix, gidx = pix[order], gidx[order]
    return composite(pix, alpha[order], rgb[gidx], size, background, accumulate)


def composite(pix: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor, size: int,
              background: float = 1.0, accumulate: torch.dtype = torch.float64) -> torch.Tensor:
    """Front-to-back alpha compositing of fragments sorted by pixel, then depth, in one pass:
    each fragment's weight is its alpha times the transmittance of the fragments in front of it,
    exp(sum of log(1 - alpha)), from one cumulative sum over all fragments minus its pixel's
    start. That sum runs over every fragment of the image (4.3 million in a 224 px view of the
    shared donut), so it is taken in float64 (``accumulate``): in float32, the renderer before
    stop 32 and the anchor of ``benchmarks.compositing``, its rounding error grew with the
    running total and left pixels several levels of 255 off. Returns [size, size, 3]."""
    log_t = torch.log1p(-alpha)
    exclusive = torch.cumsum(log_t, 0, dtype=accumulate) - log_t
    starts = torch.ones_like(pix, dtype=torch.bool)
    starts[1:] = pix[1:] != pix[:-1]
    seg = torch.cumsum(starts.long(), 0) - 1
    # within a pixel the sum is small again: the rest runs in float32
    weight = alpha * torch.exp((exclusive - exclusive[starts][seg]).float())

    image = torch.zeros(size * size, 3)
    image.index_add_(0, pix, weight[:, None] * colour)
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


def gsplat_available() -> bool:
    """gsplat's CUDA rasteriser is used when a GPU and the package are there, unless
    CLIPGS_RENDERER=torch asks for the CPU renderer."""
    if os.environ.get("CLIPGS_RENDERER", "auto") == "torch" or not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def render_gsplat(points: np.ndarray, cameras: torch.Tensor, size: int,
                  background: float = 1.0) -> torch.Tensor:
    """The same ring cameras through gsplat (orthographic): [K, size, size, 3] in [0, 1].
    Not exercised by the CPU test suite; see the README."""
    from gsplat import rasterization

    dev = torch.device("cuda")
    p = torch.as_tensor(points, dtype=torch.float32, device=dev)
    # our camera frame is (x right, y forward, z up); gsplat's is OpenCV's (x right, y down,
    # z forward), with the object pushed in front of the camera
    to_cv = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]], device=dev)
    k = len(cameras)
    view = torch.eye(4, device=dev).repeat(k, 1, 1)
    view[:, :3, :3] = to_cv @ cameras.to(dev)
    view[:, 2, 3] = 3.0
    f, c = 0.95 * size / 2.0, size / 2.0
    intrinsics = torch.tensor([[f, 0, c], [0, f, c], [0, 0, 1]], device=dev).repeat(k, 1, 1)
    colours, _, _ = rasterization(
        p[:, SLICES["xyz"]], p[:, SLICES["rotation"]], p[:, SLICES["scale"]],
        p[:, SLICES["opacity"]][:, 0], p[:, SLICES["rgb"]], view, intrinsics, size, size,
        camera_model="ortho", backgrounds=torch.full((k, 3), background, device=dev))
    return colours.clamp(0, 1).cpu()


def render_views(points: np.ndarray, k: int, size: int, up: str = "+z") -> list[np.ndarray]:
    """K views on a ring around the object's ``up`` axis, as uint8 [size, size, 3] arrays."""
    cameras = ring_cameras(k, up=up)
    if gsplat_available():
        return list((render_gsplat(points, cameras, size) * 255).round().byte().numpy())
    with single_thread():
        return [(render(points, r, size) * 255).round().byte().numpy() for r in cameras]


def to_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def load_image(data: bytes, size: int) -> np.ndarray:
    """A PNG/JPEG as uint8 [size, size, 3], alpha composited on white."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: to 8 bits, not clipped
        img = Image.fromarray((np.asarray(img, np.float64) / 257.0).clip(0, 255).astype(
            np.uint8))
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
