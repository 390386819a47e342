"""Reading a whole 3DGS .ply (every attribute), ours against gsply side by side.

Ours: ``clipgs.data.formats.load_gaussians`` - header parsed and checked, body read into one
array, every field a view of it, plus what gsply does not do: a finiteness check of every value
and the quaternion-length check. The anchor: ``gsply.plyread`` (zero-copy views, no checks).
"body" is our read without the checks (``clipgs.data.ply.read_vertices``), to show where the
difference goes. Files: the real donut
(45.6k gaussians, SH 0) and a real SH-3 tile with normals from ../shared/data, and INRIA-layout
files of 200k (SH 3) and 1M (SH 0) gaussians written to a temporary folder. Calls alternate
(ours, body, gsply) so machine noise hits all alike; medians are printed.

    .venv/bin/python -m benchmarks.ply_read [--repeats 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import gsply
import numpy as np
from clipgs.data import ply
from clipgs.data.formats import load_gaussians, write_ply
from clipgs.data.gaussians import GaussianCloud

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gaussians"


def synthetic(path: Path, n: int, sh_rest: int) -> Path:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(n, 4)).astype(np.float32)
    write_ply(GaussianCloud(
        xyz=rng.normal(size=(n, 3)).astype(np.float32),
        f_dc=rng.normal(size=(n, 3)).astype(np.float32),
        opacity=rng.normal(size=n).astype(np.float32),
        scale=rng.normal(-4, 1, size=(n, 3)).astype(np.float32),
        rotation=q / np.linalg.norm(q, axis=1, keepdims=True),
        f_rest=rng.normal(size=(n, sh_rest)).astype(np.float32)), path)
    return path


def timed(fn, path) -> float:
    start = time.perf_counter()
    fn(path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    logging.getLogger("clipgs").setLevel(logging.ERROR)  # the donut's quaternion warning
    def body(path):
        return ply.read_vertices(str(path), ply.parse_header(ply.read_head(str(path)), "x"), "x")

    readers = {"ours": load_gaussians, "body": body, "gsply": gsply.plyread}
    with tempfile.TemporaryDirectory() as tmp:
        files = [SHARED / "donut.ply", SHARED / "gs3d_lod4_tile.ply",
                 synthetic(Path(tmp) / "200k_sh3.ply", 200_000, 45),
                 synthetic(Path(tmp) / "1m_sh0.ply", 1_000_000, 0)]
        print(f"{'file':<22}{'gaussians':>10}{'MB':>8}{'ours ms':>10}{'body ms':>10}"
              f"{'gsply ms':>10}{'ours/gsply':>12}{'body/gsply':>12}")
        for path in files:
            n = len(load_gaussians(path))
            times = {k: [] for k in readers}
            repeats = args.repeats if n < 500_000 else max(5, args.repeats // 4)
            for _ in range(repeats):
                for name, fn in readers.items():
                    times[name].append(timed(fn, path))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{path.name:<22}{n:>10,}{path.stat().st_size / 2**20:>8.1f}"
                  f"{med['ours']:>10.3f}{med['body']:>10.3f}{med['gsply']:>10.3f}"
                  f"{med['ours'] / med['gsply']:>11.2f}x{med['body'] / med['gsply']:>11.2f}x")


if __name__ == "__main__":
    main()
