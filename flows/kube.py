"""Multi-node training on Kubernetes: the objects come from the Helm chart (charts/clipgs,
rendered with Helm's own library with only the training component on), so the flow and
`helm install` submit the same indexed Job + headless Service + ConfigMap. The flow creates
them with the ``kubernetes`` client, waits for the Job, and reads the result from MLflow (the
run is named after the Job).

Runs wherever the flow runs: in a pod of the Kubernetes work pool (in-cluster service account,
see the chart's worker RBAC) or on a workstation with a kubeconfig.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from clipgs.config import TrainConfig
from clipgs.errors import ClipgsError, ConfigError

log = logging.getLogger("flows.kube")
CHART = os.environ.get("CLIPGS_CHART", str(Path(__file__).resolve().parents[1] / "charts" /
                                           "clipgs"))
SUBMITTED_KINDS = ("ConfigMap", "Service", "Job")  # and the NetworkPolicy, when enabled
# the chart's release values, mounted into flow-run pods by the work pool's job template
RELEASE_VALUES = "/etc/clipgs/release/values.yaml"


def _release_values() -> str | None:
    path = os.environ.get("CLIPGS_RELEASE_VALUES", RELEASE_VALUES)
    return path if Path(path).is_file() else None


class KubeTrainConfig(BaseModel):
    """Where and how the training Job runs; ``values`` are chart values (train.nodes,
    train.gpusPerNode, train.nodeSelector, image ...), the same keys as `helm install`, over
    ``release_values``: the installed release's (image, registry secrets, S3, MLflow, train.*),
    which the chart mounts into flow-run pods."""
    model_config = ConfigDict(extra="forbid")
    namespace: str = Field(default_factory=lambda: os.environ.get("CLIPGS_NAMESPACE", "default"))
    chart: str = CHART
    values: dict[str, Any] = {}
    release_values: str | None = Field(default_factory=_release_values)
    timeout_s: float = Field(6 * 3600, gt=0, description="give up waiting for the Job")
    poll_s: float = Field(15, gt=0)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_objects(config: TrainConfig, kube: KubeTrainConfig, release: str) -> list[dict]:
    """The ConfigMap, headless Service and indexed Job of one training run, from the chart."""
    import helm_python as helm

    if not config.data.startswith("s3://"):
        raise ConfigError(f"train.data={config.data!r}: ranks on a cluster read shards from "
                          "object storage; give an s3:// prefix")
    config = config.model_copy(deep=True)
    config.output_dir = "/workspace/train"  # the chart's scratch volume in each pod
    base: dict = {}
    if kube.release_values:
        try:
            base = yaml.safe_load(Path(kube.release_values).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"kube.release_values={kube.release_values}: {exc}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"kube.release_values={kube.release_values}: a YAML "
                              f"{type(base).__name__}; expected the chart's values")
    values = _merge(_merge(base, kube.values), {
        "train": {"enabled": True, "config": config.model_dump(mode="json")},
        "mlflowTrackingUri": config.tracking.tracking_uri,
        "worker": {"enabled": False}, "serving": {"enabled": False},
        "mlflow": {"enabled": False}})
    chart = helm.Chart.load(kube.chart)
    try:
        chart.validate_schema(chart.merge_values(values))
    except helm.HelmValuesError as exc:
        raise ConfigError(f"chart values for the training Job: {exc}") from None
    rendered = chart.render(values, name=release, namespace=kube.namespace)
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    objects = [d for d in docs if d["kind"] in SUBMITTED_KINDS + ("NetworkPolicy",)]
    if sorted(o["kind"] for o in objects if o["kind"] != "NetworkPolicy") != \
            sorted(SUBMITTED_KINDS):
        raise ClipgsError(f"{kube.chart}: expected one {SUBMITTED_KINDS} with train.enabled, "
                          f"got {[o['kind'] for o in objects]}")
    # the MLflow run is named after the Job: that is how the flow finds its result
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    train_yaml = yaml.safe_load(cm["data"]["train.yaml"])
    train_yaml["tracking"]["run_name"] = job_name(objects)
    cm["data"]["train.yaml"] = yaml.safe_dump(train_yaml, sort_keys=False)
    return objects


def job_name(objects: list[dict]) -> str:
    return next(o for o in objects if o["kind"] == "Job")["metadata"]["name"]


def _clients():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    return client.BatchV1Api(api), client.CoreV1Api(api)


def submit(objects: list[dict], namespace: str) -> str:
    """Create the Job, then its ConfigMap, Service (and NetworkPolicy) owned by it, so deleting
    the Job, or its TTL after finishing, removes them. Idempotent: a retry after a lost reply
    finds the Job."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    batch, core = _clients()
    job = next(o for o in objects if o["kind"] == "Job")
    try:
        created = batch.create_namespaced_job(namespace, job)
    except ApiException as exc:
        if exc.status != 409:
            raise
        created = batch.read_namespaced_job(job["metadata"]["name"], namespace)
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": created.metadata.name,
             "uid": created.metadata.uid, "blockOwnerDeletion": False}
    create = {"ConfigMap": core.create_namespaced_config_map,
              "Service": core.create_namespaced_service,
              "NetworkPolicy": client.NetworkingV1Api().create_namespaced_network_policy}
    for obj in objects:
        if obj["kind"] == "Job":
            continue
        obj = _merge(obj, {"metadata": {"ownerReferences": [owner]}})
        try:
            create[obj["kind"]](namespace, obj)
        except ApiException as exc:
            if exc.status != 409:
                raise
    log.info("submitted Job %s/%s", namespace, created.metadata.name)
    return created.metadata.name


def wait(name: str, namespace: str, timeout_s: float, poll_s: float) -> dict:
    """Poll the Job until it completes or fails; API hiccups while polling are logged."""
    from flows.retry import is_transient

    batch, _ = _clients()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = batch.read_namespaced_job_status(name, namespace).status
        except Exception as exc:  # noqa: BLE001 - the API's 5xx and a dropped connection alike
            if not is_transient(exc):
                raise
            log.warning("reading Job %s/%s: %s (will poll again)", namespace, name,
                        getattr(exc, "reason", None) or exc)
            time.sleep(poll_s)
            continue
        for c in status.conditions or []:
            if c.status == "True" and c.type in ("Complete", "SuccessCriteriaMet"):
                return {"job": name, "succeeded": status.succeeded or 0}
            if c.status == "True" and c.type == "Failed":
                raise ClipgsError(f"training Job {namespace}/{name} failed: {c.reason}: "
                                  f"{c.message} (kubectl -n {namespace} logs job/{name})")
        log.info("Job %s/%s: %s active, %s succeeded", namespace, name, status.active or 0,
                 status.succeeded or 0)
        time.sleep(poll_s)
    raise ClipgsError(f"training Job {namespace}/{name} did not finish in {timeout_s:.0f} s; "
                      "it is left running for you to inspect or delete")


def training_result(tracking_uri: str, experiment: str, run_name: str) -> dict:
    """The finished training run the Job ran (and named), shaped like a local run's result."""
    import mlflow

    from clipgs.tracking import RUN_NAME_TAG

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    # by the tag each launch sets, not mlflow.runName: a Job that resumed an earlier Job's
    # checkpoint re-opens that Job's MLflow run, which keeps the earlier name
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              max_results=1) if exp else []
    if not runs or runs[0].info.status != "FINISHED":
        raise ClipgsError(f"the Job {run_name} finished but MLflow at {tracking_uri} has no "
                          f"finished run named {run_name} in experiment {experiment!r}")
    run = runs[0]
    return {"run_id": run.info.run_id, "package": f"runs:/{run.info.run_id}/package",
            "steps": int(run.data.params.get("steps", 0)),
            "samples_seen": run.data.metrics.get("samples_seen"),
            "final_loss": run.data.metrics.get("final_loss"), "tracking_uri": tracking_uri}


def roll_serving(deployment: str, namespace: str, version: str) -> bool:
    """Restart the serving pods (as `kubectl rollout restart` does) so that they load the
    champion: `mlflow models serve` resolves models:/clipgs@champion once, at start. The patch
    sets an annotation to the version, so rolling to the version already served changes
    nothing. No such Deployment (serving not installed yet) is a warning, not a failure: the
    champion has moved, and serving loads it when it starts. Returns whether it rolled."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    _clients()
    try:
        client.AppsV1Api().patch_namespaced_deployment(deployment, namespace, {
            "spec": {"template": {"metadata": {"annotations": {
                "clipgs/champion-version": str(version)}}}}})
    except ApiException as exc:
        if exc.status != 404:
            raise
        log.warning("no Deployment %s/%s to roll (serving not installed?); champion v%s is "
                    "what it loads when it starts", namespace, deployment, version)
        return False
    log.info("rolled Deployment %s/%s to champion v%s", namespace, deployment, version)
    return True
