"""The metrics of method.md section 7 as pure functions on embeddings (numpy in, floats out):
zero-shot top-k, per-class accuracy, and retrieval Recall@K in the four directions."""

from __future__ import annotations

import numpy as np

RANK_BLOCK = 1024
# bumped whenever a metric's definition changes, so that cached figures (the registry keeps
# each version's evaluation) are never compared with figures of another definition;
# 2: retrieval by a query's best right answer, teacher-side galleries as distinct rows
METRICS_VERSION = 2
# (metric name part, query side, gallery side); query i's match is gallery i
RETRIEVAL_DIRECTIONS = (("text_to_3d", "txt", "g"), ("3d_to_text", "g", "txt"),
                        ("image_to_3d", "img", "g"), ("3d_to_image", "g", "img"))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def duplicate_groups(x: np.ndarray) -> np.ndarray:
    """Group id per row; identical rows share one (objects that share a caption share its
    text embedding, so each is a right answer for the other's caption)."""
    _, group = np.unique(x, axis=0, return_inverse=True)
    return group.ravel()


def match_ranks(queries: np.ndarray, gallery: np.ndarray,
                groups: np.ndarray | None = None,
                gallery_groups: np.ndarray | None = None) -> np.ndarray:
    """Rank (0 = first) of query i's best right answer: how many wrong gallery items score at
    least as high as it. Ties count against the query, so a collapsed model gets no credit.
    Right answers for query i are the gallery items of its group: ``groups[i]`` (from the
    teacher side's duplicates) against ``gallery_groups`` (default: the gallery is indexed like
    the queries, so gallery i is query i's own match and shares ``groups[i]``)."""
    n = len(queries)
    groups = np.arange(n) if groups is None else groups
    gallery_groups = groups if gallery_groups is None else gallery_groups
    ranks = np.empty(n, np.int64)
    for start in range(0, n, RANK_BLOCK):  # blocks of queries: memory stays O(block x n)
        rows = np.arange(start, min(start + RANK_BLOCK, n))
        scores = queries[rows] @ gallery.T
        right = gallery_groups[None, :] == groups[rows, None]
        best = np.where(right, scores, -np.inf).max(axis=1)
        ranks[rows] = ((scores >= best[:, None]) & ~right).sum(axis=1)
    return ranks


def recall_at_k(queries: np.ndarray, gallery: np.ndarray, k: int,
                groups: np.ndarray | None = None) -> float:
    return float((match_ranks(queries, gallery, groups) < k).mean())


def retrieval_metrics(emb: dict[str, np.ndarray], ks: list[int]) -> dict[str, float]:
    """``retrieval_{direction}_r{k}`` for the four directions; ``emb`` has g, txt, img.
    Right answers are grouped by the teacher side of each pair (never by the model's own
    embeddings, which would reward a collapsed model): objects that share a caption are each
    a right answer for it (text->3D: a query scores by the best of them). Where the teacher
    side is the gallery (3D->text, 3D->image), it is ranked as its distinct rows: ten
    captions repeated over 900 objects are a gallery of ten, so R@5 means "the right caption
    among the top five captions", not among five copies of one wrong caption."""
    out = {}
    for direction, q, gallery in RETRIEVAL_DIRECTIONS:
        if gallery == "g":
            ranks = match_ranks(emb[q], emb["g"], duplicate_groups(emb[q]))
        else:
            distinct, group = np.unique(emb[gallery], axis=0, return_inverse=True)
            ranks = match_ranks(emb[q], distinct, group.ravel(), np.arange(len(distinct)))
        for k in ks:
            out[f"retrieval_{direction}_r{k}"] = float((ranks < k).mean())
    return out


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    confusion = np.zeros((classes, classes), int)
    np.add.at(confusion, (labels, predicted), 1)
    return confusion


def per_class_accuracy(confusion: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Recall of each class that has objects in the evaluated split (others are absent)."""
    totals = confusion.sum(axis=1)
    return {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(classes) if totals[i]}
