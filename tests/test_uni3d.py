"""Initialisation from Uni3D checkpoints. No real Uni3D weights can be downloaded here, so each
test builds a checkpoint with Uni3D's real key names and shapes: the point encoder's own parts
as Uni3D's models/point_encoder.py declares them, and the transformer as timm's EVA model that
Uni3D wraps (timm is installed with open_clip). Loaded weights must compute what Uni3D computes.
"""

import pickle

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from clipgs.config import ModelConfig
from clipgs.errors import ClipgsError
from clipgs.models.encoder import GSEncoder, build_encoder
from clipgs.models.uni3d import load_uni3d

TIMM = {"tiny": "eva02_tiny_patch14_224", "base": "eva02_base_patch14_448",
        "giant": "eva_giant_patch14_560"}


class Uni3DPointParts(nn.Module):
    """Uni3D's PointcloudEncoder minus the tower, with its attribute names and layer types."""

    def __init__(self, width: int, embed_dim: int, encoder_dim: int = 512):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.first_conv = nn.Sequential(nn.Conv1d(6, 128, 1), nn.BatchNorm1d(128),
                                                nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.encoder.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512),
                                                 nn.ReLU(inplace=True),
                                                 nn.Conv1d(512, encoder_dim, 1))
        self.encoder2trans = nn.Linear(encoder_dim, width)
        self.trans2embed = nn.Linear(width, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        for bn in (self.encoder.first_conv[1], self.encoder.second_conv[1]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)

    def patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Uni3D's Encoder.forward + encoder2trans, for [N, k, 6] patches."""
        n = features.shape[1]
        f = self.encoder.first_conv(features.transpose(2, 1))
        g = f.max(dim=2, keepdim=True)[0]
        f = self.encoder.second_conv(torch.cat([g.expand(-1, -1, n), f], dim=1))
        return self.encoder2trans(f.max(dim=2)[0])


def uni3d_checkpoint(size: str, embed_dim: int = 1024, **timm_kw):
    torch.manual_seed(0)
    tower = timm.create_model(TIMM[size], pretrained=False, **timm_kw).eval()
    parts = Uni3DPointParts(tower.embed_dim, embed_dim).eval()
    state = {f"point_encoder.{k}": v for k, v in parts.state_dict().items()}
    state.update({f"point_encoder.visual.{k}": v for k, v in tower.state_dict().items()})
    state["logit_scale"] = torch.tensor(2.659)
    return {f"module.{k}": v for k, v in state.items()}, tower, parts


def save_ckpt(tmp_path, state, name="model.pt"):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"module": state, "epoch": 3}, path)  # as DeepSpeed saves Uni3D
    return str(path)


def test_tiny_checkpoint_loads_and_computes_what_uni3d_computes(tmp_path):
    state, tower, parts = uni3d_checkpoint("tiny")
    path = save_ckpt(tmp_path, state)
    enc = GSEncoder(ModelConfig(size="tiny", groups=16, group_size=16), embed_dim=1024).eval()
    report = load_uni3d(enc, path)
    assert "head.weight" in report.loaded and "blocks.11.mlp.fc1_g.weight" in report.loaded
    assert all(k.startswith(("attributes.", "seq_embed", "order_embed")) for k in report.new)
    assert any(k.startswith("attributes.") for k in report.new)
    assert "module.logit_scale" not in report.ignored and "logit_scale" in report.ignored
    assert "point_encoder.visual.patch_embed.proj.weight" in report.ignored
    assert "loaded" in report.summary() and "attributes" in report.summary()

    with torch.no_grad():
        pc = torch.randn(10, 16, 6)
        torch.testing.assert_close(enc.pos_colour(pc), parts.patch_tokens(pc), atol=1e-4,
                                   rtol=1e-4)
        x = torch.randn(2, 17, 192)
        ref, ours = x, x
        for blk, mine in zip(tower.blocks, enc.blocks):
            ref, ours = blk(ref), mine(ours)
        torch.testing.assert_close(enc.norm(ours), tower.fc_norm(tower.norm(ref)), atol=1e-4,
                                   rtol=1e-4)
        c = torch.rand(4, 3)
        torch.testing.assert_close(enc.pos_embed(c), parts.pos_embed(c))
        torch.testing.assert_close(enc.head.weight, parts.trans2embed.weight)
        torch.testing.assert_close(enc.cls_pos, parts.cls_pos)


@pytest.mark.parametrize("size,kw", [("base", dict(depth=2)), ("giant", dict(depth=1))])
def test_other_eva_layouts_map_to_the_same_function(tmp_path, size, kw):
    """EVA02-B/L's separate q/k/v projections and SwiGLU + norm, EVA-g's GELU MLP."""
    state, tower, _ = uni3d_checkpoint(size, **kw)
    path = save_ckpt(tmp_path, state, "model.safetensors")
    cfg = ModelConfig(size=size).model_dump()
    cfg.update(size="custom", depth=kw["depth"], groups=8, group_size=8)
    enc = GSEncoder(ModelConfig(**cfg), embed_dim=384).eval()  # another teacher width
    report = load_uni3d(enc, path)
    assert "head.weight" in report.new
    assert "teacher width differs" in report.ignored["point_encoder.trans2embed.weight"]
    with torch.no_grad():
        x = torch.randn(2, 9, tower.embed_dim)
        ref, ours = x, x
        for blk, mine in zip(tower.blocks, enc.blocks):
            ref, ours = blk(ref), mine(ours)
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_mismatched_or_foreign_checkpoints_are_clear_errors(tmp_path):
    state, _, _ = uni3d_checkpoint("tiny")
    path = save_ckpt(tmp_path, state)
    small = GSEncoder(ModelConfig(groups=8, group_size=8), 384)  # the CPU default: depth 4
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ClipgsError, match="12 transformer blocks.*model.size"):
        load_uni3d(small, path)
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())  # untouched

    tiny = GSEncoder(ModelConfig(size="tiny", groups=8, group_size=8), 384)
    extra = dict(state, **{"module.point_encoder.visual.blocks.0.gamma_1": torch.ones(192)})
    with pytest.raises(ClipgsError, match="does not know how to place.*gamma_1"):
        load_uni3d(tiny, save_ckpt(tmp_path, extra, "extra.pt"))

    no_block = {k: v for k, v in state.items() if ".blocks.3.mlp.fc2." not in k}
    with pytest.raises(ClipgsError, match="lacks"):
        load_uni3d(tiny, save_ckpt(tmp_path, no_block, "partial.pt"))

    clip = {"visual.proj": torch.zeros(3), "text.token_embedding.weight": torch.zeros(2, 2)}
    with pytest.raises(ClipgsError, match="not a Uni3D checkpoint"):
        load_uni3d(tiny, save_ckpt(tmp_path, clip, "clip.pt"))

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ClipgsError, match="junk.pt"):
        load_uni3d(tiny, str(tmp_path / "junk.pt"))
    with pytest.raises(ClipgsError, match="cannot read"):
        load_uni3d(tiny, str(tmp_path / "missing.pt"))


class Payload:
    def __reduce__(self):  # what an untrusted pickle would run
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"module": {"point_encoder.cls_token": Payload()}}))
    with pytest.raises(ClipgsError, match="tensors-only"):
        load_uni3d(GSEncoder(ModelConfig(size="tiny"), 384), str(path))


def test_build_encoder_uses_init_from(tmp_path):
    state, _, parts = uni3d_checkpoint("tiny", embed_dim=384)
    path = save_ckpt(tmp_path, state)
    enc = build_encoder(ModelConfig(size="tiny", groups=8, group_size=8, init_from=path), 384)
    torch.testing.assert_close(enc.pos_colour.proj.weight, parts.encoder2trans.weight)
    torch.testing.assert_close(enc.head.weight, parts.trans2embed.weight)
