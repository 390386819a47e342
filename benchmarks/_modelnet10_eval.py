"""The ModelNet10 benchmark's evaluation: unit embeddings of the test shapes through either
grouping path, zero-shot top-1/3/5 against the class prompts (with test-time voting and the
class-frequency check), the 10-way 10-shot probe with support from the test and from the
training shapes, R@1, and where the embedding points. Used by benchmarks/modelnet10.py.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks._modelnet10_cache import teacher_view_checks
from clipgs.config import EvalConfig
from clipgs.data.gaussians import resample
from clipgs.data.sources import MODELNET10_CLASSES
from clipgs.eval.evaluate import class_embeddings
from clipgs.eval.fewshot import linear_probe_episodes
from clipgs.eval.metrics import confusion_matrix, retrieval_metrics, topk_accuracy
from clipgs.models.encoder import GSEncoder
from clipgs.models.teacher import Teacher
from clipgs.models.tokenizer import fps_numpy, group_numpy, group_torch


@torch.no_grad()
def embed(encoder: GSEncoder, points: np.ndarray, args, path: str = "numpy") -> np.ndarray:
    """Unit embeddings, eval mode, grouped as the package serves (group_numpy per object) or
    as training batches are (group_torch from the same first centre)."""
    encoder.eval()
    out = []
    for i in range(0, len(points), 64):
        chunk = points[i:i + 64]
        if path == "numpy":
            grouped = [group_numpy(p, args.groups, args.group_size) for p in chunk]
            patches = torch.from_numpy(np.stack([g[0] for g in grouped]))
            centres = torch.from_numpy(np.stack([g[1] for g in grouped]))
        else:
            start = torch.tensor([int(fps_numpy(p[:, :3], args.groups)[0]) for p in chunk])
            patches, centres = group_torch(torch.from_numpy(chunk), args.groups,
                                           args.group_size, start=start)
        out.append(torch.nn.functional.normalize(encoder(patches, centres), dim=-1).numpy())
    return np.concatenate(out)


def test_split(cache: dict, args):
    """The test shapes, those with gaussians, their labels, and a function drawing a random
    subset of --points gaussians per test object; the first draw is the same for a given --seed
    (one fixed subset per object, as resampling does), whichever encoder is evaluated."""
    test = np.nonzero(cache["split"] == 1)[0]
    valid = test[cache["valid"][test]]
    rng = np.random.default_rng(args.seed)

    def draw() -> np.ndarray:
        return np.stack([resample(p, args.points, rng) for p in cache["points"][valid]])

    return test, valid, cache["label"][valid], draw


def class_prompts(teacher: Teacher) -> np.ndarray:
    """[10, D]: each class through the zero-shot prompt ensemble (EvalConfig().prompts)."""
    return class_embeddings(teacher, list(MODELNET10_CLASSES), EvalConfig().prompts)


def ensemble_top1(encoders: list[GSEncoder], cache: dict, teacher: Teacher, args) -> float:
    """Zero-shot top-1 of the encoders' unit embeddings summed, on --seed's test subset: above
    each encoder's own top-1 on that subset only where their errors differ."""
    _, _, labels, draw = test_split(cache, args)
    subset = draw()
    g = sum(embed(encoder, subset, args) for encoder in encoders)
    return topk_accuracy(g @ class_prompts(teacher).T, labels, 1)


def evaluate(encoder: GSEncoder, cache: dict, teacher: Teacher, args,
             teacher_checks: bool = True) -> dict:
    """The encoder's figures; with teacher_checks, also the teacher's (the same for any
    encoder, so a second evaluation of the same run skips them)."""
    test, valid, labels, draw = test_split(cache, args)
    subset = draw()
    g = embed(encoder, subset, args)
    text = class_prompts(teacher)
    logits = g @ text.T
    n_all = len(test)
    res = {"test_objects": int(n_all), "test_objects_with_gaussians": int(len(valid))}
    for k in (1, 3, 5):
        acc = topk_accuracy(logits, labels, k)
        res[f"zeroshot_top{k}"] = acc
        res[f"zeroshot_top{k}_of_all"] = acc * len(valid) / n_all  # empty grids count wrong
    # the same objects grouped by the training path: voxel lattices tie in FPS and kNN
    # distances, so the two paths' groups (and their order inside a patch) differ there
    res["zeroshot_top1_torch_grouping"] = topk_accuracy(
        embed(encoder, subset, args, path="torch") @ text.T, labels, 1)
    if args.votes > 1:  # test-time voting (PointNet++'s protocol): other random subsets too
        voted = g.copy()
        for _ in range(args.votes - 1):
            voted += embed(encoder, draw(), args)
        res[f"zeroshot_top1_votes{args.votes}"] = topk_accuracy(voted @ text.T, labels, 1)
    res["confusion"] = confusion_matrix(labels, logits.argmax(1), 10).tolist()
    # how the logits lean with the classes' frequency in training - a check, not a method:
    # top-1 with log(training count) / the logit-scale clamp added to, or taken from, each
    # class's cosine (README, stop 23: the trained models gain from adding it)
    lean = np.log(np.bincount(cache["label"][cache["split"] == 0], minlength=10).clip(1)) \
        / args.logit_scale_max
    res["zeroshot_top1_count_prior_plus"] = topk_accuracy(logits + lean, labels, 1)
    res["zeroshot_top1_count_prior_minus"] = topk_accuracy(logits - lean, labels, 1)
    probe = linear_probe_episodes(g, labels, way=10, shot=10, episodes=10, seed=args.seed)
    res.update(probe or {})
    # the same probe with its support drawn from the training shapes (Point-BERT's protocol;
    # evaluate's fewshot_support_split=train), one fixed subset each from its own generator
    train = np.nonzero((cache["split"] == 0) & cache["valid"])[0]
    rng = np.random.default_rng(args.seed + 10_000)
    support = embed(encoder, np.stack([resample(p, args.points, rng)
                                       for p in cache["points"][train]]), args)
    probe = linear_probe_episodes(g, labels, way=10, shot=10, episodes=10, seed=args.seed,
                                  support=(support, cache["label"][train]))
    res.update({k.replace("fewshot_", "fewshot_train_support_"): v
                for k, v in (probe or {}).items() if k.startswith("fewshot_acc")})
    emb = {"g": g, "txt": cache["txt_emb"][labels], "img": cache["img_emb"][valid, 0]}
    res.update({k: v for k, v in retrieval_metrics(emb, [1]).items()})
    # where the embedding points: its cosine with its own caption and with its own view, and
    # how alike the teacher's image embeddings are to each other (the offline teacher's random
    # image tower maps every view to nearly one direction, so the image loss can only be met
    # along the small residuals, which leaves the caption a small share of the embedding)
    unit = {k: v / np.linalg.norm(v, axis=-1, keepdims=True) for k, v in emb.items()}
    res["cos_to_caption"] = float(np.einsum("nd,nd->n", unit["g"], unit["txt"]).mean())
    res["cos_to_view"] = float(np.einsum("nd,nd->n", unit["g"], unit["img"]).mean())
    if teacher_checks:
        pairs = unit["img"] @ unit["img"].T
        res["teacher_view_pairwise_cos"] = float(pairs[np.triu_indices(len(pairs), 1)].mean())
        res.update(teacher_view_checks(cache, valid, text))
    return res
