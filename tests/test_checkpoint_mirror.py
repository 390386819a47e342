"""The copy of checkpoints to the mirror (``mirror.MirrorCopy``): in the background while
training goes on, its marker last and only once every node's files are there, a failure on
any node an error on every rank, and the mirror pruned to its own newest complete ones.

Checkpoint folders here are plain files (what the copy sees of DeepSpeed's); the copy itself
is the real one, to a folder or to moto's S3 server through boto3. The trainer's use of it is
covered by the slow 2-rank runs in test_train.py (an S3 mirror, a new node resuming from it)."""

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clipgs.data import storage
from clipgs.errors import ConfigError, StorageError
from clipgs.train import checkpoint
from clipgs.train.checkpoint import COPIED, MARKER, complete_steps
from clipgs.train.mirror import MirrorCopy, prune_mirror
from tests.conftest import free_port


def _local_checkpoint(ckpt_dir: Path, step: int, files: tuple[str, ...] = ("model.pt",),
                      marker: bool = True) -> None:
    tag = ckpt_dir / checkpoint.tag_for(step)
    for name in files:
        (tag / name).parent.mkdir(parents=True, exist_ok=True)
        (tag / name).write_bytes(f"{name} of step {step}".encode() * 100)
    if marker:
        (tag / MARKER).write_text(json.dumps({"step": step}))


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_the_copy_runs_while_training_goes_on_and_the_marker_comes_last(tmp_path, one_rank,
                                                                      monkeypatch):
    ckpt, mirror = tmp_path / "checkpoints", tmp_path / "mirror"
    _local_checkpoint(ckpt, 4, files=("model.pt", "optim.pt", "rng/rank0.json"))
    release, copying, real = threading.Event(), threading.Event(), checkpoint._copy_to

    def held(path, url):  # a slow bucket: the first file waits until the test releases it
        copying.set()
        assert release.wait(30)
        real(path, url)

    monkeypatch.setattr(checkpoint, "_copy_to", held)
    copy = MirrorCopy(str(mirror), ckpt, 0, 0, keep=2, device=torch.device("cpu"))
    copy.start(4)  # returns with the copy in flight: the step is not held
    assert copying.wait(30)
    assert complete_steps(str(mirror)) == []
    release.set()
    copy.wait()
    assert complete_steps(str(mirror)) == [4]
    copied = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    assert copied == ["step0000004/clipgs_checkpoint.json", "step0000004/model.pt",
                      "step0000004/optim.pt", "step0000004/rng/rank0.json"]
    step, seconds = copy.pop_finished()
    assert step == 4 and seconds > 0 and copy.pop_finished() is None
    copy.wait()  # nothing in flight: nothing to do


def test_without_background_the_copy_is_done_when_start_returns(tmp_path, one_rank):
    """Also: what a killed copy of the same step left in the mirror (here another rank
    count's shard) is removed first, not mixed into the new copy."""
    ckpt, mirror = tmp_path / "checkpoints", tmp_path / "mirror"
    _local_checkpoint(ckpt, 2)
    stale = mirror / "step0000002" / "zero_pp_rank_3_optim_states.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from a run on 4 ranks")
    copy = MirrorCopy(str(mirror), ckpt, 0, 0, keep=1, device=torch.device("cpu"),
                      background=False)
    copy.start(2)
    assert complete_steps(str(mirror)) == [2]
    assert sorted(p.name for p in (mirror / "step0000002").iterdir()) == [MARKER, "model.pt"]
    assert copy.pop_finished()[0] == 2


def test_a_failed_copy_is_an_error_at_the_next_wait_and_leaves_no_marker(tmp_path, one_rank,
                                                                        s3_server):
    """A bucket that does not exist, through the real client: the training step is not held
    by the failure either; the next checkpoint (or the end of the job) raises, naming the
    mirror and saying the local checkpoint is whole."""
    ckpt = tmp_path / "checkpoints"
    _local_checkpoint(ckpt, 6)
    copy = MirrorCopy("s3://no-such-bucket/ckpt", ckpt, 0, 0, keep=2, device=torch.device("cpu"))
    copy.start(6)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/ckpt/step0000006: copying the "
                       r"checkpoint to the mirror failed \(.*NoSuchBucket.*\); the local "
                       r"checkpoint .*step0000006 is complete, and the next run"):
        copy.wait()
    assert copy.pop_finished() is None
    # the same copy to a bucket that is there: the mirror's own checkpoint is complete
    storage.s3_client().create_bucket(Bucket="late")
    copy = MirrorCopy("s3://late/ckpt", ckpt, 0, 0, keep=2, device=torch.device("cpu"))
    copy.start(6)
    copy.wait()
    assert complete_steps("s3://late/ckpt") == [6]


@pytest.mark.parametrize("multipart_mb, parts", [(5, 3), (64, 1)])
def test_checkpoint_files_upload_in_parts_of_the_configured_size(tmp_path, s3_server,
                                                                 monkeypatch, multipart_mb,
                                                                 parts):
    """``CLIPGS_S3_MULTIPART_MB`` (read into ``storage.MULTIPART_MB``) reaches checkpoint
    copies too: an 11 MiB file goes up in three parts of 5 MiB, or in one request at 64. The
    store's ETag says which (a multipart object's ends in ``-<parts>``)."""
    monkeypatch.setattr(storage, "MULTIPART_MB", multipart_mb)
    path = tmp_path / "optim_states.pt"
    data = bytes(range(256)) * (11 * 2**12)
    path.write_bytes(data)
    url = f"{s3_server}/ckpt/step0000001/optim_states.pt"
    checkpoint._copy_to(path, url)
    assert storage.read_bytes(url) == data
    bucket, key = storage._split(url)
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert (int(etag.rsplit("-", 1)[1]) if "-" in etag else 1) == parts, etag


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_the_mirror_keeps_its_newest_complete_checkpoints(tmp_path, where, request):
    """Older complete ones and older partial ones (a copy a kill cut short) go; the newest
    complete ones up to the step just copied, and anything newer (a copy in flight, or
    another run's that this one did not write), stay."""
    mirror = str(tmp_path / "mirror") if where == "folder" else \
        request.getfixturevalue("s3_server") + "/ckpt"
    local = tmp_path / "local"
    for step, done in ((2, True), (3, False), (4, True), (6, True), (8, False)):
        _local_checkpoint(local, step, files=("model.pt", "rng/rank0.json"), marker=done)
        checkpoint.upload(local / checkpoint.tag_for(step), mirror, marker=False)
        if done:
            checkpoint.upload(local / checkpoint.tag_for(step), mirror, marker=True)
    prune_mirror(mirror, keep=1, step=4)  # newer ones are not this run's to remove
    assert complete_steps(mirror) == [4, 6]
    assert checkpoint._mirror_steps(mirror) == [4, 6, 8]
    prune_mirror(mirror, keep=5, step=8)  # fewer than keep: nothing goes
    assert checkpoint._mirror_steps(mirror) == [4, 6, 8]
    for step, done in ((2, True), (3, False)):
        _local_checkpoint(local, step, marker=done)
        checkpoint.upload(local / checkpoint.tag_for(step), mirror, marker=False)
        if done:
            checkpoint.upload(local / checkpoint.tag_for(step), mirror, marker=True)
    prune_mirror(mirror, keep=2, step=6)
    assert complete_steps(mirror) == [4, 6]
    assert checkpoint._mirror_steps(mirror) == [4, 6, 8]


def test_a_resumed_checkpoint_the_mirror_lacks_is_copied(tmp_path, one_rank):
    """Its copy failed, or a kill cut it short: the run that resumes from it copies it, so
    no run ends with its checkpoint on local disk only; one the mirror has is left alone."""
    ckpt, mirror = tmp_path / "checkpoints", tmp_path / "mirror"
    _local_checkpoint(ckpt, 8)
    partial = mirror / "step0000008" / "model.pt"  # the killed copy's remains
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    copy = MirrorCopy(str(mirror), ckpt, 0, 0, keep=2, device=torch.device("cpu"))
    copy.ensure(8)
    copy.wait()
    assert complete_steps(str(mirror)) == [8]
    assert partial.read_bytes() == (ckpt / "step0000008" / "model.pt").read_bytes()
    copy.ensure(8)  # complete there: nothing in flight
    assert copy._thread is None and copy.pop_finished()[0] == 8


def test_a_store_that_cannot_be_listed_is_an_error_not_no_checkpoints(s3_server):
    """Else a resume would start over, and pruning take newer checkpoints for strays."""
    with pytest.raises(StorageError, match="s3://no-such-bucket/ckpt: cannot list"):
        complete_steps("s3://no-such-bucket/ckpt")
    assert complete_steps(f"{s3_server}/empty") == []


def test_pruning_counts_what_this_job_saved_and_nothing_newer(tmp_path):
    """A node that does not share rank 0's disk has markers only for what it downloaded: the
    steps this job saved count too. A newer local checkpoint (left when a run went back to an
    earlier step) is not counted, so it never pushes out the one just saved."""
    from clipgs.train.checkpoint import prune

    _local_checkpoint(tmp_path, 100)  # downloaded from the mirror at the resume
    for step in (200, 300, 400, 500):
        _local_checkpoint(tmp_path, step, marker=False)
    prune(tmp_path, keep=1, step=500, saved={200, 300, 400, 500})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000500"]
    _local_checkpoint(tmp_path, 900)  # a newer one this run did not write
    _local_checkpoint(tmp_path, 600, marker=False)
    prune(tmp_path, keep=1, step=600, saved={200, 300, 400, 500, 600})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000600", "step0000900"]


def test_a_copy_of_a_missing_folder_and_a_clear_that_fails_are_errors(tmp_path, one_rank,
                                                                    s3_server):
    """Never a "copy" of nothing that reports success; a resume=false that cannot clear the
    mirror (a bucket that does not exist) is an error, not a run a later resume could mix
    up with the earlier one's checkpoints."""
    from clipgs.train.checkpoint import clear, upload

    with pytest.raises(StorageError, match="step0000007: no such checkpoint folder to copy"):
        upload(tmp_path / "step0000007", str(tmp_path / "mirror"), marker=False)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/ckpt: cannot remove the "
                       r"earlier run's checkpoints there \(.*cannot list"):
        clear(tmp_path / "checkpoints", 0, 0, "s3://no-such-bucket/ckpt")


# ---- two nodes: the marker once both nodes' files are there; a failure on one node -------

def _two_nodes_worker(rank: int, init: str, root: str, mode: str) -> None:
    """One of two gloo ranks, each the local rank 0 of its own node with its own disk."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    root_path = Path(root)
    ckpt, mirror = root_path / f"node{rank}" / "checkpoints", str(root_path / "mirror")
    _local_checkpoint(ckpt, 10, files=(f"zero_rank{rank}_optim.pt",), marker=rank == 0)
    real = checkpoint._copy_to
    release = root_path / "release"

    def node1_copy(path, url):
        if mode == "fail":
            raise OSError("connection reset by peer")
        while mode == "ok" and not release.exists():  # node 1's store is slow until
            threading.Event().wait(0.05)  # rank 0 has looked
        real(path, url)

    if rank == 1:
        checkpoint._copy_to = node1_copy
    if mode == "fail0" and rank == 0:
        def node0_copy(path, url):
            raise OSError("disk quota exceeded")
        checkpoint._copy_to = node0_copy
    if mode == "unshared":  # each node its own local folder: no node would see the others'
        mirror = str(root_path / f"node{rank}" / "mirror")
        try:
            MirrorCopy(mirror, ckpt, rank, 0, keep=2, device=torch.device("cpu"))
            error = None
        except ConfigError as exc:
            error = str(exc)
        (root_path / f"rank{rank}.json").write_text(json.dumps({"seen": None, "error": error}))
        dist.destroy_process_group()
        return
    copy = MirrorCopy(mirror, ckpt, rank, 0, keep=2, device=torch.device("cpu"))
    if mode == "invisible":  # node 1's object lands where rank 0 never sees it
        copy.VISIBLE_S = 1.0
        if rank == 1:
            write = storage.write_bytes
            checkpoint.storage.write_bytes = lambda url, data: write(url + ".elsewhere", data)
    if mode == "ok" and rank == 0:  # what a killed copy of this step left: removed first
        real(Path(__file__), f"{mirror}/step0000010/stale_rank3.pt")
    copy.start(10)
    seen = None
    if rank == 0 and mode == "ok":
        own = Path(mirror) / "step0000010" / "zero_rank0_optim.pt"
        for _ in range(600):  # rank 0's own files are copied; node 1's are held back
            if own.exists():
                break
            threading.Event().wait(0.05)
        threading.Event().wait(0.5)
        seen = {"own_copied": own.exists(), "complete": complete_steps(mirror)}
        release.write_text("go")
    try:
        copy.wait()
        error = None
    except StorageError as exc:
        error = str(exc)
    (root_path / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "error": error}))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["ok", "fail", "fail0", "invisible", "unshared"])
def test_two_nodes_the_marker_waits_for_both_and_a_failure_reaches_both(tmp_path, mode):
    """ok: rank 0 writes no marker while node 1's copy is held back, then one once node 1's
    files are there (a killed copy's stale file removed first); fail / fail0: a copy that
    fails on node 1 / on rank 0 is an error on both ranks, and no marker; invisible: node 1's
    copy ended well but rank 0 never sees its object - an error after ``VISIBLE_S``, not a
    wait for ever; unshared: a mirror folder that is not the same for both nodes is refused
    when the run starts."""
    import torch.multiprocessing as mp

    mp.spawn(_two_nodes_worker, args=(f"file://{tmp_path}/store", str(tmp_path), mode),
             nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    mirror = tmp_path / "mirror"
    tag = mirror / "step0000010"
    if mode == "ok":
        assert r0 == {"seen": {"own_copied": True, "complete": []}, "error": None}
        assert r1["error"] is None
        assert complete_steps(str(mirror)) == [10]
        assert sorted(p.relative_to(tag).as_posix() for p in tag.rglob("*") if p.is_file()) == [
            f"{COPIED}/rank1", MARKER, "zero_rank0_optim.pt", "zero_rank1_optim.pt"]
        # a new node fetches the checkpoint without the copy's bookkeeping
        checkpoint.download(str(mirror), "step0000010", tmp_path / "new-node")
        fetched = tmp_path / "new-node" / "step0000010"
        assert sorted(p.name for p in fetched.rglob("*") if p.is_file()) == [
            MARKER, "zero_rank0_optim.pt", "zero_rank1_optim.pt"]
    elif mode == "invisible":
        assert r0["error"].startswith(
            f"{tag}: copying the checkpoint to the mirror failed (StorageError: {tag}/{COPIED}/: "
            f"rank1 copied their files, but rank 0 has not seen them in the mirror for 1 s; the "
            "mirror must be one folder or bucket that every node reaches)")
        assert r1["error"].startswith(f"{tag}: copying the checkpoint to the mirror failed on "
                                      "another node")
        assert complete_steps(str(mirror)) == []
    elif mode == "unshared":
        assert r1["error"] == (f"checkpoint_mirror={tmp_path}/node1/mirror: rank 1 does not "
                               "see what rank 0 wrote there; the mirror must be one folder or "
                               "bucket that every node reaches (a local folder only on a disk "
                               "they share)")
        assert r0["error"] == (f"checkpoint_mirror={tmp_path}/node0/mirror: not every node can "
                               "use it (the failing rank's log says why)")
        assert not list((tmp_path / "node0" / "mirror").iterdir())  # the token is removed
    else:
        failing, other = (r1, r0) if mode == "fail" else (r0, r1)
        reason = "connection reset by peer" if mode == "fail" else "disk quota exceeded"
        assert failing["error"].startswith(f"{tag}: copying the checkpoint to the mirror "
                                           f"failed (OSError: {reason}); the local checkpoint")
        assert other["error"] == (f"{tag}: copying the checkpoint to the mirror failed on "
                                  "another node (its log says why); the next run of this "
                                  "training resumes from the newest checkpoint every node can "
                                  "read (copying it to the mirror if it is not there)")
        assert complete_steps(str(mirror)) == []  # a node's files are missing: no marker
