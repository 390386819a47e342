"""Ingestion rate in objects per second, with its breakdown (read, resample, render, teacher,
write), on the real files of ../shared/data: the 16 .ply/.splat objects plus ModelNet10 grids
(``--limit`` per split). The anchor is the same ingestion inline (``workers=0``: one process
reads, renders and runs the teacher in turn); the measured run makes triplets in
``--workers`` forked processes while the main process runs the teacher. Both write to fresh
temporary folders, so nothing is skipped.

    .venv/bin/python -m benchmarks.ingest [--limit 60] [--workers 1] [--points 1024] [--views 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from clipgs.config import IngestConfig
from clipgs.data.ingest import STAGES, ingest
from clipgs.models.teacher import Teacher

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run(config: IngestConfig, teacher: Teacher) -> tuple[float, int, dict]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = ingest(str(SHARED), out, config, teacher=teacher)
        seconds = time.perf_counter() - start
    m = result.manifest
    count = m["splits"]["train"]["count"] + m["splits"]["test"]["count"] + m["rejected"]
    return seconds, count, m["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=60, help="ModelNet10 shapes per split")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args(argv)
    logging.getLogger("clipgs").setLevel(logging.ERROR)
    teacher = Teacher()
    base = dict(limit=args.limit, points=args.points, views=args.views, shard_size=64)
    run(IngestConfig(workers=0, **dict(base, limit=2)), teacher)  # warm-up: compile, caches
    rows = {}
    for name, workers in (("inline (anchor)", 0), (f"{args.workers} worker(s)", args.workers)):
        rows[name] = run(IngestConfig(workers=workers, **base), teacher)
    print(f"{'run':<18}{'objects':>8}{'seconds':>9}{'obj/s':>8}  "
          + "".join(f"{s:>9}" for s in STAGES) + "   (share of stage seconds)")
    for name, (seconds, count, stages) in rows.items():
        total = sum(stages.values()) or 1.0
        print(f"{name:<18}{count:>8}{seconds:>9.1f}{count / seconds:>8.1f}  "
              + "".join(f"{stages[s] / total:>9.0%}" for s in STAGES))
    (a, n, _), (b, _, _) = rows.values()
    print(f"workers/inline rate: {a / b:.2f}x  ({n} objects, {args.points} gaussians, "
          f"{args.views} views each; stage seconds are summed over processes)")


if __name__ == "__main__":
    main()
