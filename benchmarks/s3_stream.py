"""Streaming shards from S3 against streaming them from a local folder.

The same shards (``clipgs ingest`` of ../shared/data with ``--limit`` ModelNet10 shapes per
split) are read through the same webdataset pipeline (``clipgs.data.shards.iterate``: tar
stream, decode to arrays), once from a local folder (the anchor) and once from an S3-compatible
server on loopback (moto's server mode, real boto3 client through the ``s3`` gopen scheme).
Rounds alternate local and S3; medians are printed. Loopback S3 has no network latency, so this
measures the client path (boto3 streaming, HTTP, moto) - a real bucket adds latency that
several loader workers hide.

    .venv/bin/python -m benchmarks.s3_stream [--limit 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from clipgs.config import IngestConfig
from clipgs.data import shards, storage
from benchmarks._common import moto_server
from clipgs.data.ingest import ingest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def raw_get(urls: list[str]) -> float:
    """The server's ceiling: whole objects fetched, nothing decoded."""
    start = time.perf_counter()
    for url in urls:
        storage.read_bytes(url)
    return time.perf_counter() - start


def stream(urls: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    count = sum(1 for _ in shards.iterate(urls))
    return time.perf_counter() - start, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("clipgs").setLevel(logging.ERROR)
    proc, endpoint = moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp) / "shards")
            result = ingest(str(SHARED), local, IngestConfig(limit=args.limit, shard_size=32))
            storage.s3_client().create_bucket(Bucket="bench")
            for name in storage.list_files(local):
                storage.write_bytes(f"s3://bench/shards/{Path(name).name}",
                                    Path(name).read_bytes())
            manifest = result.manifest
            urls = {where: [u for s in ("train", "test")
                            for u in shards.shard_urls(base, manifest, s)]
                    for where, base in (("local", local), ("s3", "s3://bench/shards"))}
            megabytes = sum(s["bytes"] for sp in manifest["splits"].values()
                            for s in sp["shards"]) / 2**20
            times = {"local": [], "s3": []}
            raw = []
            for _ in range(args.rounds):
                for where in times:
                    seconds, count = stream(urls[where])
                    times[where].append(seconds)
                raw.append(raw_get(urls["s3"]))
            print(f"{count} samples in {len(urls['local'])} shards, {megabytes:.1f} MB")
            for where, t in times.items():
                med = statistics.median(t)
                print(f"{where:<6} {count / med:>8.0f} samples/s {megabytes / med:>8.1f} MB/s")
            print(f"s3 raw GET, no decoding (the loopback server's ceiling): "
                  f"{megabytes / statistics.median(raw):.1f} MB/s")
            ratio = statistics.median(times["local"]) / statistics.median(times["s3"])
            print(f"s3/local throughput: {ratio:.2f}x (goal >= 0.8x)")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
