"""The retraining pipeline as one Prefect flow with a task per stage:
(generate primitives if no source) -> ingest -> train -> evaluate -> register -> promote.

With no PREFECT_API_URL set, Prefect runs it on its ephemeral local API: nothing to start.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from clipgs.config import PipelineConfig, load_config, to_yaml


@task(name="generate-primitives")
def generate_task(out: str, per_class: int) -> str:
    from clipgs.data.synthetic import generate

    return str(generate(out, per_class=per_class))


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_task(source: str, output: str, config: dict) -> dict:
    from clipgs.config import IngestConfig
    from clipgs.data.ingest import ingest

    result = ingest(source, output, IngestConfig.model_validate(config))
    return {"output": output, "train": result.manifest["splits"]["train"]["count"],
            "test": result.manifest["splits"]["test"]["count"],
            "rejected": len(result.rejects)}


@task(name="train")
def train_task(config_path: str) -> dict:
    from clipgs.train.launch import train

    return train(config_path, [])


@task(name="evaluate")
def evaluate_task(package: str, data: str, run_id: str, tracking_uri: str, config: dict
                  ) -> dict:
    from clipgs.config import EvalConfig
    from clipgs.eval.evaluate import evaluate, log_to_mlflow

    result = evaluate(package, data, EvalConfig.model_validate(config))
    log_to_mlflow(result, run_id, tracking_uri)
    return result["metrics"]


@task(name="register", retries=2, retry_delay_seconds=5)
def register_task(run_id: str, tracking_uri: str, name: str) -> str:
    from clipgs.registry.registry import register

    return register(run_id, tracking_uri, name)


@task(name="promote", retries=1, retry_delay_seconds=5)
def promote_task(name: str, version: str, data: str, tracking_uri: str, promote_cfg: dict,
                 eval_cfg: dict) -> dict:
    from clipgs.config import EvalConfig, PromoteConfig
    from clipgs.registry.registry import promote

    return promote(name, data, tracking_uri, PromoteConfig.model_validate(promote_cfg), version,
                   EvalConfig.model_validate(eval_cfg))


@flow(name="clipgs-retrain")
def retrain_flow(config: dict, tracking_uri: str) -> dict:
    cfg = PipelineConfig.model_validate(config)
    logger = get_run_logger()
    work = Path(cfg.workdir)
    source = cfg.source or generate_task(str(work / "primitives"), cfg.primitives_per_class)
    shards = str(work / "shards")
    ingested = ingest_task(source, shards, cfg.ingest.model_dump(mode="json"))
    logger.info("ingested: %s", ingested)

    train_cfg = cfg.train.model_copy(deep=True)
    train_cfg.data = shards
    train_cfg.output_dir = str(work / "train")
    train_cfg.tracking.tracking_uri = tracking_uri
    config_path = work / "train_config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(to_yaml(train_cfg))
    trained = train_task(str(config_path))

    metrics = evaluate_task(trained["package"], shards, trained["run_id"], tracking_uri,
                            cfg.eval.model_dump(mode="json"))
    version = register_task(trained["run_id"], tracking_uri, cfg.model_name)
    decision = promote_task(cfg.model_name, version, shards, tracking_uri,
                            cfg.promote.model_dump(mode="json"), cfg.eval.model_dump(mode="json"))
    return {"ingested": ingested, "training_run_id": trained["run_id"],
            "metrics": metrics, "model": f"models:/{cfg.model_name}/{version}",
            "promotion": {k: decision[k] for k in ("promoted", "reason")},
            "champion": f"models:/{cfg.model_name}@champion",
            "look_at": f"mlflow ui --backend-store-uri {tracking_uri}  (then open "
                       "http://127.0.0.1:5000, experiment 'clipgs')"}


def retrain_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                     tracking_uri: str = "sqlite:///mlflow.db") -> dict:
    config = load_config(PipelineConfig, config_path, overrides)
    print(to_yaml(config))
    return retrain_flow(config.model_dump(mode="json"), tracking_uri)
