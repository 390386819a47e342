"""The CLIP-GS 3D encoder (method.md sections 2-3), readable in one sitting.

Grouped patches [B, G, k, 14] and centres [B, G, 3] -> GS refinement block (two branches,
summed) + centre position MLP -> CLS + transformer -> projection to the teacher's width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipgs.config import ModelConfig
from clipgs.data.gaussians import NUM_ATTRIBUTES, SLICES


class PointNetPatch(nn.Module):
    """Branch 1: position + colour of each patch through a mini-PointNet (Uni3D's patch
    encoder: shared per-point MLP, max-pool, concat the pooled feature, MLP, max-pool), the
    branch whose weights can come from a point-cloud model. 1x1 convolutions as matmuls."""

    def __init__(self, in_channels: int, width: int, channels: tuple[int, int, int]):
        super().__init__()
        c1, c2, c3 = channels
        self.fc1, self.bn1, self.fc2 = nn.Linear(in_channels, c1), nn.BatchNorm1d(c1), \
            nn.Linear(c1, c2)
        self.fc3, self.bn3, self.fc4 = nn.Linear(2 * c2, c3), nn.BatchNorm1d(c3), \
            nn.Linear(c3, width)

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        return bn(x.flatten(0, 1)).view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, k, C] -> [N, width]
        f = self.fc2(F.relu(self._bn(self.bn1, self.fc1(x))))  # [N, k, c2]
        g = f.max(dim=1, keepdim=True).values.expand_as(f)
        f = self.fc4(F.relu(self._bn(self.bn3, self.fc3(torch.cat([g, f], dim=-1)))))
        return f.max(dim=1).values


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, k, 14] -> [N, width]
        return self.out(self.convs(x.transpose(1, 2)).max(dim=2).values)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GSEncoder(nn.Module):
    def __init__(self, config: ModelConfig, embed_dim: int):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"model.width {config.width} is not divisible by model.heads "
                             f"{config.heads}")
        self.config = config
        self.pos_colour = PointNetPatch(6, config.width, config.pointnet_channels)
        self.attributes = AttributeConv(config.width, config.attribute_channels)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, config.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, embed_dim)

    def forward(self, patches: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """patches [B, G, k, 14], centres [B, G, 3] -> embeddings [B, D] (not normalised)."""
        b, g, k, _ = patches.shape
        flat = patches.reshape(b * g, k, NUM_ATTRIBUTES)
        pc = torch.cat([flat[..., SLICES["xyz"]], flat[..., SLICES["rgb"]]], dim=-1)
        tokens = (self.pos_colour(pc) + self.attributes(flat)).view(b, g, -1)
        tokens = tokens + self.pos_embed(centres)
        if self.training and self.config.patch_dropout > 0:
            keep = max(1, int(g * (1 - self.config.patch_dropout)))
            idx = torch.rand(b, g, device=tokens.device).argsort(dim=1)[:, :keep]
            tokens = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([(self.cls_token + self.cls_pos).expand(b, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
