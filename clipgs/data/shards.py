"""webdataset shards: the sample layout, writing a shard whole, the manifest, and reading.

A sample is ``{key}.gaussians.npy`` (float32 [M, 14], activated), ``{key}.views.npy`` (uint8
[K, H, W, 3]), ``{key}.img_emb.npy`` (float16 [K, D]), ``{key}.txt_emb.npy`` (float16 [D]) and
``{key}.json`` (caption, label, split, source). Decoding never unpickles: only ``.npy`` with
``allow_pickle=False`` and JSON are read.
"""

from __future__ import annotations

import hashlib
import io
import os
import json
import queue
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from clipgs.data import storage
from clipgs.errors import StorageError, TeacherMismatchError

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
FORMAT_VERSION = 1


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# a sample's arrays: (shape from (points, views, image size, embedding width), dtype)
LAYOUT = {
    "gaussians.npy": (lambda m, k, s, d: (m, 14), np.float32),
    "views.npy": (lambda m, k, s, d: (k, s, s, 3), np.uint8),
    "img_emb.npy": (lambda m, k, s, d: (k, d), np.float16),
    "txt_emb.npy": (lambda m, k, s, d: (d,), np.float16),
}
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK  # header + data padded to whole blocks


class SampleSizer:
    """The exact bytes a sample takes in a shard, before it is made: every array's shape follows
    from (points, views, image size, embedding width), and the JSON from the asset. Ingestion
    packs shards by bytes with it (``shard_mb``) while still planning every shard up front."""

    def __init__(self, points: int, views: int, image_size: int, dim: int):
        self.arrays = sum(_member_bytes(len(npy_bytes(np.zeros(shape(points, views, image_size,
                                                                     dim), dtype))))
                          for shape, dtype in LAYOUT.values())

    def __call__(self, meta: dict) -> int:
        return self.arrays + _member_bytes(len(json.dumps(meta).encode()))


def tar_size(member_bytes: int) -> int:
    """A USTAR tar's size from its members' (``SampleSizer``) bytes: two zero blocks end it,
    and it is padded to whole records (as ``tarfile`` writes it)."""
    return -(-(member_bytes + 2 * _BLOCK) // _RECORD) * _RECORD


def encode_sample(key: str, gaussians: np.ndarray, views: np.ndarray, img_emb: np.ndarray,
                  txt_emb: np.ndarray, meta: dict) -> dict[str, bytes]:
    arrays = dict(zip(LAYOUT, (gaussians, views, img_emb, txt_emb)))
    sample = {f"{key}.{ext}": npy_bytes(arrays[ext].astype(dtype))
              for ext, (_, dtype) in LAYOUT.items()}
    sample[f"{key}.json"] = json.dumps(meta).encode()
    return sample


def tar_bytes(members: list[dict[str, bytes]]) -> bytes:
    """A tar of samples, members in order (webdataset groups consecutive files by key)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in members:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_sample(sample: dict) -> dict:
    """webdataset's raw sample (bytes per extension) -> numpy arrays and metadata."""
    out = {"key": sample["__key__"]}
    for ext in LAYOUT:
        if ext not in sample:
            raise StorageError(f"{sample.get('__url__', '?')}: sample {sample['__key__']} "
                               f"has no '{ext}'")
        out[ext[:-4]] = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    out["meta"] = json.loads(sample["json"])
    return out


def read_manifest(dataset: str) -> dict:
    url = storage.join(dataset, MANIFEST)
    if not storage.exists(url):
        raise StorageError(f"{url}: no manifest - ingestion has not finished for {dataset} "
                           "(run `clipgs ingest` first)")
    manifest = json.loads(storage.read_bytes(url))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"{url}: format_version {manifest.get('format_version')}; expected "
                           f"{FORMAT_VERSION}")
    return manifest


def manifest_checksum(manifest: dict) -> str:
    return sha256(json.dumps(manifest, sort_keys=True).encode())


def training_data_identity(manifest: dict) -> str:
    """What a training run's data is, by content: its training shards (names, counts,
    checksums). Unlike ``manifest_checksum`` it stays the same when a re-ingestion that
    changed nothing rewrites the manifest (new time, stage seconds)."""
    shards = [{k: s.get(k) for k in ("name", "count", "sha256")}
              for s in manifest["splits"].get("train", {}).get("shards", [])]
    return sha256(json.dumps([shards, manifest["teacher"]["sha256"]]).encode())


def shard_urls(dataset: str, manifest: dict, split: str) -> list[str]:
    shards = manifest["splits"].get(split, {}).get("shards", [])
    return [storage.join(dataset, s["name"]) for s in shards if s["count"] > 0]


def check_teacher(manifest: dict, teacher_identity: dict, dataset: str) -> None:
    if manifest["teacher"]["sha256"] != teacher_identity["sha256"]:
        raise TeacherMismatchError(
            f"{dataset} was ingested with teacher sha256 {manifest['teacher']['sha256'][:12]}, "
            f"the model expects {teacher_identity['sha256'][:12]}; re-ingest with the same "
            "teacher")


class _ReadAhead(io.RawIOBase):
    """botocore's StreamingBody as a raw stream that a thread reads ahead of the consumer in
    large chunks, for shards too large to hold: tarfile asks for a few KB at a time, and each
    small read of the HTTP body costs (``CLIPGS_S3_WHOLE_MB=0 python -m benchmarks.s3_stream``
    measures this path)."""

    def __init__(self, body, chunk: int, depth: int = 4):
        self.body, self.chunk = body, chunk
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pending = memoryview(b"")
        self.stop = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _put(self, item) -> None:
        while not self.stop.is_set():  # a closed reader never leaves this thread blocked
            try:
                return self.queue.put(item, timeout=0.2)
            except queue.Full:
                continue

    def _pump(self) -> None:
        try:
            while not self.stop.is_set():
                data = self.body.read(self.chunk)
                self._put(data)
                if not data:
                    return
        except Exception as exc:  # handed to the reader, raised there
            self._put(exc)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.pending:
            item = self.queue.get()
            if isinstance(item, Exception):
                raise StorageError(f"S3 stream broke ({item})")
            if not item:
                self.queue.put(item)  # stay at EOF
                return 0
            self.pending = memoryview(item)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.stop.set()
        while not self.queue.empty():  # unblock the pump so it sees the stop
            self.queue.get_nowait()
        self.body.close()
        super().close()


S3_READ_BYTES = 4 * 2**20
S3_WHOLE_BYTES = int(os.environ.get("CLIPGS_S3_WHOLE_MB", 256)) * 2**20


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192):
    bucket, key = storage._split(url)
    # a shard that fits is fetched in one read (on loopback it beat the read-ahead stream in
    # benchmarks/s3_stream.py, whose goal it still misses); a larger one streams
    try:
        response = storage.s3_client().get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        if 0 < int(response.get("ContentLength") or 0) <= S3_WHOLE_BYTES:
            return io.BytesIO(body.read())
    except Exception as exc:
        raise StorageError(f"{url}: cannot read ({exc})") from None
    return io.BufferedReader(_ReadAhead(body, S3_READ_BYTES), 256 * 1024)


def register_s3_scheme() -> None:
    """Let webdataset stream ``s3://`` shards through boto3 (no ``aws`` CLI needed)."""
    import importlib

    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _open_s3


def iterate(urls: list[str]) -> Iterator[dict]:
    """Every sample of the given shards, in order, decoded (for evaluation); a damaged shard
    is a StorageError naming it."""
    import webdataset as wds

    register_s3_scheme()
    for url in urls:  # one pipeline a shard: an error is known to be this shard's
        pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(),
                                    wds.map(decode_sample))
        try:
            yield from pipeline
        except (tarfile.TarError, EOFError, ValueError) as exc:  # truncated, not a tar, bad npy
            what = exc.args[0] if exc.args and isinstance(exc.args[0], str) else repr(exc)
            raise StorageError(f"{url}: damaged shard ({what.split(' @ ')[0]}); re-ingest "
                               "it") from None


def check_shards(dataset: str, manifest: dict, split: str) -> None:
    """Each shard of ``split`` is there with the bytes the manifest records, so a truncated or
    missing shard is named before anything is read (one stat a file, one listing on S3)."""
    shards = [s for s in manifest["splits"].get(split, {}).get("shards", []) if s["count"] > 0]
    listed = None
    if storage.is_s3(dataset):
        try:  # one listing; a role without ListBucket falls back to one HEAD a shard
            listed = storage.list_sizes(dataset)
        except StorageError:
            listed = {}
    for s in shards:
        url = storage.join(dataset, s["name"])
        if listed is not None:
            size = listed.get(url)
            if size is None and storage.is_s3(dataset):
                try:
                    size = storage.size(url)
                except StorageError:
                    size = None
        else:
            path = Path(url)
            size = path.stat().st_size if path.is_file() else None
        if size is None:
            raise StorageError(f"{url}: missing; the manifest lists it in split '{split}'")
        if "bytes" in s and size != s["bytes"]:
            raise StorageError(f"{url}: {size} bytes; the manifest records {s['bytes']} "
                               "(truncated or rewritten: re-ingest it)")


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
