"""The retraining flow: (generate primitives if no source) -> ingest -> train -> evaluate ->
register -> promote, each stage a flow or task of flows/stages.py.

Each finished stage is recorded in the workdir's stage ledger (flows/ledger.py), so a retrain
that failed half-way resumes from the last finished stage when run again with the same
config (a retrain that completed does not: the next one starts afresh). Every run leaves a
Prefect artifact with the metrics and the promotion decision.

With no PREFECT_API_URL set, Prefect runs it on its ephemeral local API: nothing to start
(`clipgs pipeline`); prefect.yaml deploys the same flow to a work pool.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from clipgs.config import IngestConfig, PipelineConfig, load_config, to_yaml
from clipgs.data import storage
from clipgs.errors import ConfigError
from flows.kube import KubeTrainConfig
from flows.ledger import StageLedger, stage_key
from flows.stages import (champion_after, evaluate_flow, generate_task, ingest_flow,
                          promote_flow, register_task, roll_serving_task, serving_namespace,
                          tracking, train_flow)

ARTIFACT_KEY = "clipgs-retrain"


def ingest_keys(source: str, output: str, config: IngestConfig) -> tuple[str, ...]:
    """The ingest stage's ledger key, then the key an older clipgs gave the same inputs. The
    key leaves out what does not change the shards: ``workers`` (its default follows the
    machine's cores, so a flow-run pod on another node would have re-ingested, changed the
    manifest and restarted an interrupted training from scratch) and ``multipart_mb``. The older
    key (workers included, ``up`` absent) still finds a retrain interrupted before the upgrade;
    it exists only at ``up=auto``, the axis older code rendered around."""
    def key(exclude: set[str]) -> str:
        return stage_key("ingest", {"source": source, "output": output,
                                    "config": config.model_dump(mode="json", exclude=exclude)})

    new = key({"workers", "multipart_mb"})
    return (new, key({"up"})) if config.up == "auto" else (new,)


@flow(name="clipgs-retrain")
def retrain_flow(config: PipelineConfig = PipelineConfig(), tracking_uri: str | None = None,
                 backend: Literal["local", "kubernetes"] = "local",
                 kube: KubeTrainConfig | None = None,
                 serving_deployment: str | None = None) -> dict:
    cfg = config
    tracking_uri = tracking(tracking_uri)
    logger = get_run_logger()
    ledger = StageLedger(cfg.workdir)
    if ledger.resuming:
        logger.info("resuming an unfinished retrain: %s lists %s", ledger.url, list(ledger.stages))
    ran: list[str] = []
    skipped: list[str] = []

    def stage(name: str, inputs: dict | tuple[str, ...], run: Callable[[], Any]) -> Any:
        keys = inputs if isinstance(inputs, tuple) else (stage_key(name, inputs),)
        key = keys[0]
        done = ledger.finished(name, *keys)
        if done is not None:
            logger.info("stage %s finished in an earlier run (%s): skipped", name, ledger.url)
            skipped.append(name)
            return done
        out = run()
        ledger.record(name, key, out, flow_run.get_id())
        ran.append(name)
        return out

    local = not storage.is_s3(cfg.workdir)
    if backend == "local" and not local:
        raise ConfigError(f"workdir={cfg.workdir}: local training writes to a local folder")
    source = cfg.source
    if source is None:
        if not local:
            raise ConfigError("source: give the assets (s3://...) when the workdir is in S3")
        out = storage.join(cfg.workdir, "primitives")
        source = stage("generate", {"out": out, "per_class": cfg.primitives_per_class},
                       lambda: generate_task(out, cfg.primitives_per_class))
    shards = storage.join(cfg.workdir, "shards")
    ingested = stage("ingest", ingest_keys(source, shards, cfg.ingest),
                     lambda: ingest_flow(source, shards, cfg.ingest))
    logger.info("ingested: %s", ingested)

    train_cfg = cfg.train.model_copy(deep=True)
    train_cfg.data = shards
    train_cfg.output_dir = storage.join(cfg.workdir, "train")
    train_cfg.tracking.tracking_uri = tracking_uri
    # the release values' path is the same in every flow-run pod (and was not a field before):
    # not part of the key, so a retrain interrupted across an upgrade still resumes
    train_inputs = {"config": train_cfg.model_dump(mode="json"), "data": ingested,
                    "backend": backend,
                    "kube": kube.model_dump(mode="json", exclude={"release_values"})
                    if kube else None}
    # One folder per training: a retrain resumed after a failure has the same inputs, so it
    # finds its checkpoints there (and in the mirror) and resumes inside training; a new
    # retrain (new data, new manifest) starts fresh rather than resuming yesterday's run.
    run_dir = stage_key("train", train_inputs)[:12]
    train_cfg.output_dir = storage.join(cfg.workdir, "train", run_dir)
    if not local and not train_cfg.checkpoint_mirror:
        train_cfg.checkpoint_mirror = storage.join(cfg.workdir, "checkpoints", run_dir)
    trained = stage("train", train_inputs,
                    lambda: train_flow(train_cfg, backend, kube, cfg.workdir))

    metrics = stage("evaluate", {"model": trained["package"], "run_id": trained["run_id"],
                                 "data": shards, "config": cfg.eval.model_dump(mode="json")},
                    lambda: evaluate_flow(trained["package"], shards, cfg.eval,
                                          trained["run_id"], tracking_uri))
    version = stage("register", {"run_id": trained["run_id"], "name": cfg.model_name,
                                 "tracking_uri": tracking_uri},
                    lambda: register_task(trained["run_id"], tracking_uri, cfg.model_name))
    # allow_rolled_back left off is left out of the key: a promotion finished before the
    # field existed keeps its key (and is not run again)
    gated = cfg.promote.model_dump(mode="json", exclude=None if cfg.promote.allow_rolled_back
                                   else {"allow_rolled_back"})
    decision = stage("promote", {"version": version, "data": shards, "config": gated,
                                 "eval": cfg.eval.model_dump(mode="json")},
                     lambda: promote_flow(shards, cfg.model_name, version=version,
                                          config=cfg.promote, eval_config=cfg.eval,
                                          tracking_uri=tracking_uri))
    # a stage of its own, after the promotion is recorded: a roll that failed (RBAC, API
    # down) is retried by the next run, which skips the promotion
    champion = champion_after(decision)
    if serving_deployment and champion:
        stage("roll-serving", {"deployment": serving_deployment, "version": champion,
                               "namespace": serving_namespace()},
              lambda: roll_serving_task(serving_deployment, serving_namespace(), champion))
    summary = {"ingested": ingested, "training_run_id": trained["run_id"],
               "package": trained["package"], "metrics": metrics,
               "model": f"models:/{cfg.model_name}/{version}",
               "promotion": {k: decision[k] for k in ("promoted", "reason")},
               "champion": f"models:/{cfg.model_name}@champion",
               "stages": {"ran": ran, "skipped": skipped, "ledger": ledger.url},
               "look_at": f"mlflow ui --backend-store-uri {tracking_uri}  (then open "
                          "http://127.0.0.1:5000, experiment 'clipgs')"}
    ledger.complete()
    _report(summary, decision)
    return summary


def _report(summary: dict, decision: dict) -> None:
    """The run's artifact: metrics of the challenger (and the champion it was compared to, as
    the registry recorded them) and the decision."""
    metrics = summary["metrics"]
    create_table_artifact(key=ARTIFACT_KEY + "-metrics", table=[
        {"metric": k, "value": round(float(v), 4)} for k, v in sorted(metrics.items())],
        description=f"evaluation of {summary['model']}")
    rows = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in sorted(metrics.items()))
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    create_markdown_artifact(key=ARTIFACT_KEY, description="retrain: metrics and promotion",
                             markdown=(
        f"# Retrain of {summary['model']}\n\n"
        f"**Decision: {verdict}.** {decision['reason']}\n\n"
        f"Training run `{summary['training_run_id']}`; stages run: "
        f"{', '.join(summary['stages']['ran']) or 'none'}; resumed (skipped): "
        f"{', '.join(summary['stages']['skipped']) or 'none'}.\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"))


def retrain_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                     tracking_uri: str = "sqlite:///mlflow.db") -> dict:
    """`clipgs pipeline`: load and print the config, then run the retraining flow."""
    config = load_config(PipelineConfig, config_path, overrides)
    print(to_yaml(config))
    return retrain_flow(config, tracking_uri)
