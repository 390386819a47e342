"""One typed configuration tree for every stage. A run is a config value: loaded from YAML plus
``section.key=value`` overrides, validated, printed and logged whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipgs.errors import ConfigError
from clipgs.models.teacher import TeacherConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Strict):
    points: int = Field(1024, gt=0, description="gaussians per object after resampling")
    views: int = Field(4, gt=0, description="views per object (sidecar images first)")
    shard_size: int = Field(64, gt=0, description="objects per shard")
    limit: int | None = Field(None, gt=0, description="per split of each grid dataset")
    seed: int = 0
    teacher: TeacherConfig = TeacherConfig()


class ModelConfig(_Strict):
    groups: int = Field(32, gt=0, description="patches per object (FPS centres)")
    group_size: int = Field(32, gt=0, description="gaussians per patch (kNN)")
    width: int = Field(192, gt=0)
    depth: int = Field(4, gt=0)
    heads: int = Field(3, gt=0)
    mlp_ratio: float = 4.0
    # Uni3D's patch encoder is (128, 256, 512); the CPU defaults are narrower
    pointnet_channels: tuple[int, int, int] = (64, 128, 128)
    attribute_channels: tuple[int, int, int, int] = (32, 64, 128, 128)
    patch_dropout: float = Field(0.0, ge=0, lt=1)
    embed_dim: int | None = Field(None, description="output width; None = the teacher's")


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class LossConfig(_Strict):
    text_weight: float = 1.0
    image_weight: float = 1.0
    image_views: Literal["mean", "random"] = "mean"
    logit_scale_init: float = 14.285714  # 1 / 0.07, as CLIP
    logit_scale_max: float = 100.0


class TrackingConfig(_Strict):
    # the standard MLFLOW_TRACKING_URI wins over the embedded default (a cluster sets it)
    tracking_uri: str = Field(default_factory=lambda: os.environ.get(
        "MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    experiment: str = "clipgs"
    run_name: str | None = None


class TrainConfig(_Strict):
    data: str = Field("work/shards", description="folder or s3:// prefix with manifest.json")
    output_dir: str = "work/train"
    steps: int = Field(200, gt=0)
    micro_batch: int = Field(32, gt=1, description="objects per rank per micro-step")
    grad_accum: int = Field(1, gt=0)
    zero_stage: int = Field(1, ge=0, le=3)
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    loader_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    seed: int = 0
    nproc: int = Field(2, gt=0, description="local ranks spawned by `clipgs train`")
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    tracking: TrackingConfig = TrackingConfig()


class EvalConfig(_Strict):
    split: str = "test"
    batch_size: int = 64
    prompts: list[str] = ["a 3D model of a {}", "a render of a {}", "a photo of a {}"]


class PromoteConfig(_Strict):
    metric: str = "zeroshot_top1"
    margin: float = Field(0.0, ge=0, description="challenger must beat champion by this")


class PipelineConfig(_Strict):
    source: str | None = Field(None, description="assets; None = generate primitives")
    workdir: str = "work"
    model_name: str = "clipgs"
    primitives_per_class: int = 40
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    promote: PromoteConfig = PromoteConfig()


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(cls: type[BaseModel], path: str | Path | None = None,
                overrides: list[str] | None = None) -> Any:
    """``cls`` from a YAML file (optional) plus ``key.sub=value`` overrides."""
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc})") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(where + "invalid config: " + "; ".join(lines)) from None


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
