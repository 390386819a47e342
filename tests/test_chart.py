"""The Helm chart, rendered and linted by Helm's own library (helm-python-sdk) for several value
sets, every manifest validated against the Kubernetes schemas, and scanned with checkov."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "clipgs"
OWN_MLFLOW = {"mlflowTrackingUri": "", "mlflow": {"enabled": True,
                                                 "backendStore": {"secretName": "mlflow-db"}}}
VALUE_SETS = {
    "defaults": {},
    "gpu-cluster": {
        "image": {"digest": "sha256:" + "a" * 64},
        "s3": {"endpointUrl": "http://minio.storage:9000", "credentialsSecret": "s3-credentials"},
        "train": {"enabled": True, "nodes": 4, "gpusPerNode": 8, "overrides": ["zero_stage=3"],
                  "envFromSecrets": ["hf-token"], "nodeSelector": {"gpu": "h100"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]},
        "worker": {"apiKeySecret": "prefect-api-key"},
        "serving": {"nodeSelector": {"pool": "cpu"}}},
    "cpu-one-node": {"train": {"enabled": True, "nodes": 1, "gpusPerNode": 0},
                     "worker": {"enabled": False}, "networkPolicy": {"enabled": False},
                     "serving": {"autoscaling": {"enabled": False, "minReplicas": 1,
                                                 "maxReplicas": 1}, "replicas": 2,
                                 "podDisruptionBudget": {"enabled": True,
                                                         "maxUnavailable": "50%"}}},
    "own-mlflow": {**OWN_MLFLOW, "s3": {"credentialsSecret": "s3-credentials"}},
}
KINDS = {
    "defaults": ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                 "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding",
                 "Service", "ServiceAccount"],
    "gpu-cluster": ["ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "Deployment",
                    "HorizontalPodAutoscaler", "Job", "NetworkPolicy", "NetworkPolicy",
                    "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding", "Service",
                    "Service", "ServiceAccount"],
    "cpu-one-node": ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service",
                     "Service"],
    "own-mlflow": ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                   "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget",
                   "Role", "RoleBinding", "Service", "Service", "ServiceAccount"],
}


def render(values, name="nightly"):
    manifests = helm.Chart.load(str(CHART)).render(values, name=name, namespace="ml")
    return [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]


def by_kind(docs, kind, suffix=""):
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def pod_specs(docs):
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_valid_and_locked_down(name):
    import kubernetes_validate

    docs = render(VALUE_SETS[name])
    assert sorted(d["kind"] for d in docs) == KINDS[name]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
        assert doc["metadata"]["namespace"] == "ml"
    for pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
            assert sc["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= set(c["resources"]["limits"])
            # credentials only by reference: nothing secret-looking has a literal value
            for env in c.get("env", []):
                if any(w in env["name"] for w in ("KEY", "SECRET", "PASSWORD", "TOKEN")):
                    assert "valueFrom" in env and "value" not in env, env["name"]


def test_training_job_is_nodes_by_gpus():
    docs = render(VALUE_SETS["gpu-cluster"])
    job = by_kind(docs, "Job")[0]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "ghcr.io/example/clipgs@sha256:" + "a" * 64
    assert {"--nnodes=4", "--nproc_per_node=8", "--node_rank=$(JOB_COMPLETION_INDEX)",
            "--master_addr=nightly-clipgs-train-0.nightly-clipgs-train", "zero_stage=3"
            } <= set(c["args"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and "DS_ACCELERATOR" not in env
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert [s["secretRef"]["name"] for s in c["envFrom"]] == ["s3-credentials", "hf-token"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == \
        "nvidia.com/gpu"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert pod["subdomain"] == "nightly-clipgs-train"
    svc = by_kind(docs, "Service", "-train")[0]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # the README's `kubectl get jobs -l app.kubernetes.io/component=train` finds the Job
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "train"
    cm = by_kind(docs, "ConfigMap")[0]
    assert yaml.safe_load(cm["data"]["train.yaml"])["zero_stage"] == 2

    cpu = by_kind(render(VALUE_SETS["cpu-one-node"]), "Job")[0]["spec"]["template"]["spec"]
    c = cpu["containers"][0]
    assert c["image"].endswith(":0.1.0") and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]


def test_serving_worker_and_mlflow():
    docs = render(VALUE_SETS["own-mlflow"])
    serve = by_kind(docs, "Deployment", "-serving")[0]["spec"]["template"]["spec"]
    cmd = serve["containers"][0]["command"]
    assert cmd[:9] == ["mlflow", "models", "serve", "-m", "models:/clipgs@champion",
                       "--env-manager", "local", "-h", "0.0.0.0"]
    env = {e["name"]: e.get("value") for e in serve["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://nightly-clipgs-mlflow:5000"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[0]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "nightly-clipgs-serving" and hpa["maxReplicas"] == 4
    mlflow = by_kind(docs, "Deployment", "-mlflow")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {
        "name": "mlflow-db", "key": "uri"}}} in mlflow["env"]
    assert "--artifacts-destination" in mlflow["command"]
    worker = by_kind(docs, "Deployment", "-worker")[0]["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "nightly-clipgs-worker"
    init = worker["initContainers"][0]["command"]
    assert init[:4] == ["prefect", "work-pool", "create", "clipgs-kubernetes"]
    pool = by_kind(docs, "ConfigMap", "-work-pool")[0]["data"]["base-job-template.json"]
    assert {"image", "gpu_limit", "node_selector", "tolerations"} <= set(
        json.loads(pool)["variables"]["properties"])
    assert worker["containers"][0]["command"][:6] == ["prefect", "worker", "start", "--pool",
                                                      "clipgs-kubernetes", "--type"]
    rules = by_kind(docs, "Role")[0]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)


@pytest.mark.slow
def test_chart_mlflow_server_answers_its_service_name(tmp_path):
    """The chart's own `mlflow server` command, run for real (sqlite in place of the Secret's
    Postgres): a client using the address the chart hands every pod gets an answer, not
    MLflow's DNS-rebinding 403, while a foreign Host header is still refused."""
    import requests
    import sys

    from conftest import free_port, stop_process_group, wait_for_http

    port = free_port()
    docs = render({**OWN_MLFLOW, "mlflow": {**OWN_MLFLOW["mlflow"], "port": port,
                                            "allowedHosts": ["mlflow.example.com"]}})
    cmd = by_kind(docs, "Deployment", "-mlflow")[0]["spec"]["template"]["spec"][
        "containers"][0]["command"]
    serve = by_kind(docs, "Deployment", "-serving")[0]["spec"]["template"]["spec"]
    uri = {e["name"]: e.get("value") for e in serve["containers"][0]["env"]}[
        "MLFLOW_TRACKING_URI"]
    service_host = uri.removeprefix("http://")
    assert service_host == f"nightly-clipgs-mlflow:{port}"
    assert cmd[0] == "mlflow"
    cmd = [str(Path(sys.executable).parent / "mlflow"), *cmd[1:], "--workers", "1"]
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, tmp_path / "server.log", 120,
                      "the chart's mlflow server")
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"

        def status(host):
            return requests.post(search, json={"max_results": 1}, headers={"Host": host},
                                 timeout=10).status_code

        for host in (service_host, "nightly-clipgs-mlflow.ml.svc.cluster.local:80",
                     f"localhost:{port}", "mlflow.example.com", f"10.96.0.12:{port}"):
            assert status(host) == 200, host
        assert status("attacker.example.com") == 403
    finally:
        stop_process_group(proc)


RELEASE = {"image": {"repository": "registry.example.com/clipgs"},
           "imagePullSecrets": [{"name": "regcred"}],
           "s3": {"endpointUrl": "https://minio.example.com", "credentialsSecret": "s3c"}}


def release_values_file(tmp_path, name="prod") -> Path:
    """The release values the chart mounts into flow-run pods, as a file."""
    docs = render(RELEASE, name=name)
    path = tmp_path / "release-values.yaml"
    path.write_text(by_kind(docs, "ConfigMap", "-release-values")[0]["data"]["values.yaml"])
    return path


def test_flow_run_pods_get_the_release_image_account_and_storage():
    """The pool's job template, with prefect.yaml's retrain-nightly job variables applied by
    Prefect's own templating: the pod runs this release's image from its registry, under its
    worker's service account, with the S3 endpoint and credentials Secret and the release's
    values mounted - none of which prefect.yaml repeats."""
    import kubernetes_validate
    from prefect.utilities.templating import apply_values

    docs = render(RELEASE, name="prod")
    pool = json.loads(by_kind(docs, "ConfigMap", "-work-pool")[0]["data"][
        "base-job-template.json"])
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "retrain-nightly")
    variables = {k: v.get("default") for k, v in pool["variables"]["properties"].items()}
    variables.update(nightly["work_pool"]["job_variables"], name="flow-run", command="x")
    job = apply_values(pool["job_configuration"], variables)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.example.com/clipgs:0.1.0"
    assert pod["serviceAccountName"] == "prod-clipgs-worker"
    assert job["metadata"]["namespace"] == "ml" and pod["imagePullSecrets"] == [
        {"name": "regcred"}]
    assert c["envFrom"] == [{"secretRef": {"name": "s3c"}}]
    assert variables["env"]["AWS_ENDPOINT_URL"] == "https://minio.example.com"
    assert variables["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "release")
    volume = next(v for v in pod["volumes"] if v["name"] == "release")
    assert mount["mountPath"] == "/etc/clipgs/release"
    assert volume["configMap"]["name"] == "prod-clipgs-release-values"
    released = yaml.safe_load(by_kind(docs, "ConfigMap", "-release-values")[0]["data"][
        "values.yaml"])
    assert released["image"]["repository"] == "registry.example.com/clipgs"
    # train.overrides stay out: they would come after the flow's own train.yaml and win
    with_overrides = render({**RELEASE, "train": {"overrides": ["zero_stage=3"]}}, name="prod")
    assert "overrides" not in yaml.safe_load(by_kind(with_overrides, "ConfigMap",
                                                     "-release-values")[0]["data"]["values.yaml"])["train"]
    # a changed pool template rolls the worker (whose init container updates the pool)
    def checksum(d):
        worker = by_kind(d, "Deployment", "-worker")[0]["spec"]["template"]["metadata"]
        return worker["annotations"]["checksum/work-pool"]
    assert checksum(docs) != checksum(render({}, name="prod")) and len(checksum(docs)) == 64
    assert checksum(docs) == checksum(render(RELEASE, name="prod"))
    # what prefect-kubernetes does to the template's env (a dict) and command (a string)
    c["env"] = [{"name": k, "value": v} for k, v in variables["env"].items()]
    c["args"] = ["prefect", "flow-run", "execute"]
    for drop in ("nodeSelector", "tolerations"):  # null until a deployment sets them
        pod.pop(drop, None)
    kubernetes_validate.validate(job, "1.30", strict=True)


def test_serving_disruption_budget_selects_the_serving_pods():
    for name, allowed in (("defaults", 1), ("cpu-one-node", "50%")):
        docs = render(VALUE_SETS[name])
        pdb = by_kind(docs, "PodDisruptionBudget")[0]["spec"]
        pods = by_kind(docs, "Deployment", "-serving")[0]["spec"]["template"]["metadata"]
        assert pdb["maxUnavailable"] == allowed
        assert pdb["selector"]["matchLabels"].items() <= pods["labels"].items()
        for other in by_kind(docs, "Deployment") + by_kind(docs, "Job"):  # serving's alone
            if not other["metadata"]["name"].endswith("-serving"):
                labels = other["spec"]["template"]["metadata"]["labels"]
                assert not pdb["selector"]["matchLabels"].items() <= labels.items()
    off = {"serving": {"podDisruptionBudget": {"enabled": False, "maxUnavailable": 1}}}
    assert not by_kind(render(off), "PodDisruptionBudget")


def test_lint():
    for values in (None, VALUE_SETS["gpu-cluster"], VALUE_SETS["own-mlflow"]):
        report = helm.lint(str(CHART), values, strict=True)
        assert not report["errors"], report
        assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


@pytest.mark.parametrize("bad, where", [
    ({"train": {"nodes": 0}}, "/train/nodes"),
    ({"train": {"gpusPerNode": "eight"}}, "/train/gpusPerNode"),
    ({"train": {"config": {"zero_stage": 4}}}, "/train/config/zero_stage"),
    ({"trian": {"nodes": 2}}, "'trian' not allowed"),
    ({"serving": {"model": "clipgs"}}, "/serving/model"),
    ({"serving": {"podDisruptionBudget": {"maxUnavailable": 0}}},
     "/serving/podDisruptionBudget/maxUnavailable"),
    ({"worker": {"prefectApiUrl": "http://prefect:4200"}}, "/worker/prefectApiUrl"),
    ({"s3": {"credentialsSecret": "My Secret"}}, "/s3/credentialsSecret"),
    ({"mlflow": {"allowedHosts": ["a.example.com,b.example.com"]}}, "/mlflow/allowedHosts/0"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"train": {"resources": {"requests": {"cpu": "lots"}, "limits": {}}}}, "/train/resources"),
])
def test_schema_rejects_bad_values(bad, where):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(chart.merge_values(bad))


@pytest.mark.parametrize("values, message", [
    ({"image": {"tag": "latest"}}, "pin a version"),
    ({"mlflowTrackingUri": ""}, "set mlflowTrackingUri"),
    ({**OWN_MLFLOW, "mlflow": {"enabled": True}}, "mlflow.backendStore.secretName"),
    ({"serving": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
     r"minReplicas \(5\) is above maxReplicas \(2\)"),
])
def test_render_refuses_unsafe_combinations(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def _checkov() -> str | None:
    local = ROOT / ".venv-checkov" / "bin" / "checkov"  # its own venv: see scripts/setup.sh
    return str(local) if local.exists() else shutil.which("checkov")


def test_checkov_finds_nothing(tmp_path):
    checkov = _checkov()
    if checkov is None:
        if os.environ.get("CI"):
            pytest.fail("checkov missing: scripts/setup.sh installs it in .venv-checkov")
        pytest.skip("checkov not installed (scripts/setup.sh puts it in .venv-checkov)")
    files = []
    for name in ("defaults", "gpu-cluster", "own-mlflow"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(render(VALUE_SETS[name])))
        files += ["-f", str(path)]
    out = subprocess.run([checkov, *files, "--framework", "kubernetes", "--skip-download",
                          "-o", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports
              for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert sum(r["summary"]["passed"] for r in reports) > 300
    # every skip is one the chart declares, with its reason
    for r in reports:
        for c in r["results"]["skipped_checks"]:
            assert len(c["check_result"].get("suppress_comment", "")) > 20, c["check_id"]
