"""The copy of each complete checkpoint to the mirror (a folder or ``s3://`` prefix), in a
background thread while training goes on: which ranks copy (one per node, none on a node that
shares rank 0's disk), the check that every copying node reaches the same mirror, the marker
written last once every node's files are there, and the mirror's pruning. Layout and the
local side: clipgs/train/checkpoint.py."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from clipgs.data import storage
from clipgs.errors import ConfigError, StorageError
from clipgs.train.checkpoint import (COPIED, MARKER, _files, _mirror_steps, _raise_together,
                                     _remove_tag, complete_steps, log, tag_for, upload)


def prune_mirror(mirror: str, keep: int, step: int) -> None:
    """Once ``step`` is complete in the mirror: its newest ``keep`` complete checkpoints up to
    ``step`` stay, older complete and partial ones (a copy a kill cut short) go. Newer ones
    are never touched (this run did not write them)."""
    steps = [s for s in complete_steps(mirror) if s <= step]
    if len(steps) > keep:
        for old in _mirror_steps(mirror):
            if old < steps[-keep]:
                _remove_tag(mirror, old)


def _fresh_nonce(rank: int, device: torch.device) -> int:
    """Rank 0's fresh random value, on every rank (collective): a token that holds it is this
    run's, never a stale one from an earlier run."""
    nonce = torch.tensor([random.SystemRandom().getrandbits(62) if rank == 0 else 0],
                         dtype=torch.int64, device=device)
    dist.broadcast(nonce, src=0)
    return int(nonce.item())


def _shares_disk_with_rank0(ckpt_dir: Path, rank: int, device: torch.device) -> bool:
    """Whether this rank sees rank 0's checkpoint folder (a shared file system): then rank 0
    copies every file, and the other nodes copy nothing twice. Collective. A token with a
    fresh random value, so a stale one from an earlier run never counts."""
    nonce = _fresh_nonce(rank, device)
    token = ckpt_dir / ".clipgs_disk_check"
    failure = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            token.write_text(str(nonce))
        except OSError as exc:
            failure = exc
    _raise_together(failure, "rank 0 cannot write its checkpoint folder", device)
    try:
        shared = rank != 0 and token.read_text() == str(nonce)
    except OSError:
        shared = False
    dist.barrier()
    if rank == 0:
        token.unlink(missing_ok=True)
    return shared


class MirrorCopy:
    """Copies each complete checkpoint to the mirror in the background (collective: every rank
    makes one, and calls ``start``, ``wait`` and ``ensure`` at the same points).

    Each node's local rank 0 copies the files its disk holds in a thread of its own (names
    never collide); a node that sees rank 0's checkpoint folder copies nothing (rank 0 copies
    it all). Rank 0, once its own files are copied, waits for every other copying node's
    ``.clipgs_copied/rank<r>`` object, then writes the marker (last: only now is the mirror's
    checkpoint complete) and prunes the mirror. ``wait`` joins that copy; a copy that failed on
    any node is a ``StorageError`` on every rank, so no rank waits for a collective that never
    comes. With ``background=False`` every ``start`` waits at once (the step waits for the
    copy). The threads are daemons: a job killed mid-copy leaves that step in the mirror
    without its marker, never resumed from."""

    POLL_S = 0.2
    VISIBLE_S = 180.0  # after the other nodes' copies ended: an NFS listing may lag ~60 s

    def __init__(self, mirror: str, ckpt_dir: Path, rank: int, local_rank: int, keep: int,
                 device: torch.device, background: bool = True):
        self.mirror, self.ckpt_dir, self.rank, self.keep = mirror, ckpt_dir, rank, keep
        self.device, self.background = device, background
        if storage.is_s3(mirror):
            storage.s3_client()  # made here: creating boto3's client is not thread-safe
        shared = _shares_disk_with_rank0(ckpt_dir, rank, device)  # collective: every rank
        self.uploader = rank == 0 or (local_rank == 0 and not shared)  # rank 0: the marker
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
        flags[rank] = int(self.uploader)
        dist.all_reduce(flags)  # which ranks copy: one per node
        uploaders = torch.nonzero(flags).flatten().tolist()
        self.several = len(uploaders) > 1  # the same on every rank
        self.others = [r for r in uploaders if r != rank]
        if self.several:
            self._check_one_mirror()
        self._thread: threading.Thread | None = None
        self._step: int | None = None
        self._error: BaseException | None = None
        self._seconds: float | None = None
        self._stop, self._others_done = threading.Event(), threading.Event()
        self._finished: tuple[int, float] | None = None

    def _check_one_mirror(self) -> None:
        """Every copying node must reach the same mirror (a local folder only on a disk they
        share): rank 0 writes a token of a fresh random value, the others read it back."""
        token = storage.join(self.mirror,
                             f".clipgs_mirror_check_{_fresh_nonce(self.rank, self.device)}")
        failure = None
        if self.rank == 0:
            try:
                storage.write_bytes(token, b"")
            except Exception as exc:  # noqa: BLE001 - told to every rank below
                failure = f"checkpoint_mirror={self.mirror}: rank 0 cannot write there ({exc})"
        dist.barrier()
        if self.uploader and self.rank != 0 and failure is None:
            try:
                seen = storage.exists(token)
            except Exception as exc:  # noqa: BLE001 - told to every rank below
                seen, failure = False, f"checkpoint_mirror={self.mirror}: {exc}"
            if not seen and failure is None:
                failure = (f"checkpoint_mirror={self.mirror}: rank {self.rank} does not see "
                           "what rank 0 wrote there; the mirror must be one folder or bucket "
                           "that every node reaches (a local folder only on a disk they share)")
        try:
            _raise_together(None if failure is None else ConfigError(failure),
                            f"checkpoint_mirror={self.mirror}: not every node can use it",
                            self.device, ConfigError)
        finally:  # after every rank has looked (the collective above)
            if self.rank == 0:
                try:
                    storage.remove(token)
                except Exception:  # noqa: BLE001 - a token left behind is harmless
                    pass

    def ensure(self, step: int) -> None:
        """After a resume: copy the resumed checkpoint if the mirror lacks it (its copy failed,
        or a kill cut it short), so no run ends with its checkpoint only on local disk."""
        try:  # a mirror that cannot be listed now: copy it anyway (a failure is reported)
            absent = self.rank == 0 and step not in complete_steps(self.mirror)
        except StorageError:
            absent = True
        missing = torch.tensor([int(absent)], device=self.device)
        dist.all_reduce(missing, op=dist.ReduceOp.MAX)
        if missing.item():
            log.warning("checkpoint %s is not complete in %s: copying it", tag_for(step),
                        self.mirror)
            self.start(step)

    def start(self, step: int) -> None:
        """After every rank's files and the local marker are written (a barrier)."""
        assert self._thread is None and self._step is None, "a copy is still in flight"
        self._step, self._error, self._seconds = step, None, None
        self._stop.clear()
        self._others_done.clear()
        if self.several:  # the others copy only once rank 0 has cleared the step's folder
            failed = None
            if self.rank == 0:
                try:
                    self._remove_partial(step)
                except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                    failed = StorageError(f"{storage.join(self.mirror, tag_for(step))}: "
                                          f"cannot clear a cut-short copy there ({exc})")
            try:
                _raise_together(failed, f"{storage.join(self.mirror, tag_for(step))}: rank 0 "
                                "cannot clear a cut-short copy there", self.device)
            except BaseException:
                self._step = None  # nothing in flight
                raise
        if self.uploader:
            self._thread = threading.Thread(target=self._copy, args=(step,), daemon=True,
                                            name=f"clipgs-mirror-{tag_for(step)}")
            self._thread.start()
        if not self.background:
            self.wait()

    def _remove_partial(self, step: int) -> None:
        """What a copy of this step that a kill cut short left (no marker): its files
        (another rank count's shards, say) must not mix into this copy."""
        files = _files(storage.join(self.mirror, tag_for(step)))
        if files and not any(u.endswith("/" + MARKER) for u in files):
            _remove_tag(self.mirror, step)

    def _copy(self, step: int) -> None:
        t0 = time.perf_counter()
        tag = tag_for(step)
        try:
            if not self.several:
                self._remove_partial(step)
            upload(self.ckpt_dir / tag, self.mirror, marker=False)
            if self.rank != 0:
                storage.write_bytes(storage.join(self.mirror, tag, COPIED, f"rank{self.rank}"),
                                    b"")
                return
            if not self._others_copied(tag):
                return  # another node's copy failed: no marker, the mirror keeps its last one
            upload(self.ckpt_dir / tag, self.mirror, marker=True)
            self._seconds = time.perf_counter() - t0  # complete in the mirror from here on
            try:
                prune_mirror(self.mirror, self.keep, step)
            except Exception as exc:  # noqa: BLE001 - the copy is whole; pruning is retried
                log.warning("%s: pruning older checkpoints failed (%s); the next copy tries "
                            "again", self.mirror, exc)
        except BaseException as exc:  # noqa: BLE001 - raised on every rank by wait()
            self._error = exc

    def _others_copied(self, tag: str) -> bool:
        """Rank 0: wait for every other copying node's object; False when one failed."""
        copied = storage.join(self.mirror, tag, COPIED) + "/"
        want, deadline, poll = {f"rank{r}" for r in self.others}, None, self.POLL_S
        while want:
            try:  # a listing that fails now and then is tried again
                want -= {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_files(copied)}
            except StorageError:
                pass
            if not want:
                break
            if self._stop.is_set():
                return False
            if self._others_done.is_set():  # their copies ended well: their objects are due
                deadline = deadline or time.monotonic() + self.VISIBLE_S
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"{copied}: {', '.join(sorted(want))} copied their files, but rank 0 "
                        f"has not seen them in the mirror for {self.VISIBLE_S:.0f} s; the "
                        "mirror must be one folder or bucket that every node reaches")
            self._stop.wait(poll)
            poll = min(2.0, poll * 1.5)  # a LIST a request: fewer while a long copy runs
        return True

    def wait(self) -> None:
        """Join the copy in flight (if any); collective."""
        if self._step is None:
            return
        step, self._step = self._step, None
        if self._thread is not None and self.rank != 0:
            self._thread.join()
        # other nodes first: rank 0's thread waits for their objects, so it must hear how
        # their copies ended before it is joined
        others = torch.tensor([int(self.rank != 0 and self._error is not None)],
                              device=self.device)
        dist.all_reduce(others, op=dist.ReduceOp.MAX)
        if self._thread is not None and self.rank == 0:
            (self._stop if others.item() else self._others_done).set()
            self._thread.join()
        self._thread = None
        failed = torch.tensor([int(self._error is not None)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        where = storage.join(self.mirror, tag_for(step))
        if self._error is not None:
            raise StorageError(
                f"{where}: copying the checkpoint to the mirror failed "
                f"({type(self._error).__name__}: {self._error}); the local checkpoint "
                f"{self.ckpt_dir / tag_for(step)} is complete, and the next run of this "
                "training resumes from the newest checkpoint every node can read (copying it "
                "to the mirror if it is not there)") from self._error
        if failed.item():
            raise StorageError(
                f"{where}: copying the checkpoint to the mirror failed on another node (its "
                "log says why); the next run of this training resumes from the newest "
                "checkpoint every node can read (copying it to the mirror if it is not "
                "there)")
        if self._seconds is not None:  # rank 0: the marker is written
            self._finished = (step, self._seconds)

    def pop_finished(self) -> tuple[int, float] | None:
        """(step, seconds the copy took) of the copy the last ``wait`` joined, on rank 0."""
        finished, self._finished = self._finished, None
        return finished
