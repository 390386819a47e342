"""Object storage under real faults: a TCP proxy on loopback in front of the moto S3 server cuts
uploads midway, the way a dropped connection does; boto3 is the real client throughout."""

import io
import json
import os
import time

import numpy as np
import psutil
import pytest
from tqdm import tqdm

from clipgs.config import IngestConfig
from clipgs.data import shards, storage
from clipgs.data.ingest import ingest
from clipgs.errors import StorageError
from faults import FaultyProxy


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """(bucket url, make_proxy): make_proxy(...) points the boto3 client at a new proxy."""
    upstream = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxies = []

    def make(failures: int, skip: int = 0, after: int = 200_000) -> FaultyProxy:
        proxy = FaultyProxy(upstream, cut=failures, skip=skip, after=after)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        storage._client_for_pid.cache_clear()
        return proxy

    yield s3_server, make
    for p in proxies:
        p.close()


def test_multipart_upload_cut_midway_is_retried_whole(proxied):
    bucket, make = proxied
    proxy = make(failures=2)
    data = np.random.default_rng(0).bytes(12 * 2**20)  # 3 parts of at most 5 MiB
    storage.upload_file_bytes(f"{bucket}/big.tar", data, multipart_mb=5)
    assert proxy.cuts == 2  # the faults really happened
    assert storage.read_bytes(f"{bucket}/big.tar") == data


def test_upload_that_keeps_failing_leaves_nothing(proxied, monkeypatch):
    bucket, make = proxied
    monkeypatch.setattr(storage, "UPLOAD_ATTEMPTS", 2)
    proxy = make(failures=10_000)
    with pytest.raises(StorageError, match="big.tar: cannot write after 2 attempts"):
        storage.upload_file_bytes(f"{bucket}/big.tar", b"x" * (11 * 2**20), multipart_mb=5)
    assert proxy.cuts >= 2
    proxy.cut = 0
    assert not storage.exists(f"{bucket}/big.tar")
    b, _ = storage._split(bucket)
    assert not storage.s3_client().list_multipart_uploads(Bucket=b).get("Uploads")


def test_exists_says_absent_only_when_the_store_says_so(proxied):
    bucket, make = proxied
    storage.write_bytes(f"{bucket}/here.json", b"{}")
    assert storage.exists(f"{bucket}/here.json") and not storage.exists(f"{bucket}/gone.json")
    assert storage.size(f"{bucket}/here.json") == 2  # the same HEAD
    with pytest.raises(StorageError, match="gone.json: cannot read \\(no such object\\)"):
        storage.size(f"{bucket}/gone.json")
    proxy = make(failures=0)
    proxy.drop = 10_000  # the store hangs up on every connection
    storage._client_for_pid.cache_clear()
    with pytest.raises(StorageError, match="gone.json: cannot tell whether it exists"):
        storage.exists(f"{bucket}/gone.json")
    with pytest.raises(StorageError, match="here.json: cannot read \\("):
        storage.size(f"{bucket}/here.json")
    assert proxy.dropped > 0


def test_interrupted_ingest_to_s3_resumes(proxied, shared_data, teacher, monkeypatch):
    bucket, make = proxied
    src = f"{bucket}/assets"
    for name in ("cat", "cube", "fish", "torus"):
        for f in (shared_data / "splats" / name).iterdir():
            storage.write_bytes(f"{src}/{name}/{f.name}", f.read_bytes())
    for name in ("cat", "cube", "fish", "torus"):
        storage.write_bytes(f"{src}/{name}/meta.json", json.dumps(
            {"title": name, "split": "train"}).encode())
    monkeypatch.setattr(storage, "UPLOAD_ATTEMPTS", 1)
    config = IngestConfig(shard_size=1, points=256, views=1, workers=2)
    out = f"{bucket}/shards"
    # shard 0 and its record go through; every later upload is cut midway
    proxy = make(failures=10_000, skip=2, after=1000)
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # moto's server
    bars = set(tqdm._instances)  # any left open by earlier tests are not this one's
    with pytest.raises(StorageError) as failed:
        ingest(src, out, config, teacher=teacher)
    assert proxy.cuts > 0
    # while ``failed`` still holds the traceback (and so ingest's frame) - as a retrying flow
    # holds it - the reading workers are gone and the progress bar is closed
    assert not set(tqdm._instances) - bars
    deadline = time.monotonic() + 30
    while {p.pid for p in psutil.Process().children(recursive=True)} - before:
        assert time.monotonic() < deadline, "ingest's worker processes outlived its failure"
        time.sleep(0.1)
    assert str(failed.value).startswith(f"{out}/"), failed.value  # names the shard it lost
    proxy.cut = 0
    assert not storage.exists(f"{out}/{shards.MANIFEST}")  # unfinished never looks finished
    again = ingest(src, out, config, teacher=teacher)
    assert again.skipped_shards == 1 and again.written_shards == 3
    assert again.manifest["splits"]["train"]["count"] == 4
    urls = shards.shard_urls(out, again.manifest, "train")
    assert sorted(s["key"] for s in shards.iterate(urls)) == ["cat", "cube", "fish", "torus"]


def test_large_shards_stream_through_the_read_ahead_reader(s3_server, monkeypatch):
    """Shards above CLIPGS_S3_WHOLE_MB are not held whole: they stream in chunks, byte-exact."""
    data = np.random.default_rng(1).bytes(3 * 2**20 + 17)
    storage.write_bytes(f"{s3_server}/big.bin", data)
    monkeypatch.setattr(shards, "S3_WHOLE_BYTES", 2**20)
    monkeypatch.setattr(shards, "S3_READ_BYTES", 2**19)
    stream = shards._open_s3(f"{s3_server}/big.bin")
    assert isinstance(stream, io.BufferedReader)
    got = b"".join(iter(lambda: stream.read(12345), b""))
    stream.close()
    assert got == data
    monkeypatch.setattr(shards, "S3_WHOLE_BYTES", 2**30)
    assert shards._open_s3(f"{s3_server}/big.bin").read() == data


def test_s3_keys_with_query_and_fragment_characters(s3_server, shared_data):
    """"?" and "#" are part of an S3 key, not a URL's query or fragment: such objects are
    listed, read and ingested like any other."""
    from clipgs.data.sources import discover

    data = (shared_data / "splats/cat/cat_10k.splat").read_bytes()
    for name in ("scan#1.splat", "what?.splat"):
        storage.write_bytes(f"{s3_server}/odd/{name}", data)
        assert storage.read_bytes(f"{s3_server}/odd/{name}") == data
    assets = discover(f"{s3_server}/odd")
    assert sorted(a.key for a in assets) == ["scan_1", "what"]
    assert all(len(a.load()) == 10_000 for a in assets)


def test_one_object_in_s3_is_read_with_its_sidecars(s3_server):
    """`clipgs render` reads an object's sidecar "up" in S3 as ingest does, from a listing of
    its own folder only (a `Delimiter` listing: not every key under it); ingesting one S3 object
    finds it and its sidecars."""
    from clipgs.data.sources import discover, sidecar_up

    def put(key: str, data: bytes = b"x") -> None:
        storage.write_bytes(f"{s3_server}/up/{key}", data)

    put("alone/cow.splat")
    put("alone/meta.json", b'{"title": "a cow", "up": "z"}')
    put("alone/deeper/other.splat")  # not a sibling: cow.splat is still alone
    put("pair/a.splat")
    put("pair/b.splat")
    put("pair/meta.json", b'{"title": "whose?", "up": "x"}')  # two objects: meta.json is no one's
    put("pair/b.json", b'{"title": "b", "up": "-x"}')
    assert set(storage.list_stats(f"{s3_server}/up/alone", recursive=False)) == {
        f"{s3_server}/up/alone/cow.splat", f"{s3_server}/up/alone/meta.json"}
    assert sidecar_up(f"{s3_server}/up/alone/cow.splat") == ("+z",
                                                             f"{s3_server}/up/alone/meta.json")
    assert sidecar_up(f"{s3_server}/up/pair/a.splat") == (None, None)
    assert sidecar_up(f"{s3_server}/up/pair/b.splat") == ("-x", f"{s3_server}/up/pair/b.json")
    # one object given as the source lists itself, as a local file does, with its sidecars
    # (before, an S3 file listed nothing: "no objects found")
    (cow,) = discover(f"{s3_server}/up/alone/cow.splat")
    assert (cow.key, cow.up, cow.caption) == ("cow_splat", "+z", "a cow")
    (b,) = discover(f"{s3_server}/up/pair/b.splat")
    assert (b.key, b.up) == ("b_splat", "-x")
    assert storage.list_stats(f"{s3_server}/up/pair/c.splat") == {}  # neither object nor folder
    put("both")  # an object and a folder of only folders: listed as the (empty) folder
    put("both/sub/x.splat")
    assert storage.list_stats(f"{s3_server}/up/both", recursive=False) == {}


def test_a_local_write_appears_whole_or_not_at_all(tmp_path):
    """storage.atomic_file (behind write_bytes and the checkpoint copies): a block that fails
    leaves neither the file nor its temporary; one that ends well leaves the file readable by
    others, as a plain open() would (mkstemp alone makes it owner-only)."""
    path = tmp_path / "sub" / "obj.bin"
    with pytest.raises(OSError, match="disk full"):
        with storage.atomic_file(path) as f:
            f.write(b"half")
            raise OSError("disk full")
    assert list(path.parent.iterdir()) == []
    storage.write_bytes(str(path), b"whole")
    assert path.read_bytes() == b"whole" and list(path.parent.iterdir()) == [path]
    assert path.stat().st_mode & 0o777 == 0o666 & ~storage._UMASK
