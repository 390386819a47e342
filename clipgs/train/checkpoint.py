"""Checkpoints that survive a dead rank: DeepSpeed's own checkpoint (model, optimizer and LR
schedule, each rank its ZeRO shard) plus every rank's RNG states, then a marker written last,
so a checkpoint a kill interrupted is never resumed from; each complete checkpoint is copied
to object storage (a folder or ``s3://``), and resume falls back to that copy when the local
disk lost it (a new node, a wiped pod).

The data position is the step: the streams are resampled and reseeded from the step on resume
(clipgs/data/loader.py), and the marker records the samples seen, so a resumed run ends at the
same step having seen the same number of samples.

Layout: ``<output_dir>/checkpoints/step0000040/`` holds DeepSpeed's files, ``rng/rank<r>.json``
and ``clipgs_checkpoint.json`` (the marker); the mirror holds the same tree (plus, with several
nodes, ``.clipgs_copied/rank<r>``: node r's files are all there).

The copy to the mirror runs in a background thread (``MirrorCopy``): the step goes on once the
local checkpoint is complete, and the mirror's marker is written when every node's copy is done.
The next checkpoint (once written locally) and the end of the job wait for it, so at most one
copy is in flight and a job never ends before its last checkpoint is in the mirror.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from clipgs.data import storage
from clipgs.errors import ConfigError, StorageError, TeacherMismatchError

log = logging.getLogger("clipgs.train")
MARKER = "clipgs_checkpoint.json"
COPIED = ".clipgs_copied"  # in the mirror only: rank<r> once node r's files are all there


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def _step_of(tag: str) -> int | None:
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


# --- RNG states (JSON, never pickled) ------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
           "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         cached))

    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# --- finding, copying and pruning ---------------------------------------------------------

def complete_steps(ckpt_dir: str) -> list[int]:
    """Steps of the checkpoints whose marker exists (locally or under an s3:// prefix). A
    store that cannot be listed is an error, never "no checkpoints" (a resume would start
    over, and the mirror's pruning would take the newer ones for strays)."""
    if storage.is_s3(ckpt_dir):
        names = {u[len(ckpt_dir.rstrip("/")) + 1:] for u in _files(ckpt_dir)}
    else:
        root = storage.local_path(ckpt_dir)
        names = {f"{p.parent.name}/{MARKER}" for p in root.glob(f"*/{MARKER}")} \
            if root.is_dir() else set()
    steps = [_step_of(n.split("/")[0]) for n in names if n.endswith("/" + MARKER)]
    return sorted(s for s in steps if s is not None)


def _files(url: str) -> list[str]:
    """Every file under a folder or prefix; none for a folder that does not exist. A store
    that cannot be listed is a ``StorageError``."""
    if not storage.is_s3(url) and not storage.local_path(url).exists():
        return []
    return storage.list_files(url)


def _copy_to(path: Path, url: str) -> None:
    if storage.is_s3(url):
        from boto3.s3.transfer import TransferConfig

        bucket, key = storage._split(url)
        # streams from disk in parts: checkpoint files can be larger than memory allows
        storage.s3_client().upload_file(str(path), bucket, key, Config=TransferConfig(
            multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20))
    else:
        dest = storage.local_path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: nodes that both copy a file (an undetected shared disk) never
        # replace each other's half-written one
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 16 * 2**20)
                os.fchmod(out.fileno(), 0o666 & ~storage._UMASK)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _copy_from(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)  # a name of its own: nodes sharing a disk may fetch the same file at once
    try:
        if storage.is_s3(url):
            bucket, key = storage._split(url)
            storage.s3_client().download_file(bucket, key, tmp)
        else:
            shutil.copyfile(storage.local_path(url), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload(local_tag_dir: Path, mirror: str, marker: bool) -> None:
    """Copy a checkpoint folder to the mirror; the marker only when ``marker`` (last)."""
    if not local_tag_dir.is_dir():  # never a "copy" of nothing that reports success
        raise StorageError(f"{local_tag_dir}: no such checkpoint folder to copy")
    for path in sorted(local_tag_dir.rglob("*")):
        if path.is_file() and (path.name == MARKER) == marker:
            rel = path.relative_to(local_tag_dir.parent).as_posix()
            _copy_to(path, storage.join(mirror, rel))


def download(mirror: str, tag: str, ckpt_dir: Path) -> None:
    """The whole checkpoint from the mirror; the marker last, so a half download is ignored."""
    files = [u for u in _files(storage.join(mirror, tag)) if f"/{COPIED}/" not in u]
    if not files:
        raise StorageError(f"{storage.join(mirror, tag)}: checkpoint not found in the mirror")
    base = storage.join(mirror, tag)
    for url in sorted(files, key=lambda u: u.endswith("/" + MARKER)):
        rel = url[len(base.rstrip("/")) + 1:] if storage.is_s3(url) else \
            Path(url).relative_to(Path(base)).as_posix()
        _copy_from(url, ckpt_dir / tag / rel)


def prune(ckpt_dir: Path, keep: int, step: int | None = None,
          saved: set[int] | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints up to ``step`` (the one just saved);
    older ones (and older partial ones) go, newer ones (left by a run that resumed from an
    earlier step) are not counted. ``saved``: the steps this job saved, complete here even
    without a marker (rank 0 writes the markers, so a node that does not share its disk has
    none but those it downloaded)."""
    steps = set(complete_steps(str(ckpt_dir))) | (saved or set())
    steps = sorted(s for s in steps if step is None or s <= step)
    if len(steps) <= keep:
        return
    oldest_kept = steps[-keep]
    for path in ckpt_dir.iterdir():
        step_ = _step_of(path.name)
        if step_ is not None and step_ < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)  # nodes sharing a disk may race here


def prune_mirror(mirror: str, keep: int, step: int) -> None:
    """Once ``step`` is complete in the mirror: its newest ``keep`` complete checkpoints up to
    ``step`` stay, older complete and partial ones (a copy a kill cut short) go. Newer ones
    are never touched (this run did not write them)."""
    steps = [s for s in complete_steps(mirror) if s <= step]
    if len(steps) > keep:
        for old in _mirror_steps(mirror):
            if old < steps[-keep]:
                _remove_tag(mirror, old)


def _mirror_steps(mirror: str) -> list[int]:
    """Every checkpoint folder in the mirror, complete or not."""
    if storage.is_s3(mirror):
        prefix = mirror.rstrip("/") + "/"
        tags = {u[len(prefix):].split("/")[0] for u in _files(mirror)}
    else:
        root = storage.local_path(mirror)
        tags = {p.name for p in root.iterdir()} if root.is_dir() else set()
    return sorted(s for s in map(_step_of, tags) if s is not None)


def _remove_tag(mirror: str, step: int) -> None:
    base = storage.join(mirror, tag_for(step))
    # the marker first, so a removal cut short leaves no "complete" remains
    if not storage.is_s3(base):
        (storage.local_path(base) / MARKER).unlink(missing_ok=True)
        shutil.rmtree(storage.local_path(base), ignore_errors=True)
        return
    for url in sorted(_files(base), key=lambda u: not u.endswith("/" + MARKER)):
        storage.remove(url)


# --- loading DeepSpeed's files without running what they hold -----------------------------

def _deepspeed_types() -> list[type]:
    """The only non-tensor types DeepSpeed 0.19 pickles into the checkpoints clipgs writes
    (ZeRO 0-3, fp32 and bf16, optimizer offload; found by loading one of each): the ZeRO
    optimizers' ``zero_stage`` (an int enum), ``loss_scaler`` (a static LossScaler, a float
    and a flag) and ``param_slice_mappings`` (dataclasses of two ints). Plain data: unpickling
    one looks up an enum value or fills a ``__dict__``; none defines ``__setstate__``."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """One DeepSpeed checkpoint file, unpickled with ``weights_only=True``: tensors, containers
    and the types above, nothing that could run code. DeepSpeed's own loader unpickles
    anything, and a checkpoint can come from the mirror, which is only as safe as its bucket."""
    try:
        with torch.serialization.safe_globals(_deepspeed_types()), warnings.catch_warnings():
            # DeepSpeed saves with pickle protocol 4, which the weights-only reader handles;
            # its "not the default protocol" notice would come once per file and rank
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, the one thing not to do here: name
        # only what was refused
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"unpickling it would call {found[1]}" if found else \
            "it holds more than tensors and DeepSpeed's checkpoint data"
        raise StorageError(
            f"{path}: refused to load: {what}, so it was tampered with or not written by "
            "clipgs; remove this checkpoint here and in the checkpoint_mirror, or start over "
            "with resume=false") from None
    except (RuntimeError, EOFError) as exc:  # truncated or not a torch file at all
        tag = Path(path).parent
        raise StorageError(f"{path}: not a readable checkpoint file ({str(exc).splitlines()[0]}"
                           f"); remove {tag.name} (here and in the checkpoint_mirror) to resume "
                           "from the checkpoint before it, or start over with resume=false"
                           ) from exc


def _load_safely(engine) -> None:
    """Route the engine's checkpoint reads through ``load_weights_only``: DeepSpeed reads the
    model states, optimizer states and ZeRO shards through ``engine.checkpoint_engine.load``
    (its TorchCheckpointEngine calls ``torch.load(weights_only=False)``); saving is left as
    is. Other engines (fast, decoupled, DataStates: never in clipgs's DeepSpeed config) and
    universal checkpoints (never enabled) read files their own way, so they are refused."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ckpt_engine = engine.checkpoint_engine
    if type(ckpt_engine) is not TorchCheckpointEngine or engine.load_universal_checkpoint():
        raise ConfigError(f"{type(ckpt_engine).__name__}: clipgs resumes only DeepSpeed's "
                          "torch checkpoints (no universal checkpoints), read weights-only")
    ckpt_engine.load = load_weights_only


# --- save and restore (collective: every rank calls them) ---------------------------------

def _shares_disk_with_rank0(ckpt_dir: Path, rank: int, device: torch.device) -> bool:
    """Whether this rank sees rank 0's checkpoint folder (a shared file system): then rank 0
    copies every file, and the other nodes copy nothing twice. Collective. A token with a
    fresh random value, so a stale one from an earlier run never counts."""
    nonce = torch.tensor([random.SystemRandom().getrandbits(62) if rank == 0 else 0],
                         dtype=torch.int64, device=device)
    dist.broadcast(nonce, src=0)
    token = ckpt_dir / ".clipgs_disk_check"
    failure = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            token.write_text(str(int(nonce.item())))
        except OSError as exc:
            failure = exc
    _raise_together(failure, "rank 0 cannot write its checkpoint folder", device)
    try:
        shared = rank != 0 and token.read_text() == str(int(nonce.item()))
    except OSError:
        shared = False
    dist.barrier()
    if rank == 0:
        token.unlink(missing_ok=True)
    return shared


def _device() -> torch.device:
    """Where a collective's tensors live: NCCL takes them only on this rank's GPU."""
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def _raise_together(failure: BaseException | None, elsewhere: str,
                    device: torch.device) -> None:
    """A collective: every rank raises if any rank failed (its own error, or ``elsewhere``
    as a ``StorageError``), so none waits in a collective that a failed rank never enters."""
    bad = torch.tensor([int(failure is not None)], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if bad.item():
        raise StorageError(f"{elsewhere} (that rank's log says why)")


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
        nonce = torch.tensor([random.SystemRandom().getrandbits(62) if self.rank == 0 else 0],
                             dtype=torch.int64, device=self.device)
        dist.broadcast(nonce, src=0)
        token = storage.join(self.mirror, f".clipgs_mirror_check_{int(nonce.item())}")
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
        bad = torch.tensor([int(failure is not None)], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.rank == 0:
            try:
                storage.remove(token)
            except Exception:  # noqa: BLE001 - a token left behind is harmless
                pass
        if failure is not None:
            raise ConfigError(failure)
        if bad.item():
            raise ConfigError(f"checkpoint_mirror={self.mirror}: not every node can use it "
                              "(the failing rank's log says why)")

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


def save(engine, ckpt_dir: Path, step: int, state: dict, rank: int, local_rank: int,
         keep: int, mirror: MirrorCopy | None = None, saved: set[int] | None = None) -> None:
    """DeepSpeed checkpoint + RNG states, then the marker (rank 0, after every rank is done);
    then the copy before this one is joined (a failed one stops the run here, with this
    checkpoint complete on local disk), and this one's copy starts in the background."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    rng_file = ckpt_dir / tag / "rng" / f"rank{rank}.json"
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    rng_file.write_text(json.dumps(rng_state()))
    dist.barrier()
    if rank == 0:
        marker = dict(state, tag=tag, world_size=dist.get_world_size())
        storage.write_bytes(str(ckpt_dir / tag / MARKER), json.dumps(marker).encode())
    dist.barrier()
    if mirror is not None:
        mirror.wait()  # at most one copy in flight
    saved = saved if saved is not None else set()
    saved.add(step)
    if local_rank == 0:
        prune(ckpt_dir, keep, step, saved)  # after the wait: never a checkpoint being copied
    if mirror is not None:
        mirror.start(step)


def restore(engine, ckpt_dir: Path, rank: int, local_rank: int, mirror: str | None,
            fingerprint: str, teacher_sha256: str | None = None,
            data_identity: str | None = None, zero_stage: int = 0,
            mirror_only: bool = False) -> dict | None:
    """Load the newest complete checkpoint (local, else the mirror's) into the engine and this
    rank's RNGs; returns its marker (step, samples_seen, run_id, ...) or None to start fresh.
    A checkpoint of another run (its ``fingerprint`` differs) is refused, not half-loaded.
    ``mirror_only``: some node does not share rank 0's disk, so only the mirror's complete
    checkpoints are on every node."""
    choice = [None]
    if rank == 0:
        try:
            local = [] if mirror_only else complete_steps(str(ckpt_dir))
            remote = complete_steps(mirror) if mirror else []
            best = max(local + remote, default=None)
            choice = [None if best is None else (best, best not in local)]
        except StorageError as exc:  # every rank hears it, none waits for a choice
            choice = [("error", str(exc))]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    if choice[0][0] == "error":
        raise StorageError(choice[0][1])
    step, _ = choice[0]
    tag = tag_for(step)
    failure, from_mirror = None, False
    if local_rank == 0:
        try:
            if mirror_only and ckpt_dir.is_dir():  # newer local ones are not on every node:
                for path in ckpt_dir.iterdir():  # this run goes on from `step` and writes them
                    if (_step_of(path.name) or 0) > step:  # again
                        shutil.rmtree(path, ignore_errors=True)
            if not (ckpt_dir / tag / MARKER).exists():
                if not mirror:
                    raise StorageError(f"{ckpt_dir / tag}: checkpoint missing on this node "
                                       "and no checkpoint_mirror to fetch it from")
                log.warning("fetching checkpoint %s from %s", tag, mirror)
                download(mirror, tag, ckpt_dir)
                from_mirror = True
        except Exception as exc:  # noqa: BLE001 - every rank raises together below
            failure = exc
    _raise_together(failure, f"{ckpt_dir / tag}: a node could not get the checkpoint",
                    _device())
    marker = json.loads((ckpt_dir / tag / MARKER).read_text())
    if teacher_sha256 and marker.get("teacher_sha256", teacher_sha256) != teacher_sha256:
        raise TeacherMismatchError(
            f"{ckpt_dir / tag}: trained against teacher {marker['teacher_sha256'][:12]}, but "
            f"the shards' manifest names teacher {teacher_sha256[:12]}; re-ingest with the "
            "run's teacher, or start a new run (new output_dir, or resume=false)")
    if marker.get("fingerprint") != fingerprint:
        raise ConfigError(f"{ckpt_dir / tag}: a checkpoint of a run with another model, "
                          "optimizer or schedule; give a new output_dir (and "
                          "checkpoint_mirror), or resume=false to start over")
    if data_identity and marker.get("data_identity", data_identity) != data_identity:
        raise ConfigError(f"{ckpt_dir / tag}: a checkpoint of a run on other training shards "
                          "(the dataset was re-ingested with other objects, or is another "
                          "one); give a new output_dir (and checkpoint_mirror), or "
                          "resume=false to start over")
    if marker["world_size"] != dist.get_world_size():
        if zero_stage >= 1:  # DeepSpeed refuses it deep inside load_checkpoint
            raise ConfigError(f"{ckpt_dir / tag}: written by {marker['world_size']} ranks; "
                              f"ZeRO-{zero_stage} partitions the optimizer state by rank, so "
                              f"it resumes only on {marker['world_size']} ranks (this job has "
                              f"{dist.get_world_size()}), or start over with resume=false")
        log.warning("checkpoint %s was written by %d ranks, resuming on %d", tag,
                    marker["world_size"], dist.get_world_size())
    _load_safely(engine)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise StorageError(f"{ckpt_dir / tag}: DeepSpeed could not load the checkpoint")
    rng_file = ckpt_dir / tag / "rng" / f"rank{rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    if rank == 0:
        log.info("resumed from %s (step %d, %d samples seen%s)", tag, marker["step"],
                 marker["samples_seen"], ", fetched from the mirror" if from_mirror else "")
    return marker


def clear(ckpt_dir: Path, rank: int, local_rank: int, mirror: str | None) -> None:
    """``resume=false``: remove an earlier run's checkpoints (here and in the mirror), so a
    later resume can never pick one of them up."""
    if local_rank == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    failure = None
    if mirror and rank == 0:  # partial ones too: a new copy of the same step would mix in
        try:  # their files (other ranks' shards)
            for step in _mirror_steps(mirror):
                _remove_tag(mirror, step)
        except Exception as exc:  # noqa: BLE001 - every rank raises together below
            failure = StorageError(f"{mirror}: cannot remove the earlier run's checkpoints "
                                   f"there ({exc})")
    _raise_together(failure, f"{mirror}: rank 0 cannot remove the earlier run's checkpoints",
                    _device())


def export_fp32(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights (the optimizer's master copy under bf16) on every rank: a collective
    under ZeRO 1-3, which assembles each parameter from the ranks' partitions."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keys = set(module.state_dict().keys())
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None without a ZeRO / bf16 optimizer
        state[name] = (param if full is None else full).detach().float().cpu().clone()
    for name, buf in module.named_buffers():
        if name in keys:
            state[name] = buf.detach().cpu().clone()
    return state
