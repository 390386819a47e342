"""Evaluation (method.md section 7) of a model package on a held-out split of a shard set:
zero-shot top-1/3/5 against prompt-ensembled class embeddings, and retrieval R@1 between 3DGS
and the teacher's text and image embeddings. A confusion matrix goes to MLflow as a plot."""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from clipgs.config import EvalConfig
from clipgs.data.shards import check_teacher, iterate, manifest_checksum, read_manifest, shard_urls
from clipgs.errors import ClipgsError
from clipgs.models.package import ModelPackage, load_package
from clipgs.models.teacher import Teacher, TeacherConfig
from clipgs.data.sources import class_text

log = logging.getLogger(__name__)


def class_embeddings(teacher: Teacher, classes: list[str], templates: list[str]) -> np.ndarray:
    """[C, D]: each class's prompts embedded, averaged over templates, renormalised."""
    texts = [t.format(class_text(c)) for c in classes for t in templates]
    emb = teacher.encode_text(texts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def recall_at_1(queries: np.ndarray, gallery: np.ndarray) -> float:
    """Query i's match is gallery i."""
    return float((np.argmax(queries @ gallery.T, axis=1) == np.arange(len(queries))).mean())


def embed_split(package: ModelPackage, urls: list[str], batch_size: int) -> dict:
    keys, labels, g, txt, img, batch = [], [], [], [], [], []

    def flush():
        g.append(package.embed_points([s["gaussians"] for s in batch]))
        batch.clear()

    for sample in tqdm(iterate(urls), desc="evaluate", unit="obj", mininterval=2.0):
        keys.append(sample["key"])
        labels.append(sample["meta"].get("label"))
        txt.append(sample["txt_emb"].astype(np.float32))
        img.append(sample["img_emb"][0].astype(np.float32))
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not keys:
        raise ClipgsError(f"no samples in {urls}")
    return {"keys": keys, "labels": labels, "g": np.concatenate(g), "txt": np.stack(txt),
            "img": np.stack(img)}


def evaluate(model_uri: str, data: str, config: EvalConfig | None = None,
             teacher: Teacher | None = None) -> dict:
    """Metrics of one model on one shard set; returns metrics plus what plots need."""
    config = config or EvalConfig()
    package = load_package(model_uri)
    manifest = read_manifest(data)
    check_teacher(manifest, package.meta["teacher"], data)
    urls = shard_urls(data, manifest, config.split)
    if not urls:
        raise ClipgsError(f"{data}: no '{config.split}' shards to evaluate on")
    out = embed_split(package, urls, config.batch_size)
    metrics = {"eval_objects": float(len(out["keys"])),
               "retrieval_3d_to_text_r1": recall_at_1(out["g"], out["txt"]),
               "retrieval_text_to_3d_r1": recall_at_1(out["txt"], out["g"]),
               "retrieval_3d_to_image_r1": recall_at_1(out["g"], out["img"]),
               "retrieval_image_to_3d_r1": recall_at_1(out["img"], out["g"])}
    classes = manifest["classes"]
    labelled = [i for i, lab in enumerate(out["labels"]) if lab in classes]
    confusion = None
    if labelled:
        teacher = teacher or Teacher(TeacherConfig(**package.meta["teacher"]["config"]))
        teacher.check_identity(package.meta["teacher"], f"model {model_uri}")
        cls = class_embeddings(teacher, classes, config.prompts)
        y = np.array([classes.index(out["labels"][i]) for i in labelled])
        logits = out["g"][labelled] @ cls.T
        for k in (1, 3, 5):
            metrics[f"zeroshot_top{k}"] = topk_accuracy(logits, y, min(k, len(classes)))
        confusion = np.zeros((len(classes), len(classes)), int)
        np.add.at(confusion, (y, logits.argmax(axis=1)), 1)
    log.info("evaluated %s on %s (%d objects): %s", model_uri, data, len(out["keys"]),
             {k: round(v, 4) for k, v in metrics.items()})
    return {"metrics": metrics, "classes": classes, "confusion": confusion,
            "dataset_manifest_sha256": manifest_checksum(manifest)}


def confusion_figure(confusion: np.ndarray, classes: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted (zero-shot)")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def log_to_mlflow(result: dict, run_id: str | None, tracking_uri: str, prefix: str = "eval_"
                  ) -> None:
    """Metrics (and the confusion matrix) on the training run, or a new evaluation run."""
    from clipgs.tracking import setup_mlflow

    mlflow = setup_mlflow(tracking_uri)
    with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name="evaluate"):
        mlflow.log_metrics({prefix + k: v for k, v in result["metrics"].items()})
        mlflow.set_tag("clipgs.eval_dataset_manifest_sha256", result["dataset_manifest_sha256"])
        if result["confusion"] is not None:
            import matplotlib.pyplot as plt

            fig = confusion_figure(result["confusion"], result["classes"])
            mlflow.log_figure(fig, "plots/confusion_matrix.png")
            plt.close(fig)
