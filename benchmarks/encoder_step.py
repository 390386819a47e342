"""One training step of the encoder (forward + backward), on the CPU, at ModelNet10's shapes.

Ours (``GSEncoder.forward``: patch dropout decided before the GS tokenizer, so it runs on the
kept patches only; attention written out on the CPU) side by side with two named anchors:

- ``tokenize-all + SDPA``: every patch through the tokenizer, tokens dropped afterwards, and
  ``torch.nn.functional.scaled_dot_product_attention`` (the encoder before this change);
- ``ours + SDPA``: our dropout with PyTorch's SDPA on the CPU (isolates the attention's share).

Under bf16 autocast (what benchmarks/modelnet10.py trains with) and fp32. Interleaved rounds,
best round's median kept, so a neighbour's load on the shared CPU hits all alike.

    .venv/bin/python -m benchmarks.encoder_step [--groups 32] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import clipgs.models.encoder as encoder_module
from clipgs.config import ModelConfig
from clipgs.models.encoder import GSEncoder
from clipgs.models.serialization import serialize


@contextlib.contextmanager
def sdpa_attention():
    """The encoder's attention swapped for PyTorch's fused SDPA for the block."""
    ours = encoder_module.attention
    encoder_module.attention = F.scaled_dot_product_attention
    try:
        yield
    finally:
        encoder_module.attention = ours


def tokenize_all(enc: GSEncoder, patches: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The previous forward: tokens for every patch, serialized, then patch dropout."""
    tokens = enc.tokens(patches, centres)
    b, g, w = tokens.shape
    o = enc.order_index()
    perm = serialize(centres, enc.config.serialization[o])
    tokens = tokens.gather(1, perm[..., None].expand(-1, -1, w)) + enc.seq_embed + \
        enc.order_embed[o]
    keep = max(1, int(g * (1 - enc.config.patch_dropout)))
    idx = torch.rand(b, g).argsort(dim=1)[:, :keep].sort(1).values
    x = torch.cat([(enc.cls_token + enc.cls_pos).expand(b, -1, -1),
                   tokens.gather(1, idx[..., None].expand(-1, -1, w))], dim=1)
    for block in enc.blocks:
        x = block(x)
    return enc.head(enc.norm(x[:, 0]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch-dropout", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = GSEncoder(ModelConfig(groups=args.groups, group_size=args.group_size,
                                patch_dropout=args.patch_dropout), 384).train()
    patches = torch.randn(args.batch, args.groups, args.group_size, 14)
    centres = torch.rand(args.batch, args.groups, 3) * 2 - 1
    print(f"encoder step (forward + backward): batch {args.batch}, {args.groups} patches of "
          f"{args.group_size}, patch dropout {args.patch_dropout}, "
          f"{sum(q.numel() for q in enc.parameters()) / 1e6:.2f}M parameters, "
          f"{args.threads} thread(s); median ms per step, best of {args.rounds} rounds")

    variants = {"ours": (enc, contextlib.nullcontext),
                "ours + SDPA": (enc, sdpa_attention),
                "tokenize-all + SDPA": (lambda a, b: tokenize_all(enc, a, b), sdpa_attention)}
    for precision in ("bf16", "fp32"):
        def step(forward, ctx) -> float:
            with ctx():
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = forward(patches, centres)
                out.float().sum().backward()
                return time.perf_counter() - t0

        best = {name: float("inf") for name in variants}
        for _ in range(args.rounds):
            for name, (forward, ctx) in variants.items():
                step(forward, ctx)  # warm-up
                times = [step(forward, ctx) for _ in range(args.repeats)]
                best[name] = min(best[name], 1e3 * statistics.median(times))
        anchor = best["tokenize-all + SDPA"]
        line = ", ".join(f"{name} {ms:.1f} ms ({anchor / ms:.2f}x)" for name, ms in best.items())
        print(f"{precision}: {line}; speed-up vs tokenize-all + SDPA in brackets")


if __name__ == "__main__":
    main()
