"""Evaluation (method.md section 7) of a model package on one split of a labelled shard set:
zero-shot top-1/3/5 against prompt-ensembled class embeddings with per-class accuracy,
retrieval Recall@K in the four directions (text<->3D, image<->3D), and the N-way K-shot
linear probe. The plots (confusion matrix, retrieval gallery, embedding map) go to MLflow.

Embedding streams the shards with a progress bar; only the embeddings, labels and one
64x64 view per object stay in memory (about 14 KB an object).
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from clipgs.config import EvalConfig
from clipgs.data.shards import (check_shards, check_teacher, iterate, manifest_checksum,
                                read_manifest, shard_urls)
from clipgs.data.sources import class_text
from clipgs.errors import ClipgsError
from clipgs.eval.fewshot import FEWSHOT_METRICS, linear_probe_episodes
from clipgs.eval.metrics import (RETRIEVAL_DIRECTIONS, confusion_matrix, per_class_accuracy,
                                 retrieval_metrics, topk_accuracy)
from clipgs.models.package import ModelPackage, load_package
from clipgs.models.teacher import Teacher, TeacherConfig

log = logging.getLogger(__name__)
ZEROSHOT_KS = (1, 3, 5)


def metric_names(config: EvalConfig) -> list[str]:
    """Every metric ``evaluate`` can report under ``config`` (the zero-shot and few-shot ones
    only when the split has labels): a gate's names are checked against it before anything
    is evaluated."""
    names = ["eval_objects"] + [f"retrieval_{d}_r{k}" for d, *_ in RETRIEVAL_DIRECTIONS
                                for k in config.retrieval_ks]
    names += [f"zeroshot_top{k}" for k in ZEROSHOT_KS] + ["zeroshot_mean_class_acc"]
    return names + list(FEWSHOT_METRICS if config.fewshot_episodes else ())


def class_embeddings(teacher: Teacher, classes: list[str], templates: list[str]) -> np.ndarray:
    """[C, D]: each class's prompts embedded, averaged over templates, renormalised."""
    texts = [t.format(class_text(c)) for c in classes for t in templates]
    emb = teacher.encode_text(texts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def embed_split(package: ModelPackage, urls: list[str], batch_size: int,
                total: int | None = None) -> dict:
    """Stream the shards once: 3DGS embeddings plus what the metrics and plots need."""
    keys, labels, captions, g, txt, img, views, batch = [], [], [], [], [], [], [], []

    def flush():
        g.append(package.embed_points([s["gaussians"] for s in batch]))
        batch.clear()

    for sample in tqdm(iterate(urls), desc="evaluate", unit="obj", total=total,
                       mininterval=2.0):
        keys.append(sample["key"])
        labels.append(sample["meta"].get("label"))
        captions.append(sample["meta"].get("caption", ""))
        txt.append(sample["txt_emb"].astype(np.float32))
        img.append(sample["img_emb"][0].astype(np.float32))  # the first view (a sidecar, if any)
        views.append(sample["views"][0])
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not keys:
        raise ClipgsError(f"no samples in {urls}")
    return {"keys": keys, "labels": labels, "captions": captions, "g": np.concatenate(g),
            "txt": _unit(np.stack(txt)), "img": _unit(np.stack(img)), "views": np.stack(views)}


def _unit(x: np.ndarray) -> np.ndarray:  # float16 storage leaves norms a hair off 1
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _support_urls(data: str, manifest: dict, config: EvalConfig) -> list[str] | None:
    """The shards of ``fewshot_support_split`` (checked before anything is embedded)."""
    split = config.fewshot_support_split
    if not (split and config.fewshot_episodes):
        return None
    urls = shard_urls(data, manifest, split)
    if not urls:
        raise ClipgsError(f"{data}: no '{split}' shards to draw the few-shot support from "
                          f"(fewshot_support_split); its splits: {sorted(manifest['splits'])}")
    return urls


def _support(package: ModelPackage, urls: list[str], manifest: dict,
             config: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """The few-shot probe's support pool: the labelled objects of ``fewshot_support_split``."""
    classes = manifest["classes"]
    total = manifest["splits"][config.fewshot_support_split].get("count")
    out = embed_split(package, urls, config.batch_size, total)
    keep = [i for i, lab in enumerate(out["labels"]) if lab in classes]
    return out["g"][keep], np.array([classes.index(out["labels"][i]) for i in keep], int)


def evaluate(model_uri: str, data: str, config: EvalConfig | None = None,
             teacher: Teacher | None = None) -> dict:
    """Metrics of one model on one shard set. Returns ``metrics`` (flat floats, what gates
    and MLflow use), ``per_class`` accuracy, and what the plots need."""
    config = config or EvalConfig()
    package = load_package(model_uri)
    manifest = read_manifest(data)
    check_teacher(manifest, package.meta["teacher"], data)
    shard_points = manifest.get("config", {}).get("points")
    if shard_points and int(shard_points) != package.points:
        log.warning("%s holds %s gaussians an object; the model was trained on (and serving "
                    "resamples to) %d: these figures may differ from what serving gives",
                    data, shard_points, package.points)
    urls = shard_urls(data, manifest, config.split)
    if not urls:
        raise ClipgsError(f"{data}: no '{config.split}' shards to evaluate on")
    support_urls = _support_urls(data, manifest, config)
    check_shards(data, manifest, config.split)  # a truncated shard: named before the work
    if support_urls:
        check_shards(data, manifest, config.fewshot_support_split)
    total = manifest["splits"].get(config.split, {}).get("count")
    out = embed_split(package, urls, config.batch_size, total)
    metrics = {"eval_objects": float(len(out["keys"]))}
    metrics.update(retrieval_metrics(out, config.retrieval_ks))

    classes = manifest["classes"]
    labelled = np.array([i for i, lab in enumerate(out["labels"]) if lab in classes], int)
    result = {"metrics": metrics, "classes": classes, "confusion": None, "per_class": {},
              "class_emb": None, "dataset_manifest_sha256": manifest_checksum(manifest),
              "model_uri": model_uri, "data": data, "config": config.model_dump(mode="json")}
    if len(labelled):
        teacher = teacher or Teacher(TeacherConfig(**package.meta["teacher"]["config"]))
        teacher.check_identity(package.meta["teacher"], f"model {model_uri}")
        cls = class_embeddings(teacher, classes, config.prompts)
        y = np.array([classes.index(out["labels"][i]) for i in labelled])
        logits = out["g"][labelled] @ cls.T
        for k in ZEROSHOT_KS:
            metrics[f"zeroshot_top{k}"] = topk_accuracy(logits, y, min(k, len(classes)))
        result["confusion"] = confusion_matrix(y, logits.argmax(axis=1), len(classes))
        result["per_class"] = per_class_accuracy(result["confusion"], classes)
        metrics["zeroshot_mean_class_acc"] = float(np.mean(list(result["per_class"].values())))
        result["class_emb"] = cls
        if config.fewshot_episodes:
            support = _support(package, support_urls, manifest, config) if support_urls else None
            probe = linear_probe_episodes(out["g"][labelled], y, config.fewshot_way,
                                          config.fewshot_shot, config.fewshot_episodes,
                                          config.fewshot_queries, config.seed, support)
            metrics.update(probe or {})
    else:
        log.warning("%s: no object of the '%s' split has a label in the manifest's classes; "
                    "zero-shot and few-shot metrics are not computed", data, config.split)
    result["embeddings"] = out
    log.info("evaluated %s on %s (%d objects): %s", model_uri, data, len(out["keys"]),
             {k: round(v, 4) for k, v in metrics.items()})
    return result


def gallery(result: dict, queries: int, top: int, seed: int = 0, query: str = "text") -> dict:
    """Retrievals for ``queries`` objects spread over the split (one per class first, when
    labelled): their top objects and whether each is a right answer (the query's own object,
    or one of its class). ``query="text"`` searches by the object's caption (text->3D),
    ``"image"`` by its first rendered view (image->3D, the view the gallery shows)."""
    if query not in ("text", "image"):
        raise ValueError(f"query={query!r}; expected 'text' or 'image'")
    out = result["embeddings"]
    n = len(out["keys"])
    order = np.random.default_rng(seed).permutation(n)
    picked, seen = [], set()
    for i in order:  # distinct classes first, then anything
        if len(picked) == queries:
            break
        if out["labels"][i] not in seen:
            picked.append(int(i))
            seen.add(out["labels"][i])
    chosen = set(picked)
    picked += [int(i) for i in order if int(i) not in chosen][:queries - len(picked)]
    scores = out["txt" if query == "text" else "img"][picked] @ out["g"].T
    hits = np.argsort(-scores, axis=1)[:, :top]
    correct = [[int(j) == q or (out["labels"][q] is not None
                                and out["labels"][int(j)] == out["labels"][q]) for j in row]
               for q, row in zip(picked, hits)]
    return {"queries": [out["captions"][q] for q in picked], "query_objects": picked,
            "retrieved": hits.tolist(), "correct": correct}


def check_run(run_id: str, tracking_uri: str) -> None:
    """Refuse a ``--run-id`` that cannot be logged to before the evaluation, not after it."""
    import mlflow

    from clipgs.models.package import mlflow_error

    mlflow.set_tracking_uri(tracking_uri)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise mlflow_error(f"run {run_id}", exc) from None
    if run.info.lifecycle_stage != "active":
        raise ClipgsError(f"run {run_id}: {run.info.lifecycle_stage} in MLflow at "
                          f"{tracking_uri}; expected an active run to log to")


def log_to_mlflow(result: dict, run_id: str | None, tracking_uri: str, prefix: str = "eval_",
                  experiment: str = "clipgs") -> str:
    """Metrics, per-class accuracy and the plots on the training run (or a new evaluation
    run in ``experiment``); returns the run id."""
    import matplotlib.pyplot as plt

    from clipgs.eval import plots
    from clipgs.tracking import resume_run, setup_mlflow

    mlflow = setup_mlflow(tracking_uri, None if run_id else experiment)
    cfg = EvalConfig.model_validate(result.get("config", {}))
    active = resume_run(run_id) if run_id else mlflow.start_run(run_name="evaluate")
    with active as run:
        mlflow.log_metrics({prefix + k: v for k, v in result["metrics"].items()})
        mlflow.log_metrics({f"{prefix}class_acc.{c}": v for c, v in result["per_class"].items()})
        mlflow.set_tags({"clipgs.eval_dataset_manifest_sha256": result["dataset_manifest_sha256"],
                         "clipgs.eval_data": str(result.get("data", "")),
                         "clipgs.eval_model": str(result.get("model_uri", ""))})
        mlflow.log_dict({"metrics": result["metrics"], "per_class_accuracy": result["per_class"],
                         "config": result.get("config")}, "eval/metrics.json")
        figures = {}
        if cfg.plots and result["confusion"] is not None:
            figures["plots/confusion_matrix.png"] = plots.confusion_figure(
                result["confusion"], result["classes"])
        out = result.get("embeddings")
        if cfg.plots and out is not None:
            if cfg.gallery_queries:
                gal = gallery(result, cfg.gallery_queries, cfg.gallery_top, cfg.seed)
                figures["plots/retrieval_gallery.png"] = plots.gallery_figure(
                    gal["queries"], gal["retrieved"], out["views"], gal["correct"],
                    out["labels"])
                gal = gallery(result, cfg.gallery_queries, cfg.gallery_top, cfg.seed, "image")
                figures["plots/retrieval_gallery_image.png"] = plots.gallery_figure(
                    gal["queries"], gal["retrieved"], out["views"], gal["correct"],
                    out["labels"], query_views=gal["query_objects"])
            if len(out["keys"]) >= 3:
                figures["plots/embedding_map.png"] = plots.embedding_map_figure(
                    out["g"], out["labels"], result["classes"], result["class_emb"])
        for path, fig in figures.items():
            mlflow.log_figure(fig, path)
            plt.close(fig)
        return run.info.run_id
