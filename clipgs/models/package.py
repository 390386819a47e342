"""The trained model as a self-describing folder: ``encoder.safetensors`` (fp32 weights, never
pickled) and ``clipgs.json`` (model config, output width, points per object, the teacher's
identity and the training data's manifest checksum). Training writes it; evaluation, the
registry, the MLflow pyfunc and ``clipgs embed`` read it.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipgs.config import ModelConfig
from clipgs.errors import ClipgsError, ConfigError
from clipgs.models.encoder import GSEncoder
from clipgs.models.tokenizer import group_numpy

WEIGHTS, META = "encoder.safetensors", "clipgs.json"


class PackageError(ConfigError):
    """A package file that is damaged (truncated, not JSON, not safetensors): names the file."""


@dataclass
class ModelPackage:
    encoder: GSEncoder
    meta: dict
    path: str

    @property
    def points(self) -> int:
        return int(self.meta["points"])

    def prepare(self, cloud, data: bytes) -> np.ndarray:
        """A read file -> the model's input [M, 14]; the resampling seed comes from the file's
        bytes, so one file always gets one embedding."""
        from clipgs.data.gaussians import resample

        rng = np.random.default_rng(zlib.crc32(data[:4096]) + len(data))
        return resample(cloud.activated(), self.points, rng)

    def prepare_activated(self, points: np.ndarray) -> np.ndarray:
        """Activated gaussians [N, 14] (the layout of clipgs.data.gaussians.ATTRIBUTES, as in
        the shards) -> the model's input [M, 14], seeded by the array's bytes like prepare."""
        from clipgs.data.gaussians import resample

        points = np.ascontiguousarray(points, np.float32)
        rng = np.random.default_rng(zlib.crc32(points.tobytes()[:4096]) + points.size)
        return resample(points, self.points, rng)

    @torch.no_grad()
    def embed_points(self, batch: list[np.ndarray]) -> np.ndarray:
        """Activated, resampled objects [M, 14] each -> unit embeddings [n, D]."""
        cfg = self.encoder.config
        grouped = [group_numpy(p, cfg.groups, cfg.group_size) for p in batch]
        patches = torch.from_numpy(np.stack([g[0] for g in grouped]))
        centres = torch.from_numpy(np.stack([g[1] for g in grouped]))
        out = self.encoder(patches, centres)
        return torch.nn.functional.normalize(out, dim=-1).numpy()


def save_package(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write the package so that a crash never leaves new weights under old meta: the old meta
    is removed first, each file is written whole (temporary name, then renamed), the new meta
    last - and ``load_package`` refuses a folder without its meta."""
    from clipgs.data.storage import write_bytes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()
               if v.is_floating_point()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in state_dict.items()
                    if not v.is_floating_point()})
    (path / META).unlink(missing_ok=True)
    part = path / f".{WEIGHTS}.part"  # straight to a file: no second copy of large weights
    try:
        save_file(tensors, str(part))
        os.replace(part, path / WEIGHTS)
    finally:
        part.unlink(missing_ok=True)
    write_bytes(str(path / META), json.dumps(meta, indent=1).encode())
    return path


def package_meta(model: ModelConfig, manifest: dict, embed_dim: int | None = None,
                 training_run_id: str | None = None, **extra) -> dict:
    """What a package says about itself, for a model trained on the shards of ``manifest``."""
    from clipgs.data.shards import manifest_checksum

    return {"model": model.model_dump(mode="json"),
            "embed_dim": embed_dim or model.embed_dim or manifest["embed_dim"],
            "points": manifest["config"]["points"], "teacher": manifest["teacher"],
            "dataset_manifest_sha256": manifest_checksum(manifest),
            "training_run_id": training_run_id, **extra}


def init_package(path: str | Path, data: str, model: ModelConfig | None = None,
                 seed: int = 0) -> Path:
    """A package with freshly initialised (untrained) weights for the shard set ``data``:
    a baseline, and the model of benchmarks and plumbing tests where quality is beside the
    point."""
    from clipgs.data.shards import read_manifest

    model = model or ModelConfig()
    meta = package_meta(model, read_manifest(data), untrained=True, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = GSEncoder(model, meta["embed_dim"])
    return save_package(path, {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                        meta)


def mlflow_error(uri: str, exc: Exception) -> ClipgsError:
    """An MLflow lookup that failed (no such model, version, alias or run; the server down)
    as one line naming what was looked up and where."""
    import mlflow

    first = ((getattr(exc, "message", None) or str(exc)).strip().splitlines() or ["?"])[0]
    missing = getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
    return ClipgsError(f"{uri}: {'not found in' if missing else 'cannot look it up in'} "
                       f"MLflow at {mlflow.get_tracking_uri()} ({first})")


def resolve(uri: str) -> Path:
    """A local folder, ``runs:/<id>/<path>`` or ``models:/<name>@<alias>`` / ``/<version>``."""
    if os.path.isdir(uri):
        return Path(uri)
    if uri.startswith(("runs:/", "models:/")):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except mlflow.exceptions.MlflowException as exc:
            raise mlflow_error(uri, exc) from None
        for candidate in (local, local / "artifacts" / "package", local / "package"):
            if (candidate / META).exists():
                return candidate
        raise ConfigError(f"{uri}: no {META} in the downloaded artifacts")
    raise ConfigError(f"{uri}: not a model folder, runs:/ or models:/ URI")


def package_model_config(meta: dict) -> ModelConfig:
    """The architecture a package holds. ``init_from`` (where training started) plays no part
    once trained: dropped, so that a package stays loadable whatever the checks on it."""
    return ModelConfig(**{**meta["model"], "init_from": None})


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        package_model_config(meta)
        int(meta["embed_dim"]), int(meta["points"])
        return meta
    except ValidationError as exc:
        e = exc.errors()[0]
        detail = f"model.{'.'.join(map(str, e['loc']))}: {e['msg']}"
    except KeyError as exc:
        detail = f"no field {exc}"
    except (ValueError, TypeError, OSError) as exc:  # JSONDecodeError is a ValueError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise PackageError(f"{path / META}: damaged package meta ({detail}); expected the JSON "
                       "object `clipgs train` writes")


def load_package(uri: str) -> ModelPackage:
    path = resolve(uri)
    if not (path / META).exists() or not (path / WEIGHTS).exists():
        raise ConfigError(f"{path}: expected {META} and {WEIGHTS} (a `clipgs train` output)")
    meta = _read_meta(path)
    encoder = GSEncoder(package_model_config(meta), meta["embed_dim"])
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise PackageError(f"{path / WEIGHTS}: damaged weights ({exc}); expected a whole "
                           "safetensors file") from None
    state = {k.removeprefix("encoder."): v for k, v in state.items() if k != "logit_scale"}
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"{path}: weights do not fit the model config in {META}: "
                          f"{str(exc).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not fit the model config: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    return ModelPackage(encoder.eval(), meta, str(path))
