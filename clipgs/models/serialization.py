"""Serialization of patch tokens along space-filling curves (method.md section 2.2).

The G patch centres are quantised to a 2^bits grid per axis and sorted by one of three codes:
``xyz`` (lexicographic x, then y, then z), ``z`` (Z-order / Morton: the axes' bits interleaved)
and ``hilbert`` (Skilling's transpose algorithm, "Programming the Hilbert curve", 2004).
Every code is a bijection of the grid onto [0, 2^(3 bits)), so sorting by it gives a
permutation of the tokens; Hilbert neighbours in code are face neighbours in space.

Why it matters at all: self-attention is permutation-equivariant and the CLS output does not
depend on token order, so the encoder only sees an order through the per-index embedding it
adds after sorting (and through patch dropout, which keeps the survivors in order).
"""

from __future__ import annotations

import torch

ORDERS = ("xyz", "z", "hilbert")
BITS = 10  # 1024 cells per axis: 30-bit codes, finer than any patch spacing at G <= 4096


def quantise(xyz: torch.Tensor, bits: int = BITS) -> torch.Tensor:
    """[..., 3] positions in [-1, 1] (the activated range) -> int64 cells in [0, 2^bits)."""
    cells = 1 << bits
    grid = ((xyz.detach().float() + 1.0) * 0.5 * cells).floor().long()
    return grid.clamp_(0, cells - 1)


def _interleave(axes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Bits of axes[0] most significant: (a0_b, a1_b, a2_b, a0_{b-1}, ...)."""
    code = torch.zeros_like(axes[0])
    n = len(axes)
    for b in range(bits):
        for i, a in enumerate(axes):
            code |= ((a >> b) & 1) << (n * b + (n - 1 - i))
    return code


def xyz_code(grid: torch.Tensor, bits: int = BITS) -> torch.Tensor:
    x, y, z = grid.unbind(-1)
    return (x << (2 * bits)) | (y << bits) | z


def morton_code(grid: torch.Tensor, bits: int = BITS) -> torch.Tensor:
    return _interleave(list(grid.unbind(-1)), bits)


def hilbert_code(grid: torch.Tensor, bits: int = BITS) -> torch.Tensor:
    """Skilling's AxestoTranspose, vectorised over every leading dimension."""
    x = [a.clone() for a in grid.unbind(-1)]
    n = len(x)
    q = 1 << (bits - 1)
    while q > 1:  # inverse undo of the excess work
        p = q - 1
        for i in range(n):
            on = (x[i] & q) != 0
            t = (x[0] ^ x[i]) & p
            x0_on = x[0] ^ p
            x0_off = x[0] ^ t
            xi_off = x[i] ^ t
            x[i] = torch.where(on, x[i], xi_off)
            x[0] = torch.where(on, x0_on, x0_off) if i else torch.where(on, x0_on, x[0])
        q >>= 1
    for i in range(1, n):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[n - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave([a ^ t for a in x], bits)


CODES = {"xyz": xyz_code, "z": morton_code, "hilbert": hilbert_code}


def serialize(centres: torch.Tensor, order: str, bits: int = BITS) -> torch.Tensor:
    """[B, G, 3] centres -> [B, G] permutation indices that sort each object's tokens."""
    if order not in CODES:
        raise ValueError(f"serialization order {order!r}; expected one of {ORDERS}")
    return CODES[order](quantise(centres, bits), bits).argsort(dim=-1, stable=True)
