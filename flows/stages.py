"""One Prefect flow per stage: ingest, train (local ranks or a multi-node Job on Kubernetes),
evaluate, promote. Each can run alone (the on-demand deployments in prefect.yaml) and the
retraining flow (flows/pipeline.py) chains them. The work is done by the ``clipgs`` library;
I/O tasks retry transient failures with back-off (flows/retry.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from clipgs.config import EvalConfig, IngestConfig, PromoteConfig, TrainConfig, to_yaml
from clipgs.tracking import tracking_uri
from flows.kube import KubeTrainConfig
from flows.retry import TRANSIENT_IO

tracking = tracking_uri  # an explicit URI, else MLFLOW_TRACKING_URI, else the sqlite store


# ---- ingest -------------------------------------------------------------------------------
@task(name="generate-primitives")
def generate_task(out: str, per_class: int) -> str:
    from clipgs.data.synthetic import generate

    return str(generate(out, per_class=per_class))


@task(name="ingest", **TRANSIENT_IO)
def ingest_task(source: str, output: str, config: IngestConfig) -> dict:
    from clipgs.data.ingest import ingest

    result = ingest(source, output, config)
    for r in result.rejects:
        get_run_logger().warning("rejected %s: %s", r["source"], r["error"])
    m = result.manifest
    from clipgs.data.shards import manifest_checksum

    # the manifest's checksum changes with every ingestion (its time and stage seconds too), so
    # a new retrain's training never mistakes itself for an earlier one
    return {"output": output, "manifest_sha256": manifest_checksum(m),
            "train": m["splits"]["train"]["count"],
            "test": m["splits"]["test"]["count"], "rejected": len(result.rejects),
            "shards_written": result.written_shards, "shards_skipped": result.skipped_shards}


@flow(name="clipgs-ingest")
def ingest_flow(source: str, output: str, config: IngestConfig = IngestConfig()) -> dict:
    """Assets (folder or s3://) -> webdataset shards + manifest (folder or s3://)."""
    return ingest_task(source, output, config)


# ---- train --------------------------------------------------------------------------------
@task(name="train-local-ranks")
def train_local_task(config_path: str) -> dict:
    from clipgs.train.launch import train

    return train(config_path, [])


@task(name="render-train-job")
def render_job_task(config: TrainConfig, kube: KubeTrainConfig, release: str) -> list[dict]:
    from flows.kube import train_objects

    return train_objects(config, kube, release)


@task(name="submit-train-job", **TRANSIENT_IO)
def submit_job_task(objects: list[dict], namespace: str) -> str:
    from flows.kube import submit

    return submit(objects, namespace)


@task(name="wait-train-job")
def wait_job_task(name: str, namespace: str, timeout_s: float, poll_s: float) -> dict:
    from flows.kube import wait

    return wait(name, namespace, timeout_s, poll_s)


@task(name="read-train-result", **TRANSIENT_IO)
def train_result_task(tracking_uri: str, experiment: str, run_name: str) -> dict:
    from flows.kube import training_result

    return training_result(tracking_uri, experiment, run_name)


@flow(name="clipgs-train")
def train_flow(config: TrainConfig, backend: Literal["local", "kubernetes"] = "local",
               kube: KubeTrainConfig | None = None, workdir: str = "work") -> dict:
    """One DeepSpeed run: ``local`` spawns ``config.nproc`` ranks here (clipgs.train.launch);
    ``kubernetes`` submits the chart's indexed Job (train.nodes x train.gpusPerNode ranks),
    waits for it and reads the run from MLflow."""
    if backend == "local":
        path = Path(workdir) / "train_config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_yaml(config))
        return train_local_task(str(path))
    from flows.kube import job_name

    kube = kube or KubeTrainConfig()
    release = f"train-{(flow_run.get_id() or uuid.uuid4().hex)[:8]}"
    objects = render_job_task(config, kube, release)
    name = job_name(objects)
    submit_job_task(objects, kube.namespace)
    wait_job_task(name, kube.namespace, kube.timeout_s, kube.poll_s)
    return train_result_task(config.tracking.tracking_uri, config.tracking.experiment, name)


# ---- evaluate -----------------------------------------------------------------------------
@task(name="evaluate", **TRANSIENT_IO)
def evaluate_task(model: str, data: str, config: EvalConfig, run_id: str | None,
                  tracking_uri: str) -> dict:
    import mlflow

    from clipgs.eval.evaluate import evaluate, log_to_mlflow

    mlflow.set_tracking_uri(tracking_uri)  # runs:/ and models:/ URIs resolve against it
    result = evaluate(model, data, config)
    log_to_mlflow(result, run_id, tracking_uri)
    return result["metrics"]


@flow(name="clipgs-evaluate")
def evaluate_flow(model: str = "models:/clipgs@champion", data: str = "work/shards",
                  config: EvalConfig = EvalConfig(), run_id: str | None = None,
                  tracking_uri: str | None = None) -> dict:
    """Zero-shot and retrieval metrics of a model (folder, runs:/ or models:/) on shards,
    logged to ``run_id`` or to a new MLflow run."""
    return evaluate_task(model, data, config, run_id, tracking(tracking_uri))


# ---- promote ------------------------------------------------------------------------------
@task(name="register", **TRANSIENT_IO)
def register_task(run_id: str, tracking_uri: str, name: str) -> str:
    from clipgs.registry.registry import register

    return register(run_id, tracking_uri, name)


@task(name="promote", **TRANSIENT_IO)
def promote_task(name: str, version: str | None, data: str, tracking_uri: str,
                 config: PromoteConfig, eval_config: EvalConfig) -> dict:
    from clipgs.registry.registry import promote

    return promote(name, data, tracking_uri, config, version, eval_config)


@task(name="roll-serving", **TRANSIENT_IO)
def roll_serving_task(deployment: str, namespace: str, version: str) -> bool:
    from flows.kube import roll_serving

    return roll_serving(deployment, namespace, version)


def serving_namespace() -> str:
    return os.environ.get("CLIPGS_NAMESPACE", "default")


def champion_after(decision: dict) -> str | None:
    """The champion a promotion decision leaves: the challenger when promoted or already
    champion, else the champion it kept."""
    if decision["promoted"] or decision["previous_champion"] == decision["version"]:
        return decision["version"]
    return decision["previous_champion"]


@flow(name="clipgs-promote")
def promote_flow(data: str, model_name: str = "clipgs", run_id: str | None = None,
                 version: str | None = None, config: PromoteConfig = PromoteConfig(),
                 eval_config: EvalConfig = EvalConfig(), tracking_uri: str | None = None,
                 serving_deployment: str | None = None) -> dict:
    """Register ``run_id`` (alias challenger) unless a ``version`` is given, then move
    ``champion`` only if the challenger is strictly better on ``data``; then roll the serving
    Deployment (if named) to the champion. Rolling to the version it already serves changes
    nothing, so a run whose roll failed after the promotion is mended by running it again."""
    uri = tracking(tracking_uri)
    if run_id and not version:
        version = register_task(run_id, uri, model_name)
    decision = promote_task(model_name, version, data, uri, config, eval_config)
    champion = champion_after(decision)
    if serving_deployment and champion:
        roll_serving_task(serving_deployment, serving_namespace(), champion)
    return decision
