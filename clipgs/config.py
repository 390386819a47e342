"""One typed configuration tree for every stage. A run is a config value: loaded from YAML plus
``section.key=value`` overrides, validated, printed and logged whole."""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from clipgs.errors import ConfigError
from clipgs.models.teacher import TeacherConfig
from clipgs.tracking import tracking_uri as default_tracking_uri


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Strict):
    points: int = Field(1024, gt=0, description="gaussians per object after resampling")
    views: int = Field(4, gt=0, description="views per object (sidecar images first)")
    shard_size: int = Field(64, gt=0, description="objects per shard (unless shard_mb is set)")
    shard_mb: float | None = Field(None, gt=0, description="pack each shard up to this many "
                                   "MB (10^6 bytes) instead of shard_size objects; an object "
                                   "larger than that gets a shard of its own")
    limit: int | None = Field(None, gt=0, description="per split of each grid dataset")
    up: Literal["auto", "+x", "-x", "+y", "-y", "+z", "-z"] = Field(
        "auto", description="the objects' up axis, which rendered views are taken around "
        "(auto: +y for glTF, .spz and OBJ, -y for .splat, +z for the rest); a sidecar's "
        "\"up\" wins")
    seed: int = 0
    # on 2 cores the CPU teacher needs both (measured: one worker made it 0.73x as fast); with
    # more cores, or the teacher on a GPU, workers keep the teacher fed
    workers: int = Field(default_factory=lambda: 0 if (os.cpu_count() or 1) <= 2 else min(
        8, (os.cpu_count() or 1) - 2), ge=0, description="processes that read, resample and "
        "render (0: inline); the teacher runs in the main process meanwhile")
    multipart_mb: int = Field(64, ge=5, description="S3 shards above this size upload in parts")
    teacher: TeacherConfig = TeacherConfig()

    @field_validator("up", mode="before")
    @classmethod
    def _axis(cls, value):  # "y", "-Y" as a sidecar's up field takes them
        from clipgs.data.axes import parse_up

        return value if value == "auto" else parse_up(value) or value


# Uni3D's point encoders (baaivision/Uni3D scripts: --pc-model, --pc-feat-dim 192..1408,
# --pc-encoder-dim 512) with the widths, depths, heads and MLPs of timm's EVA towers they start
# from. `model.size=NAME` sets these fields; the checkpoint loader (clipgs.models.uni3d) checks them.
UNI3D_SIZES: dict[str, dict] = {
    name: dict(width=w, depth=d, heads=h, mlp=mlp, mlp_hidden=hidden,
               pointnet_channels=(128, 256, 512), pointnet_out=512)
    for name, w, d, h, mlp, hidden in (
        ("tiny", 192, 12, 3, "swiglu", 512),  # eva02_tiny_patch14_224
        ("small", 384, 12, 6, "swiglu", 1024),  # eva02_small_patch14_224
        ("base", 768, 12, 12, "swiglu_norm", 2048),  # eva02_base_patch14_448
        ("large", 1024, 24, 16, "swiglu_norm", 2730),  # eva02_large_patch14_448
        ("giant", 1408, 40, 16, "gelu", 6144),  # eva_giant_patch14_560
    )}


class ModelConfig(_Strict):
    size: Literal["custom", "tiny", "small", "base", "large", "giant"] = Field(
        "custom", description="a Uni3D size (sets width, depth, heads, mlp, pointnet); "
        "custom = the fields as given (the default: a small CPU model)")
    groups: int = Field(32, gt=0, description="patches per object (FPS centres)")
    group_size: int = Field(32, gt=0, description="gaussians per patch (kNN)")
    width: int = Field(192, gt=0)
    depth: int = Field(4, gt=0)
    heads: int = Field(3, gt=0)
    mlp_ratio: float = 4.0
    mlp: Literal["gelu", "swiglu", "swiglu_norm"] = Field(
        "gelu", description="transformer MLP: GELU, SwiGLU (EVA02-Ti/S), SwiGLU + LayerNorm "
        "(EVA02-B/L)")
    mlp_hidden: int | None = Field(None, gt=0, description="None = width * mlp_ratio")
    # Uni3D's patch encoder is (128, 256, 512) -> 512; the CPU defaults are narrower
    pointnet_channels: tuple[int, int, int] = (64, 128, 128)
    pointnet_out: int = Field(128, gt=0, description="patch feature before the projection to "
                              "width (Uni3D's pc_encoder_dim)")
    attribute_channels: tuple[int, int, int, int] = (32, 64, 128, 128)
    attribute_branch: bool = Field(True, description="GS refinement branch 2 (all 14 "
                                   "attributes); false = position + colour only")
    serialization: tuple[Literal["xyz", "z", "hilbert"], ...] = Field(
        ("hilbert", "z", "xyz"), description="token orders: one drawn per training batch, the "
        "first at inference; empty = no serialization")
    patch_dropout: float = Field(0.0, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth: the chance that "
                             "a block's residual branches are skipped for a sample in training, "
                             "rising linearly from 0 at the first block to this at the last "
                             "(timm's and Uni3D's drop_path_rate; Uni3D trains with 0.2)")
    embed_dim: int | None = Field(None, description="output width; None = the teacher's")
    init_from: str | None = Field(None, description="Uni3D checkpoint (path or s3://) whose "
                                  "point encoder initialises ours; needs a matching model.size")

    @model_validator(mode="before")
    @classmethod
    def _apply_size(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("size", "custom") == "custom":
            return data
        if data["size"] not in UNI3D_SIZES:
            return data  # the Literal check reports it
        data = dict(data)
        for key, value in UNI3D_SIZES[data["size"]].items():
            given = data.setdefault(key, value)
            if (tuple(given) if isinstance(given, list) else given) != value:
                raise ValueError(f"model.{key}={given} conflicts with model.size="
                                 f"{data['size']} ({key} {value}); drop one of them or use "
                                 "model.size=custom")
        return data

    @model_validator(mode="after")
    def _init_from_needs_a_size(self):
        if self.init_from and self.size == "custom":
            raise ValueError("init_from needs the Uni3D size the checkpoint was trained with "
                             "(model.size=tiny|small|base|large|giant): its head count is not "
                             "in the weights, and a wrong one loads without error but computes "
                             "something else")
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0, description="the cosine schedule's floor; left unset, "
                          "it becomes lr/100 for an lr below it")
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(20, ge=1, description="linear warm-up updates (DeepSpeed's "
                              "WarmupCosineLR takes at least 2)")
    grad_clip: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _min_lr_below_lr(self):
        if self.min_lr > self.lr and "min_lr" not in self.model_fields_set:
            # a small lr alone still works; a floor the user set is kept. Written past
            # validate_assignment, which would count the derived floor as set by the user
            self.__dict__["min_lr"] = self.lr / 100
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr:g} is above lr={self.lr:g}; the cosine "
                             "schedule decays from lr to min_lr")
        return self


class LossConfig(_Strict):
    text_weight: float = 1.0
    image_weight: float = 1.0
    image_views: Literal["vote", "mean", "random"] = Field(
        "vote", description="weights of an object's K views in the image loss: vote = by the "
        "teacher's image-text agreement cos(I_k, t) (method.md 5); mean = uniform; random = "
        "one random view (Uni3D / OpenShape's baseline)")
    vote_weighting: Literal["softmax", "linear"] = Field(
        "softmax", description="vote: softmax(cos / vote_temperature) over the K views, or "
        "linear: max(cos, 0) / sum")
    vote_temperature: float = Field(0.05, gt=0)
    text_positives: Literal["index", "same_text"] = Field(
        "index", description="the text->3D half of the text loss: index = each object's "
        "caption against the batch with only its own object positive (method.md 5); "
        "same_text = once per distinct caption in the global batch, every object sharing it "
        "positive (UniCL), so repeated captions are neither false negatives nor repeated "
        "rows. The two are equal when no caption repeats")
    logit_scale_init: float = 14.285714  # 1 / 0.07, as CLIP
    logit_scale_max: float = 100.0


class TrackingConfig(_Strict):
    # the standard MLFLOW_TRACKING_URI wins over the embedded default (a cluster sets it)
    tracking_uri: str = Field(default_factory=default_tracking_uri)
    experiment: str = "clipgs"
    run_name: str | None = None
    system_metrics: bool = Field(True, description="CPU/GPU/memory/network of rank 0's node")
    buffer_size: int = Field(10000, gt=0, description="metric values held while the tracking "
                             "server is unreachable; the oldest are dropped beyond this")


class TrainConfig(_Strict):
    data: str = Field("work/shards", description="folder or s3:// prefix with manifest.json")
    output_dir: str = "work/train"
    steps: int = Field(200, gt=0)
    micro_batch: int = Field(32, gt=1, description="objects per rank per micro-step")
    grad_accum: int = Field(1, gt=0)
    zero_stage: int = Field(1, ge=0, le=3)
    checkpoint_every: int = Field(100, gt=0)
    checkpoint_mirror: str | None = Field(None, description="folder or s3:// prefix that every "
                                          "checkpoint is copied to (resume falls back to it)")
    checkpoint_mirror_background: bool = Field(
        True, description="copy to the mirror in a background thread while training goes on "
        "(the next checkpoint and the end of the job wait for it); false: the step waits")
    keep_checkpoints: int = Field(2, gt=0, description="newest local checkpoints kept")
    resume: bool = Field(True, description="continue from the newest complete checkpoint; "
                         "false: start over, removing output_dir's (and the mirror's)")
    stop_at: int | None = Field(None, gt=0, description="end this job after this step with a "
                                "checkpoint (wall-clock-limited jobs); the next job resumes")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="recompute transformer blocks "
                                           "in the backward pass (less memory, more compute)")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state in CPU "
                                    "memory (zero_stage >= 1)")
    log_every: int = Field(10, gt=0)
    loader_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    data_mode: Literal["resampled", "split"] = Field(
        "resampled", description="resampled: every rank and worker draws shards with "
        "replacement (no epoch barrier across nodes); split: each epoch's shards split by node "
        "and worker (needs at least ranks x workers shards)")
    grouping: Literal["loader", "device"] = Field(
        "loader", description="FPS + kNN grouping in data-loader workers or batched on the "
        "training device (clipgs.models.tokenizer.group_torch)")
    seed: int = 0
    nproc: int = Field(2, gt=0, description="local ranks spawned by `clipgs train`")
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer=true needs zero_stage >= 1 (ZeRO-Offload "
                             "moves the partitioned optimizer state)")
        return self


class EvalConfig(_Strict):
    split: str = "test"
    batch_size: int = Field(64, gt=0)
    # the zero-shot prompt ensemble: each class name through every template, averaged
    prompts: list[str] = Field(["a 3D model of a {}", "a render of a {}", "a photo of a {}"],
                               min_length=1)
    retrieval_ks: list[int] = Field([1, 5, 10], min_length=1)
    fewshot_way: int = Field(10, ge=2, description="N of the N-way K-shot linear probe")
    fewshot_shot: int = Field(5, gt=0, description="K: support objects per class (the paper: "
                              "10 on ModelNet10)")
    fewshot_episodes: int = Field(10, ge=0, description="0 skips the probe")
    fewshot_queries: int = Field(15, gt=0, description="query objects per class and episode")
    fewshot_support_split: str | None = Field(None, description="draw the probe's support "
                                              "objects from this split (e.g. train), the "
                                              "queries from `split`; None: both from `split`")
    gallery_queries: int = Field(6, ge=0, description="text queries in the retrieval gallery")
    gallery_top: int = Field(5, gt=0)
    plots: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _support_is_another_split(self):
        if self.fewshot_support_split == self.split:
            raise ValueError(f"fewshot_support_split={self.split} is the evaluated split; leave "
                             "it unset to draw support and queries from it")
        return self


class PromoteConfig(_Strict):
    metric: str = Field("zeroshot_top1", description="the gate: challenger must beat the "
                        "champion on it by `margin`")
    margin: float = Field(0.0, ge=0, description="challenger must beat champion by this")
    # guards: metrics the challenger may not lose more than `guard_tolerance` on
    guard_metrics: list[str] = ["retrieval_text_to_3d_r1", "retrieval_image_to_3d_r1"]
    guard_tolerance: float = Field(0.05, ge=0)
    allow_rolled_back: bool = Field(False, description="promote a version that `--rollback` "
                                    "took down from champion; refused (and not evaluated) "
                                    "unless set, so a retried pipeline or a re-registered run "
                                    "does not put it straight back up")


class PipelineConfig(_Strict):
    source: str | None = Field(None, description="assets; None = generate primitives")
    workdir: str = "work"
    model_name: str = "clipgs"
    primitives_per_class: int = 40
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    promote: PromoteConfig = PromoteConfig()


def _field_type(cls: type[BaseModel], keys: list[str]) -> Any:
    """The annotation of the field at ``keys`` under ``cls`` (None where there is none)."""
    for i, key in enumerate(keys):
        field = cls.model_fields.get(key) if isinstance(cls, type) and issubclass(
            cls, BaseModel) else None
        if field is None:
            return None
        if i == len(keys) - 1:
            return field.annotation
        cls = field.annotation
    return None


def _is_text(annotation: Any) -> bool:
    """str, str | None or a Literal of strings: a field whose override is taken verbatim."""
    if annotation is str:
        return True
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    return get_origin(annotation) in (Union, UnionType) and len(args) == 1 and _is_text(args[0])


def _value(cls: type[BaseModel], dotted: str, raw: str) -> Any:
    """An override's value: YAML (numbers, booleans, lists), except that a text field takes
    the text as written (``run_name=2024`` is the name "2024", ``run_name=@nightly`` is
    "@nightly"); quotes and ``null`` (where None is allowed) still mean what YAML says."""
    try:
        value, error = yaml.safe_load(raw), None
    except yaml.YAMLError as exc:
        value, error = raw, exc
    annotation = _field_type(cls, dotted.split("."))
    if annotation is not None and _is_text(annotation):
        if error is None and (isinstance(value, str) or (
                value is None and type(None) in get_args(annotation))):
            return value
        return raw
    if error is not None:
        raise ConfigError(f"override {dotted}={raw}: not a YAML value ({_yaml_problem(error)})")
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line, with the line and column."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""

    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    out = ": ".join(x for x in (at(exc.problem_mark), exc.problem or "") if x)
    if exc.context:
        out += f" ({exc.context}{' at ' + at(exc.context_mark) if exc.context_mark else ''})"
    return out


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def validate(cls: type[BaseModel], tree: Any, where: str = "") -> Any:
    """``cls`` from a plain tree, its validation errors as one ConfigError line."""
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            field, msg = ".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")
            lines.append(f"{field}: {msg}" if field else msg)
        raise ConfigError(where + "invalid config: " + "; ".join(lines)) from None


def load_config(cls: type[BaseModel], path: str | Path | None = None,
                overrides: list[str] | None = None) -> Any:
    """``cls`` from a YAML file (optional) plus ``key.sub=value`` overrides."""
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config is a YAML {type(tree).__name__}; expected "
                              "a mapping of settings (key: value)")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), _value(cls, key.strip(), raw))
    return validate(cls, tree, f"{path}: " if path else "")


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
