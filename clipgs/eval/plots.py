"""Figures people look at after an evaluation (matplotlib, Agg): the zero-shot confusion
matrix, galleries of text->3D and image->3D retrievals shown through each object's first
rendered view, and a 2D map (PCA) of the 3DGS embeddings with the class text embeddings in
the same plane."""

from __future__ import annotations

import textwrap

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(confusion: np.ndarray, classes: list[str]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    dark = confusion.max() / 2
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > dark else "black")
    ax.set_xlabel("predicted (zero-shot)")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def gallery_figure(queries: list[str], retrieved: list[list[int]], views: np.ndarray,
                   correct: list[list[bool]], labels: list[str | None],
                   query_views: list[int] | None = None):
    """One row per query - its caption, or with ``query_views`` the query object's first view
    (image->3D) - then the top retrieved objects' first views, framed green when the object
    is the query's own (or of the same class), red otherwise."""
    plt = _plt()
    rows, cols = len(queries), max(len(r) for r in retrieved)
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.6 * (cols + 1) + 1, 1.7 * rows),
                             squeeze=False)
    for r, (query, hits) in enumerate(zip(queries, retrieved)):
        if query_views is None:
            axes[r, 0].axis("off")
            axes[r, 0].text(0, 0.5, "\n".join(textwrap.wrap(query, 22)[:4]), va="center",
                            fontsize=8)
        else:
            q = query_views[r]
            axes[r, 0].imshow(views[q])
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            axes[r, 0].set_title(f"query {labels[q] or ''}", fontsize=7)
        for c in range(cols):
            ax = axes[r, c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(hits):
                ax.axis("off")
                continue
            ax.imshow(views[hits[c]])
            colour = "tab:green" if correct[r][c] else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"#{c + 1} {labels[hits[c]] or ''}", fontsize=7)
    kind = "text" if query_views is None else "image (the query's first view)"
    fig.suptitle(f"{kind} -> 3D retrieval (first rendered view of each retrieved object)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def pca_2d(x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Project ``x`` and ``others`` on x's first two principal axes."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:2].T
    return [(a - mean) @ axes for a in (x, *others)]


def embedding_map_figure(g: np.ndarray, labels: list[str | None], classes: list[str],
                         class_emb: np.ndarray | None):
    plt = _plt()
    points, *rest = pca_2d(g, *([class_emb] if class_emb is not None else []))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    names = sorted({lab for lab in labels if lab is not None}, key=str)
    for i, name in enumerate(names):
        mask = np.array([lab == name for lab in labels])
        colour = cmap(classes.index(name) % cmap.N if name in classes else i % cmap.N)
        ax.scatter(points[mask, 0], points[mask, 1], s=14, color=colour, label=name, alpha=0.8)
    unlabelled = np.array([lab is None for lab in labels])
    if unlabelled.any():
        ax.scatter(points[unlabelled, 0], points[unlabelled, 1], s=10, color="grey",
                   label="(no label)", alpha=0.6)
    if rest:
        for i, (c, (x, y)) in enumerate(zip(classes, rest[0])):
            ax.scatter([x], [y], marker="*", s=180, color=cmap(i % cmap.N), edgecolor="black")
            ax.annotate(c, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_title("3DGS embeddings, PCA to 2D (stars: class text embeddings)", fontsize=9)
    ax.legend(fontsize=7, markerscale=1.2, loc="best")
    fig.tight_layout()
    return fig
