"""Registering trained models in MLflow and gated promotion with aliases.

Every new version gets the ``challenger`` alias. ``promote`` evaluates challenger and champion
on the same shard set (metrics cached on each version per dataset checksum) and moves
``champion`` only when the challenger beats it by the configured margin; the decision and its
reason are recorded as tags on the challenger's version.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from clipgs.config import EvalConfig, PromoteConfig
from clipgs.tracking import git_commit, setup_mlflow

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def register(run_id: str, tracking_uri: str, name: str = "clipgs") -> str:
    """Log the run's model package as a pyfunc model, register it, alias it challenger."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from clipgs.models.package import load_package

    setup_mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    package_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="package")
    package = load_package(package_dir)
    example = pd.DataFrame({"data": ["<base64 of a .ply or .splat file>"], "format": ["ply"]})
    signature = infer_signature(
        example, pd.DataFrame({"embedding": [np.zeros(package.meta["embed_dim"]).tolist()]}))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"package": package_dir},
            code_paths=[str(Path(__file__).parents[1])], signature=signature,
            pip_requirements=_requirements(), registered_model_name=name)
    version = str(info.registered_model_version)
    lineage = {"clipgs.training_run_id": run_id, "clipgs.git_commit": git_commit(),
               "clipgs.dataset_manifest_sha256": package.meta["dataset_manifest_sha256"],
               "clipgs.teacher_sha256": package.meta["teacher"]["sha256"]}
    for k, v in lineage.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, version)
    log.info("registered %s version %s (alias %s) from run %s", name, version, CHALLENGER, run_id)
    return version


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "numpy", "pandas", "plyfile", "fpsample",
                                           "scipy", "safetensors", "pydantic", "mlflow")]


def _version_metrics(client, name: str, version: str, data: str, eval_config: EvalConfig,
                     tracking_uri: str) -> tuple[dict, str]:
    """Evaluate one version on ``data``, cached as a version tag keyed by the dataset."""
    from clipgs.data.shards import manifest_checksum, read_manifest
    from clipgs.eval.evaluate import evaluate

    checksum = manifest_checksum(read_manifest(data))
    tag = f"clipgs.eval.{checksum[:16]}"
    mv = client.get_model_version(name, version)
    if tag in mv.tags:
        return json.loads(mv.tags[tag]), checksum
    result = evaluate(f"models:/{name}/{version}", data, eval_config)
    client.set_model_version_tag(name, version, tag, json.dumps(result["metrics"]))
    return result["metrics"], checksum


def promote(name: str, data: str, tracking_uri: str, config: PromoteConfig | None = None,
            version: str | None = None, eval_config: EvalConfig | None = None) -> dict:
    """Gate ``champion`` on the challenger (or ``version``) beating it on ``data``."""
    import mlflow

    config, eval_config = config or PromoteConfig(), eval_config or EvalConfig()
    setup_mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    version = str(version or client.get_model_version_by_alias(name, CHALLENGER).version)
    challenger, checksum = _version_metrics(client, name, version, data, eval_config,
                                            tracking_uri)
    if config.metric not in challenger:
        raise KeyError(f"metric '{config.metric}' not in the evaluation ({sorted(challenger)})")
    try:
        champion_version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        champion_version = None
    if champion_version == version:
        decision = {"promoted": False, "reason": f"version {version} is already {CHAMPION}"}
    elif champion_version is None:
        decision = {"promoted": True, "reason": f"no {CHAMPION} yet; version {version} has "
                    f"{config.metric}={challenger[config.metric]:.4f}"}
    else:
        champion, _ = _version_metrics(client, name, champion_version, data, eval_config,
                                       tracking_uri)
        new, old = challenger[config.metric], champion.get(config.metric, float("-inf"))
        better = new > old + config.margin
        decision = {"promoted": better, "reason": (
            f"{config.metric}: challenger v{version} {new:.4f} vs champion v{champion_version} "
            f"{old:.4f}, margin {config.margin}: "
            + ("promoted" if better else "kept the champion"))}
    decision.update(version=version, previous_champion=champion_version, metric=config.metric,
                    metrics=challenger, dataset_manifest_sha256=checksum)
    if decision["promoted"]:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "clipgs.promotion", json.dumps(
        {k: decision[k] for k in ("promoted", "reason", "previous_champion", "metric")}))
    log.info("promotion of %s v%s: %s", name, version, decision["reason"])
    return decision
