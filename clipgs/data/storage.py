"""One interface over local folders and ``s3://`` (boto3; the endpoint comes from the standard
``AWS_ENDPOINT_URL``, so MinIO, Ceph or moto work the same). Writes are whole-or-nothing:
a local file appears under its name only when complete, an S3 object only when uploaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from clipgs.errors import StorageError

log = logging.getLogger(__name__)


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def join(base: str, *names: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[n.strip("/") for n in names]])
    return str(Path(base.removeprefix("file://"), *names))


def local_path(url: str) -> Path:
    """A local path or ``file://`` URL as a path."""
    return Path(str(url).removeprefix("file://"))


def _split(url: str) -> tuple[str, str]:
    """Bucket and key, split by hand: a key may hold "?" and "#", which a URL parser would
    take for a query and a fragment."""
    bucket, _, key = str(url).removeprefix("s3://").partition("/")
    return bucket, key.lstrip("/")


@functools.lru_cache(maxsize=None)
def _client_for_pid(pid: int):  # one client per process: boto3 clients are not fork-safe
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def s3_client():
    return _client_for_pid(os.getpid())


def read_bytes(url: str) -> bytes:
    try:
        if is_s3(url):
            bucket, key = _split(url)
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return local_path(url).read_bytes()
    except Exception as exc:
        raise StorageError(f"{url}: cannot read ({exc})") from None


# mkstemp makes a file only its owner can read; a written file gets the mode a plain open()
# would give it (0666 less the umask), so other users of a shared volume can read the shards
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file open for writing whose contents appear under ``path`` only when the block ends
    without an error (else nothing is left). Its temporary name is its own (mkstemp), so
    writers racing on one path (nodes sharing a disk) never replace each other's half-written
    file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(url: str, data: bytes, multipart_mb: int | None = None) -> None:
    """Write atomically: a reader never sees a half-written object under ``url``."""
    if is_s3(url):
        upload_file_bytes(url, data, multipart_mb)
        return
    with atomic_file(local_path(url)) as f:
        f.write(data)


# Multipart above this size (boto3 uploads the parts in parallel and, on failure, aborts the
# multipart upload, so no partial object ever shows under the key). S3's smallest part is 5 MiB.
MULTIPART_MB = int(os.environ.get("CLIPGS_S3_MULTIPART_MB", 64))
UPLOAD_ATTEMPTS = 4  # whole-upload retries on top of botocore's per-request retries


def transfer_config(multipart_mb: int | None = None):
    """boto3's transfer settings for every upload of ours (shards, records, manifests, the flow
    ledger, checkpoint files; packages go through MLflow's artifact store instead): parts of
    ``multipart_mb`` MiB, by default ``CLIPGS_S3_MULTIPART_MB`` (64), never under S3's 5."""
    from boto3.s3.transfer import TransferConfig

    size = max(5, multipart_mb or MULTIPART_MB) * 2**20
    return TransferConfig(multipart_threshold=size, multipart_chunksize=size)


def upload_file_bytes(url: str, data: bytes, multipart_mb: int | None = None) -> None:
    """Upload whole or not at all: a failed upload (botocore's own retries spent) is retried
    from the start with back-off; if every attempt fails, nothing is left under ``url``."""
    import io

    bucket, key = _split(url)
    config = transfer_config(multipart_mb)
    error = None
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
            return
        except Exception as exc:  # connection drops, 5xx after botocore's retries, ...
            error = exc
            log.warning("%s: upload attempt %d/%d failed (%s)", url, attempt + 1,
                        UPLOAD_ATTEMPTS, exc)
            time.sleep(min(8.0, 0.5 * 2**attempt))
    raise StorageError(f"{url}: cannot write after {UPLOAD_ATTEMPTS} attempts ({error})")


def exists(url: str) -> bool:
    """Whether the object is there. Only the store's "not found" is False: an unreachable or
    refusing store is an error, not an answer (ingestion removes a manifest before it rewrites
    shards only if it sees it, so "cannot tell" must not read as "absent")."""
    if is_s3(url):
        return _head(url) is not None
    return local_path(url).exists()


def _head(url: str, cannot: str = "tell whether it exists") -> dict | None:
    """An S3 object's HEAD response; None only where the store says "not found" (any other
    failure is a ``StorageError``: "<url>: cannot <cannot> (...)")."""
    bucket, key = _split(url)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise StorageError(f"{url}: cannot {cannot} ({exc})") from None


def size(url: str) -> int:
    """A file's size in bytes, without reading it."""
    if is_s3(url):
        head = _head(url, cannot="read")
        if head is None:
            raise StorageError(f"{url}: cannot read (no such object)")
        return int(head["ContentLength"])
    try:
        return local_path(url).stat().st_size
    except Exception as exc:
        raise StorageError(f"{url}: cannot read ({exc})") from None


def list_stats(url: str, recursive: bool = True) -> dict[str, tuple[int, str]]:
    """Every file under a folder or ``s3://`` prefix (``recursive=False``: directly in it) ->
    (size in bytes, version), sorted by URL. The version changes when the file does: its ETag
    in S3, its modification time (ns) on a local disk."""
    if is_s3(url):
        bucket, prefix = _split(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out, folders = {}, False
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"})
            ):
                out.update({f"s3://{bucket}/{o['Key']}": (int(o["Size"]),
                                                          str(o.get("ETag", "")).strip('"'))
                            for o in page.get("Contents", [])})
                folders = folders or bool(page.get("CommonPrefixes"))
        except Exception as exc:
            raise StorageError(f"{url}: cannot list ({exc})") from None
        empty = not out and not folders  # nothing under the URL as a folder
        head = _head(url) if empty and prefix and not url.endswith("/") else None
        if head is not None:  # the URL is one object: it lists itself, as a local file does
            out[url] = (int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))
        return dict(sorted(out.items()))
    root = local_path(url)

    def stat(p: Path) -> tuple[int, str]:
        st = p.stat()
        return st.st_size, str(st.st_mtime_ns)

    if root.is_file():
        return {str(root): stat(root)}
    if not root.is_dir():
        raise StorageError(f"{url}: no such file or folder")
    try:
        return {str(p): stat(p) for p in sorted(root.rglob("*") if recursive else
                                                 root.iterdir())
                if p.is_file() and not p.name.startswith(".")}
    except OSError as exc:  # a folder that may not be read
        raise StorageError(f"{url}: cannot list ({exc})") from None


def list_sizes(url: str) -> dict[str, int]:
    """Every file under a folder or ``s3://`` prefix -> its size in bytes, sorted by URL."""
    return {k: size for k, (size, _) in list_stats(url).items()}


def list_files(url: str) -> list[str]:
    """Every file under a folder or ``s3://`` prefix, as full URLs/paths, sorted."""
    return list(list_sizes(url))


def remove(url: str) -> None:
    if is_s3(url):
        bucket, key = _split(url)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        local_path(url).unlink(missing_ok=True)
