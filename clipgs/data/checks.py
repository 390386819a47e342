"""Checks over a float32 body [N, P] in compiled loops: any NaN/Inf, zero and off-unit
quaternions.

numpy needs a temporary per operation over the strided quaternion columns; these loops read
each value once and vectorise (``python -m benchmarks.ply_read``: the "ours" column less the
"body" one is what they cost). They compile on first use (cached on disk where the package
folder is writable, else once per process).
"""

from __future__ import annotations

import numba
import numpy as np

FLOAT32_MAX = np.float32(3.4028235e38)


def _jit(fn):
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location (read-only install)
        return numba.njit(nogil=True)(fn)


@_jit
def _all_finite(flat):
    bad = 0
    for k in range(flat.size):  # no early exit: the loop vectorises
        bad |= not (abs(flat[k]) <= FLOAT32_MAX)  # false for NaN and Inf
    return bad == 0


@_jit
def _quaternions(body, r0, lo, hi):
    zero = 0
    off = 0
    for i in range(body.shape[0]):
        a, b, c, d = body[i, r0], body[i, r0 + 1], body[i, r0 + 2], body[i, r0 + 3]
        q = a * a + b * b + c * c + d * d
        zero += q == 0.0
        off += (q < lo) | (q > hi)
    return zero, off


def scan(body: np.ndarray, rot_column: int, tolerance: float) -> tuple[bool, int, int]:
    """(all values finite, zero-length quaternions, quaternions off unit length by more than
    ``tolerance``) of a C-contiguous float32 [N, P] body whose quaternion starts at
    ``rot_column``."""
    finite = bool(_all_finite(body.reshape(-1)))
    zero, off = _quaternions(body, rot_column, (1 - tolerance) ** 2, (1 + tolerance) ** 2)
    return finite, int(zero), int(off)
