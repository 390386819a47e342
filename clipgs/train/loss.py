"""The CLIP-GS losses (method.md section 5), with features gathered across ranks in one place.

As open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``: each rank scores its own
rows against the global batch, so the negatives are the global batch and gradients flow back
through the gather to the rank that made each feature.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

from clipgs.config import LossConfig


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    # torch's functional all-gather, as torchtitan uses: differentiable (its backward
    # reduce-scatters each row's gradient, summed over ranks, back to the rank that made it)
    # and traceable by torch.compile. torch.distributed.nn.functional.all_gather, which
    # open_clip uses, is deprecated from torch 2.14: a FutureWarning on every rank's first
    # step, and refused under compile.
    return funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)


def _rank_offset(local: int) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * local
    return 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of local rows of ``a`` and ``b`` (normalised, [n, D]) against the
    gathered batch: 1/2 [Contra(a_i, B) + Contra(b_i, A)], optionally weighted per row."""
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    target = torch.arange(len(a), device=a.device) + _rank_offset(len(a))
    loss_a = F.cross_entropy(scale * a @ all_b.T, target, reduction="none")
    loss_b = F.cross_entropy(scale * b @ all_a.T, target, reduction="none")
    per_row = 0.5 * (loss_a + loss_b)
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / len(a)


def contrastive_shared_text(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                            tol: float = 1e-4) -> torch.Tensor:
    """``contrastive`` for targets ``b`` that may repeat across the batch (class-name captions:
    64 ModelNet objects share 10 captions), ``loss.text_positives=same_text``.

    a->b as in ``contrastive``: a repeated caption's columns have equal logits, so its count
    in the batch acts as a prior inside the softmax, and the logits learned are free of it.
    b->a once per distinct caption of the global batch (cosine >= 1 - tol), every a that
    shares it a positive, -mean log p over them (UniCL): with one row per object instead, a
    caption repeated n times would push every other object away from it n times as hard, and
    same-caption objects would be each other's negatives. Equal to ``contrastive`` when no
    caption repeats. Each rank's gradient comes from the distinct captions whose first
    occurrence it holds, scaled so that the mean over ranks (DeepSpeed's gradient average) is
    the gradient of the mean over all distinct captions; its value is that global mean on
    every rank, so rank 0's logged loss is the whole batch's."""
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    offset = _rank_offset(len(a))
    target = torch.arange(len(a), device=a.device) + offset
    loss_a = F.cross_entropy(scale * a @ all_b.T, target).float()
    with torch.autocast(a.device.type, enabled=False):  # a bf16 matmul would round 0.998 to 1
        unit = F.normalize(all_b.detach().float(), dim=-1)
        same = unit @ unit.T >= 1 - tol                               # [N, N]
    first = ~same.tril(-1).any(dim=1)                                 # no equal row before it
    mine = first[offset:offset + len(a)]

    def per_caption(rows: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax((scale * rows @ all_a.T).float(), dim=1)
        return -(logp * positives).sum(dim=1) / positives.sum(dim=1)

    world = _world()
    loss_b = per_caption(b[mine], same[offset:offset + len(a)][mine].float()).sum() \
        * world / first.sum()
    if world > 1:  # report the whole batch's value, keep this rank's gradient
        with torch.no_grad():
            everyone = per_caption(all_b[first], same[first].float()).mean()
        loss_b = loss_b + (everyone - loss_b.detach())
    return 0.5 * (loss_a + loss_b)


class _CappedLogScale(torch.autograd.Function):
    """min(p, cap), whose gradient above the cap only ever brings p back under it."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, cap: float) -> torch.Tensor:
        ctx.save_for_backward(p)
        ctx.cap = cap
        return p.clamp(max=cap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        # above the cap, a negative gradient (the step would raise p further) is dropped
        return torch.where((p > ctx.cap) & (grad < 0), torch.zeros_like(grad), grad), None


def capped_log_scale(p: torch.Tensor, cap: float) -> torch.Tensor:
    """The learnable log logit scale, capped at ``cap`` (log of loss.logit_scale_max). A plain
    ``clamp`` in the forward pass gives p a zero gradient once it is above the cap, so the
    scale stays at the cap for good, whatever the loss later wants; open_clip instead clamps
    the parameter in place after each step, which under DeepSpeed the optimiser's fp32 master
    copy would undo. Here the value is min(p, cap) and, above the cap, only gradients that
    lower p pass: the scale can come back down as soon as the loss asks."""
    return _CappedLogScale.apply(p, cap)


def view_weights(img: torch.Tensor, txt: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """[n, K] weights over each object's K views that sum to 1 per object.

    ``vote`` (method.md 5): S_i^k = cos(I_i^k, t_i), the teacher's own image-text agreement,
    normalised over the K views by a softmax at ``vote_temperature`` or linearly
    (max(S, 0) / sum, uniform where no view agrees); ``mean``: uniform; ``random``: one random
    view (Uni3D / OpenShape's baseline). Teacher embeddings are targets: no gradient."""
    n, k, _ = img.shape
    mode = config.image_views
    if mode == "mean":
        return torch.full((n, k), 1.0 / k, device=img.device, dtype=img.dtype)
    if mode == "random":
        pick = torch.randint(0, k, (n,), device=img.device)
        return F.one_hot(pick, k).to(img.dtype)
    if mode != "vote":
        raise ValueError(f"loss.image_views={mode!r}; expected 'vote', 'mean' or 'random'")
    s = torch.einsum("nkd,nd->nk", F.normalize(img.detach(), dim=-1),
                     F.normalize(txt.detach(), dim=-1))
    if config.vote_weighting == "softmax":
        return torch.softmax(s / config.vote_temperature, dim=1)
    s = s.clamp_min(0)
    total = s.sum(dim=1, keepdim=True)
    return torch.where(total > 0, s / total.clamp_min(1e-12), torch.full_like(s, 1.0 / k))


class ClipGSLoss(nn.Module):
    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config

    def forward(self, g: torch.Tensor, txt: torch.Tensor, img: torch.Tensor,
                scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """g [n, D] 3DGS embeddings; txt [n, D]; img [n, K, D] teacher embeddings (unit norm)."""
        g = F.normalize(g, dim=-1)
        text = (contrastive_shared_text(g, txt, scale)
                if self.config.text_positives == "same_text" else contrastive(g, txt, scale))
        w = view_weights(img, txt, self.config)
        image = sum(contrastive(g, img[:, k], scale, w[:, k]) for k in range(img.shape[1]))
        total = self.config.text_weight * text + self.config.image_weight * image
        return {"loss": total, "loss_text": text, "loss_image": image}
