"""Initialisation from a point-cloud model (method.md section 3): a Uni3D checkpoint's point
encoder into our GSEncoder.

Uni3D (baaivision/Uni3D, ``models/point_encoder.py``, ``models/uni3d.py``) saves
``{"module": state_dict}`` (DeepSpeed), keys optionally prefixed ``module.``, with:

- ``point_encoder.encoder.first_conv.{0,1,3}`` / ``second_conv.{0,1,3}``: the mini-PointNet
  (Conv1d k=1, BatchNorm, Conv1d) -> our branch 1 ``pos_colour.fc1/bn1/fc2/fc3/bn3/fc4``;
- ``point_encoder.encoder2trans`` -> ``pos_colour.proj``; ``point_encoder.pos_embed.{0,2}``,
  ``cls_token``, ``cls_pos`` -> the same names; ``point_encoder.trans2embed`` -> ``head`` (when
  the teacher widths agree);
- ``point_encoder.visual.*``: a timm EVA tower. ``blocks.i.{norm1,norm2,attn.proj}`` map
  one-to-one; ``attn.qkv.weight`` + ``q_bias``/``v_bias`` (EVA02-Ti/S, EVA-g) or
  ``attn.{q,k,v}_proj`` (EVA02-B/L) become our fused qkv; the MLP is ``mlp.fc1``/``fc2`` (GELU,
  EVA-g), a fused ``mlp.fc1`` of [gate; x] (EVA02-Ti/S) or ``mlp.fc1_g``/``fc1_x``/``norm``/
  ``fc2`` (EVA02-B/L); ``fc_norm`` -> our final ``norm``. The image-only parts (patch and
  position embeddings of the 2D ViT, its head) and ``logit_scale`` are ignored.

Anything else under ``point_encoder.`` (layer scale, a second final norm, ...), a depth or
width that differs from ours, or a checkpoint without a point encoder is a ClipgsError: a
partial load would silently train a different model.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import torch

from clipgs.errors import ClipgsError

PREFIX = "point_encoder."
# point encoder parts outside the transformer: Uni3D name -> ours
_POINTNET = {"encoder.first_conv.0": "pos_colour.fc1", "encoder.first_conv.1": "pos_colour.bn1",
             "encoder.first_conv.3": "pos_colour.fc2", "encoder.second_conv.0": "pos_colour.fc3",
             "encoder.second_conv.1": "pos_colour.bn3", "encoder.second_conv.3": "pos_colour.fc4",
             "encoder2trans": "pos_colour.proj", "pos_embed.0": "pos_embed.0",
             "pos_embed.2": "pos_embed.2", "visual.fc_norm": "norm"}
_IGNORED = re.compile(r"^(logit_scale$|point_encoder\.visual\.(cls_token|pos_embed|patch_embed"
                      r"|head|rope)|point_encoder\.visual\.blocks\.\d+\.attn\.(rope|"
                      r"relative_position))")
_BLOCK = re.compile(r"^visual\.blocks\.(\d+)\.(.+)$")


class Uni3DCheckpointError(ClipgsError):
    """A checkpoint that is not a Uni3D one, or does not fit the configured encoder."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # our parameter/buffer names
    new: list[str] = field(default_factory=list)  # ours, left at their initialisation
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why

    def summary(self) -> str:
        groups = sorted({k.split(".")[0] for k in self.new})
        return (f"{self.source}: loaded {len(self.loaded)} tensors from Uni3D's point encoder; "
                f"{len(self.new)} new ({', '.join(groups) or 'none'}); "
                f"{len(self.ignored)} checkpoint tensors ignored "
                f"({', '.join(sorted(set(self.ignored.values()))) or 'none'})")


def read_checkpoint(url: str) -> dict[str, torch.Tensor]:
    """A safetensors file or a torch checkpoint, never unpickled beyond tensors."""
    from clipgs.data.storage import read_bytes

    try:
        data = read_bytes(url)
    except Exception as exc:  # noqa: BLE001 - storage errors carry their own message
        raise Uni3DCheckpointError(f"{url}: cannot read the checkpoint ({exc})") from None
    try:
        if url.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the same user error
        raise Uni3DCheckpointError(f"{url}: not a safetensors file or a tensors-only torch "
                                   f"checkpoint ({type(exc).__name__}: {exc})") from None
    for wrapper in ("module", "state_dict", "model"):  # DeepSpeed / Lightning / plain
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise Uni3DCheckpointError(f"{url}: expected a dict of tensors, got {type(state)}")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def _block_key(rest: str) -> list[tuple[str, str]] | None:
    """An EVA block's sub-key -> [(our sub-key, how)], how: copy / fc1 / q / k / v."""
    direct = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight",
              "attn.proj.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
              "mlp.fc1_g.weight", "mlp.fc1_g.bias", "mlp.fc1_x.weight", "mlp.fc1_x.bias",
              "mlp.norm.weight", "mlp.norm.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    if rest in direct:
        return [(rest, "copy")]
    if rest in ("attn.q_proj.bias", "attn.v_proj.bias"):
        return [(f"attn.{rest[5]}_bias", "copy")]
    if rest in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"):
        return [("attn.qkv.weight", rest[5])]
    if rest in ("mlp.fc1.weight", "mlp.fc1.bias"):
        return [(rest, "fc1")]  # resolved against our MLP kind below
    return None


def map_state(ckpt: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], source: str
              ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Uni3D keys -> our state dict entries, with the report. Raises on anything unknown."""
    report = LoadReport(source)
    if not any(k.startswith(PREFIX) for k in ckpt):
        sample = ", ".join(list(ckpt)[:4])
        raise Uni3DCheckpointError(f"{source}: not a Uni3D checkpoint: no '{PREFIX}*' keys "
                                   f"(found {len(ckpt)} tensors, e.g. {sample})")
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}  # qkv pieces to fuse per block
    unknown = []
    for key, value in ckpt.items():
        if _IGNORED.match(key):
            report.ignored[key] = "image-only or training state, not part of the 3D encoder"
            continue
        if not key.startswith(PREFIX):
            unknown.append(key)
            continue
        rest = key[len(PREFIX):]
        if rest in ("cls_token", "cls_pos"):
            out[rest] = value
            continue
        if rest.startswith("trans2embed."):
            target = "head." + rest.split(".", 1)[1]
            if ours[target].shape != value.shape:
                report.ignored[key] = (f"teacher width differs (checkpoint {list(value.shape)}, "
                                       f"ours {list(ours[target].shape)}): head starts fresh")
            else:
                out[target] = value
            continue
        name, _, leaf = rest.rpartition(".")
        if name in _POINTNET:
            value = value.squeeze(-1) if value.ndim == 3 else value  # Conv1d k=1 -> Linear
            out[f"{_POINTNET[name]}.{leaf}"] = value
            continue
        m = _BLOCK.match(rest)
        mapped = _block_key(m.group(2)) if m else None
        if mapped is None:
            unknown.append(key)
            continue
        i = m.group(1)
        for sub, how in mapped:
            target = f"blocks.{i}.{sub}"
            if how == "copy":
                out[target] = value
            elif how in ("q", "k", "v"):
                parts.setdefault(target, {})[how] = value
            elif how == "fc1":  # EVA-g's GELU fc1, or EVA02-Ti/S's fused [gate; x]
                leaf = sub.rsplit(".", 1)[1]
                if f"blocks.{i}.mlp.fc1.{leaf}" in ours:
                    out[f"blocks.{i}.mlp.fc1.{leaf}"] = value
                else:
                    gate, x = value.chunk(2, dim=0)
                    out[f"blocks.{i}.mlp.fc1_g.{leaf}"] = gate
                    out[f"blocks.{i}.mlp.fc1_x.{leaf}"] = x
    if unknown:
        raise Uni3DCheckpointError(f"{source}: {len(unknown)} tensors this loader does not know "
                                   f"how to place (e.g. {unknown[:4]}); refusing a partial load")
    for target, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise Uni3DCheckpointError(f"{source}: {target} has only {sorted(qkv)} of q/k/v")
        out[target] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    _check_fit(out, ours, source)
    report.loaded = sorted(out)
    report.new = sorted(k for k in ours if k not in out)
    return out, report


def _check_fit(mapped: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], source: str
               ) -> None:
    ckpt_depth = len({k.split(".")[1] for k in mapped if k.startswith("blocks.")})
    our_depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
    width = mapped["cls_token"].shape[-1] if "cls_token" in mapped else None
    hint = (f"the checkpoint has depth {ckpt_depth}, width {width}; set model.size to the "
            "Uni3D size it was trained with")
    if ckpt_depth != our_depth:
        raise Uni3DCheckpointError(f"{source}: {ckpt_depth} transformer blocks, the model has "
                                   f"{our_depth}; {hint}")
    missing = [k for k in mapped if k not in ours]
    if missing:
        raise Uni3DCheckpointError(f"{source}: tensors {missing[:4]} have no place in this "
                                   f"model (a different MLP or attention layout); {hint}")
    wrong = [f"{k} {list(v.shape)} vs ours {list(ours[k].shape)}" for k, v in mapped.items()
             if v.shape != ours[k].shape]
    if wrong:
        raise Uni3DCheckpointError(f"{source}: {len(wrong)} shapes differ, e.g. {wrong[:3]}; "
                                   f"{hint}")
    trunk = [k for k in ours if k.startswith(("blocks.", "pos_colour.", "pos_embed.", "cls_",
                                              "norm."))]
    absent = [k for k in trunk if k not in mapped]
    if absent:
        raise Uni3DCheckpointError(f"{source}: the point encoder lacks {len(absent)} tensors "
                                   f"the model needs, e.g. {absent[:4]}; {hint}")


def load_uni3d(encoder: torch.nn.Module, url: str) -> LoadReport:
    """Load a Uni3D checkpoint's point encoder into ``encoder`` (a GSEncoder) in place."""
    ours = encoder.state_dict()
    mapped, report = map_state(read_checkpoint(url), ours, url)
    with torch.no_grad():
        for k, v in mapped.items():
            ours[k].copy_(v.to(ours[k].dtype))
    return report
