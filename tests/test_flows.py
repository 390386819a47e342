"""The stage flows under Prefect's test harness: which failures retry, a stage that meets a
real transient S3 failure once and is retried, a hard failure that is not, and the objects the
train flow submits to Kubernetes (built from the chart, validated against the schemas; no
cluster here, so submit/wait are not exercised)."""

import socket

import pytest
import yaml

from clipgs.config import IngestConfig, TrainConfig, load_config
from clipgs.errors import ConfigError, StorageError
from faults import FaultyProxy


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_runs(prefix: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
    return [r for r in runs if r.name.startswith(prefix)]


def test_only_transient_failures_retry():
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from kubernetes.client.exceptions import ApiException
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from flows.retry import is_transient

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    # a real connection failure, wrapped the way clipgs.data.storage wraps it (from None)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{closed}",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          region_name="us-east-1", config=Config(retries={"max_attempts": 1}))
    try:
        try:
            client.list_buckets()
        except Exception:
            raise StorageError("s3://clipgs/x: cannot read") from None
    except StorageError as exc:
        wrapped = exc
    assert is_transient(wrapped)
    slow = ClientError({"Error": {"Code": "SlowDown"},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    missing = ClientError({"Error": {"Code": "NoSuchKey"},
                           "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
    assert is_transient(slow) and not is_transient(missing)
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("no", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(MlflowException("bad input"))  # INTERNAL_ERROR by default
    assert is_transient(ApiException(status=503)) and not is_transient(ApiException(status=403))
    for hard in (ConfigError("bad field"), KeyError("metric"), ValueError("x"), None):
        assert not is_transient(hard)


@pytest.mark.slow
def test_ingest_retries_a_transient_s3_failure(s3_server, tmp_path, monkeypatch, harness):
    from pathlib import Path

    from clipgs.data import storage
    from clipgs.data.synthetic import generate
    from flows.stages import ingest_flow

    src = generate(tmp_path / "prims", per_class=2, gaussians=512)
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        storage.write_bytes(f"{s3_server}/assets/{f.relative_to(src)}", f.read_bytes())
    moto_port = int(storage.s3_client().meta.endpoint_url.rsplit(":", 1)[1])
    # botocore makes 5 attempts per request (clipgs.data.storage); 7 hang-ups fail Prefect's
    # first attempt of the stage and leave the second to succeed
    proxy = FaultyProxy(moto_port, drop=7)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    storage._client_for_pid.cache_clear()
    try:
        out = ingest_flow(f"{s3_server}/assets", str(tmp_path / "shards"),
                          IngestConfig(points=256, views=1, shard_size=8))
    finally:
        proxy.close()
    assert out["train"] + out["test"] == 12 and out["rejected"] == 0
    assert proxy.dropped == 7 and proxy.forwarded > 0
    (run,) = [r for r in _task_runs("ingest") if r.flow_run_id and r.state.is_completed()]
    assert run.run_count == 2  # failed once on the hang-ups, retried after the back-off


def test_hard_failure_is_not_retried(tmp_path, harness):
    from flows.stages import ingest_flow

    (tmp_path / "empty").mkdir()
    before = {r.id for r in _task_runs("ingest")}
    state = ingest_flow(str(tmp_path / "empty"), str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    with pytest.raises(StorageError, match="no objects found"):
        state.result()
    (run,) = [r for r in _task_runs("ingest") if r.id not in before]
    assert run.run_count == 1 and run.state.is_failed()


def test_kubernetes_training_objects_from_the_chart(tmp_path):
    import kubernetes_validate
    from kubernetes.client import ApiClient

    from flows.kube import KubeTrainConfig, job_name, train_objects

    config = load_config(TrainConfig, None, ["data=s3://clipgs/shards", "zero_stage=3",
                                             "tracking.tracking_uri=http://mlflow:5000"])
    kube = KubeTrainConfig(namespace="ml", values={
        "train": {"nodes": 3, "gpusPerNode": 8, "nodeSelector": {"gpu": "h100"}},
        "s3": {"credentialsSecret": "s3-credentials"}})
    objects = train_objects(config, kube, "train-1a2b3c4d")
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Job", "NetworkPolicy", "Service"]
    api = ApiClient()
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
        typed = api._ApiClient__deserialize(obj, f"V1{obj['kind']}")  # what submit() sends
        assert typed.metadata.namespace == "ml"
    name = job_name(objects)
    assert name == "train-1a2b3c4d-clipgs-train"
    job = next(o for o in objects if o["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "--nnodes=3" in container["args"] and "--nproc_per_node=8" in container["args"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in container["env"]
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    mounted = TrainConfig.model_validate(yaml.safe_load(cm["data"]["train.yaml"]))
    assert mounted.tracking.run_name == name and mounted.zero_stage == 3
    assert mounted.output_dir == "/workspace/train" and mounted.data == "s3://clipgs/shards"

    # inside a flow-run pod: the release's values (mounted by the pool's template) underneath
    from test_chart import release_values_file

    on_cluster = KubeTrainConfig(namespace="ml", release_values=str(release_values_file(
        tmp_path)), values={"train": {"nodes": 3, "gpusPerNode": 8}})
    job = next(o for o in train_objects(config, on_cluster, "train-1") if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.example.com/clipgs:0.1.0-gpu" and "--nnodes=3" in c["args"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "AWS_ENDPOINT_URL", "value": "https://minio.example.com"} in c["env"]
    assert {"secretRef": {"name": "s3c"}} in c["envFrom"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in c["env"]
    assert KubeTrainConfig().release_values is None  # not in a flow-run pod here

    with pytest.raises(ConfigError, match="s3://"):
        train_objects(TrainConfig(data="work/shards"), kube, "train-x")
    with pytest.raises(ConfigError, match="/train/nodes"):
        train_objects(config, KubeTrainConfig(values={"train": {"nodes": 0}}), "train-x")


def test_kubernetes_calls_through_the_real_client(tmp_path, monkeypatch, caplog):
    """roll_serving and wait() through the real kubernetes client against the API stand-in:
    a roll patches the annotation; a missing serving Deployment is a warning (serving not
    installed yet), a refused patch an error; a Job read whose connection drops (past
    urllib3's own retries) is polled again, not a failed flow with the Job left running."""
    from kubernetes.client.exceptions import ApiException

    from flows.kube import roll_serving, wait
    from kubeapi import KubeApi

    api = KubeApi(deployments={"prod-clipgs-serving"}, patch_status=[None, 403], hang_up=6)
    # the client reads $KUBECONFIG once, at import: point its default there
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION",
                        str(api.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        assert roll_serving("prod-clipgs-serving", "ml", "7") is True
        assert api.patches == [("ml", "prod-clipgs-serving", {"spec": {"template": {
            "metadata": {"annotations": {"clipgs/champion-version": "7"}}}}})]
        with pytest.raises(ApiException) as refused:
            roll_serving("prod-clipgs-serving", "ml", "8")
        assert refused.value.status == 403 and len(api.patches) == 1
        with caplog.at_level("WARNING", logger="flows.kube"):
            assert roll_serving("nightly-clipgs-serving", "ml", "8") is False
        assert "no Deployment ml/nightly-clipgs-serving to roll" in caplog.text
        done = wait("train-1-clipgs-train", "ml", timeout_s=60, poll_s=0.05)
        assert done == {"job": "train-1-clipgs-train", "succeeded": 2}
        assert api.job_reads > 6 and "will poll again" in caplog.text
    finally:
        api.close()


def test_prefect_yaml_deployments_are_runnable():
    """Every deployment names a flow that loads, parameters that flow accepts, a pool that
    exists here or in the chart, and (Kubernetes) job variables the pool's template defines."""
    import json
    from pathlib import Path

    import jsonschema
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    template = json.loads((root / "charts/clipgs/files/kubernetes-work-pool.json").read_text())
    variables = {**template["variables"], "additionalProperties": False}
    names = set()
    for d in spec["deployments"]:
        names.add(d["name"])
        flow = load_flow_from_entrypoint(str(root / d["entrypoint"]))
        flow.validate_parameters(d.get("parameters", {}))
        pool = d["work_pool"]["name"]
        assert pool in ("clipgs-local", "clipgs-kubernetes"), pool
        if pool == "clipgs-kubernetes":
            jsonschema.validate(d["work_pool"]["job_variables"], variables)
            assert d["pull"][0]["prefect.deployments.steps.set_working_directory"][
                "directory"] == "/opt/clipgs"  # where infra/Dockerfile.* put the code
    assert {"retrain-local", "retrain-nightly", "ingest", "evaluate"} <= names
    nightly = next(d for d in spec["deployments"] if d["name"] == "retrain-nightly")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_infra_deepspeed_configs_are_what_the_trainer_derives(stage):
    """infra/deepspeed/zero{1,2,3}.json document the config of the reference cluster shape
    (2 nodes x 8 GPUs, default TrainConfig): they must not drift from the derivation."""
    import json
    from pathlib import Path

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from clipgs.train.trainer import deepspeed_config

    path = Path(__file__).resolve().parents[1] / "infra" / "deepspeed" / f"zero{stage}.json"
    written = json.loads(path.read_text())
    assert written == deepspeed_config(TrainConfig(zero_stage=stage), world_size=16, on_gpu=True)
    assert DeepSpeedZeroConfig(**written["zero_optimization"]).stage == stage


def test_stage_ledger_resumes_only_unfinished_retrains(tmp_path):
    from flows.ledger import StageLedger, stage_key

    ledger = StageLedger(str(tmp_path))
    key = stage_key("ingest", {"source": "s3://a", "points": 512})
    assert key != stage_key("ingest", {"source": "s3://a", "points": 1024})
    ledger.record("ingest", key, {"train": 24}, "run-1")
    again = StageLedger(str(tmp_path))  # the retrain failed after ingest: resume
    assert again.resuming and again.finished("ingest", key) == {"train": 24}
    assert again.finished("ingest", "another-key") is None  # inputs changed: run it again
    again.complete()
    assert not StageLedger(str(tmp_path)).resuming  # a finished retrain starts afresh
    (tmp_path / "stages.json").write_text("[1, 2]")
    with pytest.raises(StorageError, match="not a stage ledger"):
        StageLedger(str(tmp_path))
    # the ingest key leaves out what does not change the shards (workers follows the cores);
    # a ledger written by the code before (workers in, no `up`; recorded from it) still
    # resumes at up=auto, the axis that code rendered around; another axis is new
    from flows.pipeline import ingest_keys

    def keys(**fields):
        return ingest_keys("s3://a/assets", "s3://a/shards", IngestConfig(**fields))

    assert keys(workers=0)[0] == keys(workers=5, multipart_mb=128)[0] != keys(points=512)[0]
    assert keys(workers=0)[1] == "c1949d8ee54abf03"
    assert len(keys(up="-y")) == 1 and keys(up="-y")[0] != keys()[0]
    old = StageLedger(str(tmp_path / "upgraded"))
    old.record("ingest", "c1949d8ee54abf03", {"train": 24}, "run-1")
    assert StageLedger(str(tmp_path / "upgraded")).finished("ingest", *keys(workers=0)) == {
        "train": 24}
    assert StageLedger(str(tmp_path / "upgraded")).finished("ingest", *keys(workers=3)) is None


@pytest.mark.slow
def test_register_retried_after_its_version_exists_makes_no_duplicate(
        tiny_dataset, tmp_path, monkeypatch, harness):
    """The connection drops after MLflow made the version, before its challenger alias was
    set: Prefect retries the register task, and the retry finishes that version instead of
    registering the run a second time. Other serving limits, code or requirements are another
    version."""
    import mlflow
    from prefect import flow

    from clipgs.config import ModelConfig
    from clipgs.models.package import init_package
    from clipgs.registry.registry import log_package_run, register
    from clipgs.registry.serving import ServingLimits
    from flows.stages import register_task

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    package = init_package(tmp_path / "pkg", str(tiny_dataset), ModelConfig(depth=1, width=48))
    run_id = log_package_run(str(package), uri)
    calls = []
    alias = mlflow.MlflowClient.set_registered_model_alias

    def drops_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return alias(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", drops_once)

    @flow
    def register_once() -> str:
        return register_task(run_id, uri, "clipgs")

    version = register_once()
    (run,) = [r for r in _task_runs("register") if r.flow_run_id and r.state.is_completed()]
    assert run.run_count == 2 and len(calls) == 2  # failed once, retried
    client = mlflow.MlflowClient(uri)
    versions = client.search_model_versions("name = 'clipgs'")
    assert [str(v.version) for v in versions] == [version]  # one version of the run
    mv = client.get_model_version_by_alias("clipgs", "challenger")
    assert str(mv.version) == version and mv.tags["clipgs.training_run_id"] == run_id
    assert mv.description.startswith(f"CLIP-GS encoder from run {run_id}")
    other = register(run_id, uri, "clipgs", ServingLimits(max_rows=7))
    assert other != version and register(run_id, uri, "clipgs") == version
    # after an upgrade (other pinned requirements, or other clipgs code) the run is registered
    # anew, so its model is logged with the code and requirements it will be served with
    from clipgs.registry import registry

    monkeypatch.setattr(registry, "_requirements", lambda: ["torch==2.14.1", "numpy==9.9"])
    upgraded = register(run_id, uri, "clipgs")
    assert upgraded not in (version, other)
    assert len(client.search_model_versions("name = 'clipgs'")) == 3
