"""The one gaussian container, its attribute layout and activations (method.md section 1).

Everything that reads, writes or feeds the model imports the layout from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SH_C0 = 0.28209479177387814  # the degree-0 spherical-harmonic constant

# The 14 activated attributes the model sees, in this order.
ATTRIBUTES: tuple[tuple[str, int], ...] = (
    ("xyz", 3),  # centred on the centroid, farthest point at norm 1
    ("rgb", 3),  # clamp(0.5 + SH_C0 * f_dc, 0, 1)
    ("opacity", 1),  # sigmoid(logit)
    ("scale", 3),  # exp(log scale) / the position normalisation factor
    ("rotation", 4),  # unit quaternion (w, x, y, z)
)
NUM_ATTRIBUTES = sum(width for _, width in ATTRIBUTES)  # 14


def _slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, width in ATTRIBUTES:
        out[name] = slice(start, start + width)
        start += width
    return out


SLICES: dict[str, slice] = _slices()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p / (1.0 - p))


def rgb_to_sh0(rgb: np.ndarray) -> np.ndarray:
    return (rgb - 0.5) / SH_C0


@dataclass
class GaussianCloud:
    """N gaussians with their raw (stored) parameters, as INRIA's .ply keeps them.

    ``f_rest`` holds the higher-order SH coefficients (0, 9, 24 or 45 per gaussian) in the
    .ply's field order; they are kept for lossless writing but not fed to the model.
    """

    xyz: np.ndarray  # [N, 3] float32
    f_dc: np.ndarray  # [N, 3] float32, SH degree 0
    opacity: np.ndarray  # [N] float32, logit
    scale: np.ndarray  # [N, 3] float32, log scale
    rotation: np.ndarray  # [N, 4] float32, (w, x, y, z), not necessarily unit
    f_rest: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    normals: np.ndarray | None = None  # [N, 3] if the file had them; ignored by the model

    def __post_init__(self) -> None:
        n = len(self.xyz)
        if self.f_rest.size == 0:
            self.f_rest = np.zeros((n, 0), np.float32)

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def sh_degree(self) -> int:
        return {0: 0, 9: 1, 24: 2, 45: 3}.get(self.f_rest.shape[1], -1)

    def subset(self, index: np.ndarray) -> "GaussianCloud":
        return GaussianCloud(
            xyz=self.xyz[index],
            f_dc=self.f_dc[index],
            opacity=self.opacity[index],
            scale=self.scale[index],
            rotation=self.rotation[index],
            f_rest=self.f_rest[index],
            normals=None if self.normals is None else self.normals[index],
        )

    @classmethod
    def from_activated(
        cls, xyz: np.ndarray, rgb: np.ndarray, opacity: np.ndarray, scale: np.ndarray,
        rotation: np.ndarray,
    ) -> "GaussianCloud":
        """Build from activated values (linear scale, rgb in [0,1], opacity in (0,1))."""
        return cls(
            xyz=np.asarray(xyz, np.float32),
            f_dc=rgb_to_sh0(np.asarray(rgb, np.float32)).astype(np.float32),
            opacity=logit(np.asarray(opacity, np.float32)).astype(np.float32),
            scale=np.log(np.maximum(np.asarray(scale, np.float32), 1e-12)).astype(np.float32),
            rotation=np.asarray(rotation, np.float32),
        )

    def activated(self) -> np.ndarray:
        """[N, 14] float32 as the model sees it: normalised positions and scales, rgb, opacity,
        unit quaternions (method.md section 1)."""
        xyz = self.xyz.astype(np.float64)
        centre = xyz.mean(axis=0)
        xyz = xyz - centre
        radius = float(np.sqrt((xyz**2).sum(axis=1)).max()) if len(xyz) else 1.0
        factor = radius if radius > 0 else 1.0
        out = np.empty((len(self), NUM_ATTRIBUTES), np.float32)
        out[:, SLICES["xyz"]] = xyz / factor
        out[:, SLICES["rgb"]] = np.clip(0.5 + SH_C0 * self.f_dc, 0.0, 1.0)
        out[:, SLICES["opacity"]] = sigmoid(self.opacity.astype(np.float64))[:, None]
        out[:, SLICES["scale"]] = np.exp(self.scale.astype(np.float64)) / factor
        q = self.rotation.astype(np.float64)
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        out[:, SLICES["rotation"]] = np.where(norm > 0, q / np.maximum(norm, 1e-12), [1, 0, 0, 0])
        return out


def resample(
    points: np.ndarray, count: int, rng: np.random.Generator, opacity_weighted: bool = True
) -> np.ndarray:
    """Resample activated gaussians [N, 14] to exactly ``count`` rows (method.md section 1):
    opacity-weighted subsampling without replacement when N > count, repetition when N < count.
    """
    n = len(points)
    if n == 0:
        raise ValueError("cannot resample zero gaussians")
    if n == count:
        return points
    if n > count:
        p = None
        if opacity_weighted:
            w = points[:, SLICES["opacity"]][:, 0].astype(np.float64) + 1e-6
            p = w / w.sum()
        index = rng.choice(n, size=count, replace=False, p=p)
    else:
        index = np.concatenate([np.arange(n), rng.choice(n, size=count - n, replace=True)])
    return points[np.sort(index)]
