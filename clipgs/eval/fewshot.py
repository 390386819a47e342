"""N-way K-shot linear probe on frozen 3DGS embeddings (method.md section 7; the paper reports
10-way 10-shot on ModelNet as mean +- std over 10 episodes).

Each episode draws N classes, K support objects per class and up to Q query objects per class
from the rest, fits a multinomial logistic regression (L-BFGS, L2) on the support embeddings
and scores the queries. By default support and queries come from the same evaluated split and
never overlap; given ``support`` (another split's embeddings and labels), the support objects
are drawn from it and the queries from the evaluated split (Point-BERT's few-shot protocol).
Seeded, so the same embeddings always give the same figure.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def fit_linear_probe(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3,
                     steps: int = 100) -> torch.nn.Linear:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a problem this small only loses time to thread hand-offs
    try:
        return _fit(x, y, classes, l2, steps)
    finally:
        torch.set_num_threads(threads)


def _fit(x: np.ndarray, y: np.ndarray, classes: int, l2: float, steps: int) -> torch.nn.Linear:
    probe = torch.nn.Linear(x.shape[1], classes)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(xt), yt) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


# what a probe reports (the names a promotion gate may use)
FEWSHOT_METRICS = ("fewshot_acc_mean", "fewshot_acc_std", "fewshot_way", "fewshot_shot",
                   "fewshot_episodes")


def linear_probe_episodes(emb: np.ndarray, labels: np.ndarray, way: int, shot: int,
                          episodes: int, queries: int = 15, seed: int = 0,
                          support: tuple[np.ndarray, np.ndarray] | None = None) -> dict | None:
    """Accuracy mean/std over episodes, or None (with a warning) when fewer than 2 classes
    have ``shot`` support objects and a query. ``way`` shrinks to the classes available; the
    result says so. ``support``: (embeddings, labels) to draw the support objects from instead
    of ``emb`` (the queries still come from ``emb``)."""
    apart = support is not None
    s_emb, s_labels = support if apart else (emb, labels)

    def enough(c) -> bool:
        if apart:
            return (s_labels == c).sum() >= shot and (labels == c).any()
        return (labels == c).sum() > shot

    eligible = [c for c in np.unique(labels) if enough(c)]
    need = (f"{shot} support objects (in the support split) and a query" if apart
            else f"more than {shot} objects")
    if len(eligible) < 2:
        log.warning("few-shot probe skipped: %d classes have %s; need 2", len(eligible), need)
        return None
    if len(eligible) < way:
        log.warning("few-shot probe: only %d classes have %s; running %d-way instead of %d-way",
                    len(eligible), need, len(eligible), way)
        way = len(eligible)
    rng = np.random.default_rng(seed)
    accuracies = []
    with torch.enable_grad():  # L-BFGS needs gradients; callers may be under no_grad
        for _ in range(episodes):
            chosen = rng.choice(eligible, size=way, replace=False)
            sx, sy, qx, qy = [], [], [], []
            for new_label, c in enumerate(chosen):
                members = rng.permutation(np.nonzero(labels == c)[0])
                if apart:
                    sx.append(s_emb[rng.permutation(np.nonzero(s_labels == c)[0])[:shot]])
                    qx.append(emb[members[:queries]])
                else:
                    sx.append(emb[members[:shot]])
                    qx.append(emb[members[shot:shot + queries]])
                sy += [new_label] * shot
                qy += [new_label] * len(qx[-1])
            probe = fit_linear_probe(np.concatenate(sx), np.array(sy), way)
            with torch.no_grad():
                pred = probe(torch.from_numpy(np.concatenate(qx)).float()).argmax(1).numpy()
            accuracies.append(float((pred == np.array(qy)).mean()))
    return dict(zip(FEWSHOT_METRICS, (float(np.mean(accuracies)), float(np.std(accuracies)),
                                      float(way), float(shot), float(episodes))))
