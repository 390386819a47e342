"""The Helm chart, rendered and linted by Helm's own library, every manifest validated against
the Kubernetes schemas."""

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
CHART = Path(__file__).resolve().parents[1] / "charts" / "clipgs"


def _render(values):
    manifests = helm.Chart.load(str(CHART)).render(values, name="nightly", namespace="ml")
    return [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("values", [
    {},
    {"train": {"nodes": 4, "gpusPerNode": 8, "overrides": ["zero_stage=3"],
               "envFromSecrets": ["s3-credentials"], "nodeSelector": {"gpu": "h100"},
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]}},
    {"train": {"nodes": 1, "gpusPerNode": 0, "s3EndpointUrl": "http://minio:9000"}},
])
def test_renders_valid_kubernetes(values):
    import kubernetes_validate

    docs = _render(values)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Job", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    job = next(d for d in docs if d["kind"] == "Job")
    nodes = values.get("train", {}).get("nodes", 2)
    assert job["spec"]["completions"] == nodes and job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert f"--nnodes={nodes}" in c["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    gpus = values.get("train", {}).get("gpusPerNode", 1)
    assert c["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus


def test_lint_and_schema():
    report = helm.lint(str(CHART))
    assert not report["errors"] and all(m["severity"] < 3 for m in report["messages"])
    with pytest.raises(helm.HelmValuesError, match="nodes"):
        helm.Chart.load(str(CHART)).validate_schema({"train": {"nodes": 0}})
