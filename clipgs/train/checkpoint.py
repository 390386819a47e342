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

The copy to the mirror runs in a background thread (``clipgs/train/mirror.py``): the step goes
on once the local checkpoint is complete, and the mirror's marker is written when every node's
copy is done. The next checkpoint (once written locally) and the end of the job wait for it, so
at most one copy is in flight and a job never ends before its last checkpoint is in the mirror.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from clipgs.data import storage
from clipgs.errors import ConfigError, StorageError, TeacherMismatchError

if TYPE_CHECKING:
    from clipgs.train.mirror import MirrorCopy

log = logging.getLogger("clipgs.train")
MARKER = "clipgs_checkpoint.json"
COPY_CHUNK = 16 * 2**20  # bytes read at a time: checkpoint files can be large
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
        bucket, key = storage._split(url)
        # streams from disk in parts: checkpoint files can be larger than memory allows
        storage.s3_client().upload_file(str(path), bucket, key,
                                        Config=storage.transfer_config())
    else:  # a name of its own while written: nodes that both copy a file (an undetected
        # shared disk) never replace each other's half-written one
        with storage.atomic_file(storage.local_path(url)) as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out, COPY_CHUNK)


def _copy_from(url: str, path: Path) -> None:
    # a name of its own while written: nodes sharing a disk may fetch the same file at once
    with storage.atomic_file(path) as out:
        if storage.is_s3(url):
            bucket, key = storage._split(url)
            storage.s3_client().download_fileobj(bucket, key, out)
        else:
            with open(storage.local_path(url), "rb") as src:
                shutil.copyfileobj(src, out, COPY_CHUNK)


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

def _device() -> torch.device:
    """Where a collective's tensors live: NCCL takes them only on this rank's GPU."""
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def _raise_together(failure: BaseException | None, elsewhere: str, device: torch.device,
                    error: type[Exception] = StorageError) -> None:
    """A collective: every rank raises if any rank failed (its own error, or ``elsewhere``
    as an ``error``), so none waits in a collective that a failed rank never enters."""
    bad = torch.tensor([int(failure is not None)], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if bad.item():
        raise error(f"{elsewhere} (the failing rank's log says why)")


def save(engine, ckpt_dir: Path, step: int, state: dict, rank: int, local_rank: int,
         keep: int, mirror: "MirrorCopy | None" = None, saved: set[int] | None = None) -> None:
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
            choice = [best]
        except StorageError as exc:  # every rank hears it, none waits for a choice
            choice = [("error", str(exc))]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    if isinstance(choice[0], tuple):
        raise StorageError(choice[0][1])
    step = choice[0]
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
