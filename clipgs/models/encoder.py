"""The CLIP-GS 3D encoder (method.md sections 2-3), readable in one sitting.

Grouped patches [B, G, k, 14] and centres [B, G, 3] -> GS refinement block (two branches,
summed) + centre position MLP -> serialization along a space-filling curve -> patch dropout ->
CLS + transformer -> projection to the teacher's width.

Module names follow Uni3D's point encoder and timm's EVA blocks where the weights can come from
a Uni3D checkpoint (clipgs/models/uni3d.py holds the key map).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipgs.config import ModelConfig
from clipgs.data.gaussians import NUM_ATTRIBUTES, SLICES
from clipgs.models.serialization import serialize

log = logging.getLogger(__name__)


class PointNetPatch(nn.Module):
    """Branch 1: position + colour of each patch through a mini-PointNet, Uni3D's patch encoder
    (shared per-point MLP, max-pool, concat the pooled feature, MLP, max-pool) and its
    ``encoder2trans`` projection. The branch whose weights can come from a point-cloud model.
    1x1 convolutions as matmuls."""

    def __init__(self, in_channels: int, width: int, channels: tuple[int, int, int], out: int):
        super().__init__()
        c1, c2, c3 = channels
        self.fc1, self.bn1, self.fc2 = nn.Linear(in_channels, c1), nn.BatchNorm1d(c1), \
            nn.Linear(c1, c2)
        self.fc3, self.bn3, self.fc4 = nn.Linear(2 * c2, c3), nn.BatchNorm1d(c3), \
            nn.Linear(c3, out)
        self.proj = nn.Linear(out, width)

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        return bn(x.flatten(0, 1)).view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, k, C] -> [N, width]
        f = self.fc2(F.relu(self._bn(self.bn1, self.fc1(x))))  # [N, k, c2]
        g = f.max(dim=1, keepdim=True).values.expand_as(f)
        f = self.fc4(F.relu(self._bn(self.bn3, self.fc3(torch.cat([g, f], dim=-1)))))
        return self.proj(f.max(dim=1).values)


class AttributeConv(nn.Module):
    """Branch 2: all 14 activated attributes through 1x3 convolutions with strides 1, 1, 2, 2
    (BatchNorm + ReLU each) and global pooling over the patch."""

    def __init__(self, width: int, channels: tuple[int, int, int, int]):
        super().__init__()
        layers, c_in = [], NUM_ATTRIBUTES
        for c_out, stride in zip(channels, (1, 1, 2, 2)):
            layers += [nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1),
                       nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, width)
        # zero-initialised, so the branch starts as a no-op on top of branch 1: the tokens of
        # a loaded point-cloud model are what that model made, and branch 2 only grows where
        # the loss asks for it (with random init it added noise to every token and, on
        # ModelNet10's voxel gaussians, fitted the training shapes instead)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, k, 14] -> [N, width]
        return self.out(self.convs(x.transpose(1, 2)).max(dim=2).values)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, T, d]. On the GPU, PyTorch's fused SDPA. On
    the CPU, written out: for short sequences PyTorch's CPU SDPA kernels are no faster in fp32
    and much slower under bf16 autocast, backward included (benchmarks/encoder_step.py: the
    whole encoder step is 1.3x faster with this at 17 tokens, bf16)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """EVA's attention: a bias-free qkv matmul plus learnable q and v biases (k has none)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, t, 3, self.heads, -1).unbind(2)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    """``gelu``: fc1 -> GELU -> fc2 (EVA-giant, the CPU default); ``swiglu``:
    SiLU(fc1_g) * fc1_x -> fc2 (EVA02-Ti/S); ``swiglu_norm``: with a LayerNorm before fc2
    (EVA02-B/L)."""

    def __init__(self, width: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "gelu":
            self.fc1 = nn.Linear(width, hidden)
        else:
            self.fc1_g, self.fc1_x = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6) if kind == "swiglu_norm" else nn.Identity()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x)) if self.kind == "gelu" else F.silu(self.fc1_g(x)) * self.fc1_x(x)
        return self.fc2(self.norm(h))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's DropPath): in training, zero a residual branch's output for a
    random ``rate`` share of the samples and scale the rest by 1 / (1 - rate), so its expected
    value is unchanged; the identity in evaluation or at rate 0."""
    if not training or rate == 0:
        return x
    keep = 1 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block, EVA's layout (norm1, attn, norm2, mlp), with stochastic
    depth on both residual branches (``drop_path``, no weights: checkpoints are unaffected)."""

    def __init__(self, width: int, heads: int, hidden: int, mlp: str, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.mlp = Mlp(width, hidden, mlp)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class GSEncoder(nn.Module):
    def __init__(self, config: ModelConfig, embed_dim: int):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"model.width {config.width} is not divisible by model.heads "
                             f"{config.heads}")
        self.config = config
        w = config.width
        self.pos_colour = PointNetPatch(6, w, config.pointnet_channels, config.pointnet_out)
        self.attributes = AttributeConv(w, config.attribute_channels) \
            if config.attribute_branch else None
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, w))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        # Serialization is only visible to attention through these: an embedding of each
        # token's index along the curve, and one per order (as Point Transformer V3's prompts).
        orders = config.serialization
        self.seq_embed = nn.Parameter(torch.zeros(1, config.groups, w)) if orders else None
        self.order_embed = nn.Parameter(torch.zeros(len(orders), w)) if orders else None
        hidden = config.mlp_hidden or int(w * config.mlp_ratio)
        # timm's schedule: 0 at the first block, rising linearly to drop_path at the last
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(w, config.heads, hidden, config.mlp, rate)
                                    for rate in rates)
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.head = nn.Linear(w, embed_dim)
        if orders:
            nn.init.normal_(self.seq_embed, std=0.02)
            nn.init.normal_(self.order_embed, std=0.02)

    def tokens(self, patches: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """The GS tokenizer's output: [B, G, k, 14], [B, G, 3] -> tokens [B, G, width]."""
        b, g, k, _ = patches.shape
        flat = patches.reshape(b * g, k, NUM_ATTRIBUTES)
        pc = torch.cat([flat[..., SLICES["xyz"]], flat[..., SLICES["rgb"]]], dim=-1)
        tokens = self.pos_colour(pc)
        if self.attributes is not None:
            tokens = tokens + self.attributes(flat)
        return tokens.view(b, g, -1) + self.pos_embed(centres)

    def order_index(self) -> int:
        """One order per batch while training (drawn from torch's RNG), the first otherwise."""
        n = len(self.config.serialization)
        return int(torch.randint(n, ())) if self.training and n > 1 else 0

    def forward(self, patches: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """patches [B, G, k, 14], centres [B, G, 3] -> embeddings [B, D] (not normalised).

        Serialization and patch dropout only pick and order patches, so both are decided
        first, from the centres, and the tokenizer runs on the kept patches alone: with
        Uni3D's dropout of 0.5 the GS refinement block (most of a step's cost) does half the
        work. Outputs are the same as tokenizing every patch and dropping tokens afterwards,
        except that BatchNorm's training statistics come from the kept patches."""
        b, g = centres.shape[:2]
        index = None  # the patches to tokenize, in token order [B, G'] (None: all, as given)
        if self.seq_embed is not None:
            if g != self.seq_embed.shape[1]:
                raise ValueError(f"{g} patches per object, but the model was built for "
                                 f"model.groups={self.seq_embed.shape[1]}")
            o = self.order_index()
            index = serialize(centres, self.config.serialization[o])  # [B, G] patch ids
        position = None  # each kept token's place along the curve
        if self.training and self.config.patch_dropout > 0:
            keep = max(1, int(g * (1 - self.config.patch_dropout)))
            # sorted, so the survivors keep their serialized order
            position = torch.rand(b, g, device=centres.device).argsort(dim=1)[:, :keep] \
                .sort(1).values
            index = position if index is None else index.gather(1, position)
        if index is not None:
            patches = patches.gather(1, index[..., None, None].expand(-1, -1, *patches.shape[2:]))
            centres = centres.gather(1, index[..., None].expand(-1, -1, 3))
        tokens = self.tokens(patches, centres)
        w = tokens.shape[-1]
        if self.seq_embed is not None:
            seq = self.seq_embed.expand(b, -1, -1) if position is None else \
                self.seq_embed.expand(b, -1, -1).gather(1, position[..., None].expand(-1, -1, w))
            tokens = tokens + seq + self.order_embed[o]
        x = torch.cat([(self.cls_token + self.cls_pos).expand(b, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def build_encoder(config: ModelConfig, embed_dim: int, init: bool = True) -> GSEncoder:
    """The encoder of a new training run: initialised from ``config.init_from`` (a Uni3D
    checkpoint) when given and ``init`` (not when a resume overwrites it anyway), with the load
    report logged."""
    encoder = GSEncoder(config, embed_dim)
    if config.init_from and init:
        from clipgs.models.uni3d import load_uni3d

        report = load_uni3d(encoder, config.init_from)
        log.info("%s", report.summary())
    return encoder
