"""The whole pipeline at tiny scale under Prefect's test harness: a retrain that fails at its
last stage, resumed by a second run that skips the finished stages; then the registry's gate
and the registered model used through `clipgs embed`."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from kubernetes.client.exceptions import ApiException
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from clipgs.config import PipelineConfig, load_config
    from flows.pipeline import ARTIFACT_KEY, retrain_flow
    from kubeapi import KubeApi

    root = tmp_path_factory.mktemp("pipeline")
    db = f"sqlite:///{root}/mlflow.db"
    tiny = [f"workdir={root}/work", "primitives_per_class=6", "train.steps=6",
            "train.micro_batch=4", "train.log_every=3", "train.loader_workers=0",
            "ingest.points=512", "ingest.views=2"]
    # the serving Deployment lives behind a Kubernetes API stand-in (tests/kubeapi.py) that
    # refuses the first roll, as a worker whose Role lacks "patch" would see
    api = KubeApi(deployments={"clipgs-clipgs-serving"}, patch_status=[403])
    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as mp:
        mp.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION",
                   str(api.kubeconfig(root / "kubeconfig")))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        config = load_config(PipelineConfig, None, tiny)
        # the retrain fails at its last stage, after the promotion
        with pytest.raises(ApiException, match="403"):
            retrain_flow(config, db, serving_deployment="clipgs-clipgs-serving")
        failed = json.loads((root / "work" / "stages.json").read_text())
        assert failed["complete"] is False and not api.patches
        failed_ledger = failed["stages"]
        summary = retrain_flow(config, db, serving_deployment="clipgs-clipgs-serving")
        summary["patches"] = api.patches
        # a finished retrain is not resumed: the next one starts afresh
        assert json.loads((root / "work" / "stages.json").read_text())["complete"] is True
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[ARTIFACT_KEY, ARTIFACT_KEY + "-metrics"])))
    return root, db, summary, failed_ledger, artifacts


@pytest.mark.slow
def test_failed_retrain_resumes_from_its_last_finished_stage(pipeline_run):
    import mlflow

    root, db, summary, failed_ledger, artifacts = pipeline_run
    assert list(failed_ledger) == ["generate", "ingest", "train", "evaluate", "register",
                                   "promote"]
    assert summary["stages"]["skipped"] == list(failed_ledger)
    # the promotion is not redone (it would find the version already champion): the roll is
    assert summary["stages"]["ran"] == ["roll-serving"]
    version = summary["model"].rsplit("/", 1)[1]
    assert summary["patches"] == [("default", "clipgs-clipgs-serving", {"spec": {"template": {
        "metadata": {"annotations": {"clipgs/champion-version": version}}}}})]
    assert summary["training_run_id"] == failed_ledger["train"]["output"]["run_id"]
    mlflow.set_tracking_uri(db)
    training_runs = mlflow.search_runs(experiment_names=["clipgs"],
                                       filter_string="tags.`clipgs.stage` = 'train'")
    assert len(training_runs) == 1  # trained once across both runs
    # the run's artifacts: the metrics table and the decision with its reason
    markdown = next(a for a in artifacts if a.type == "markdown").data
    assert "promoted to champion" in markdown and "zeroshot_top1" in markdown
    assert "resumed (skipped): generate, ingest, train, evaluate, register, promote" in markdown
    table = next(a for a in artifacts if a.type == "table").data
    assert "zeroshot_top1" in str(table)


@pytest.mark.slow
def test_pipeline_ends_with_a_champion(pipeline_run):
    import mlflow

    root, db, summary, *_ = pipeline_run
    assert summary["ingested"]["train"] + summary["ingested"]["test"] == 36
    assert summary["promotion"]["promoted"] is True
    mlflow.set_tracking_uri(db)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("clipgs", "champion")
    assert summary["model"] == f"models:/clipgs/{champion.version}"
    assert set(summary["metrics"]) >= {"zeroshot_top1", "zeroshot_top5", "retrieval_text_to_3d_r1"}
    run = mlflow.get_run(summary["training_run_id"])
    assert "eval_zeroshot_top1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/confusion_matrix.png"} <= artifacts


@pytest.mark.slow
def test_gate_keeps_champion_unless_strictly_better(pipeline_run):
    import mlflow

    from clipgs.config import PromoteConfig
    from clipgs.errors import ConfigError
    from clipgs.registry.registry import promote, register

    root, db, summary, *_ = pipeline_run
    mlflow.set_tracking_uri(db)
    client = mlflow.MlflowClient()
    from clipgs.registry.serving import ServingLimits

    before = client.get_model_version_by_alias("clipgs", "champion").version
    # the same run again is the same version (a retried register makes no duplicate) ...
    assert register(summary["training_run_id"], db) == str(before)
    # ... under other serving limits a new one, with the same weights: equal, so not better
    v2 = register(summary["training_run_id"], db, limits=ServingLimits(max_rows=32))
    assert v2 != str(before)
    assert str(client.get_model_version_by_alias("clipgs", "challenger").version) == v2
    with pytest.raises(ConfigError, match="gate metric 'no_such_metric'"):
        promote("clipgs", str(root / "work" / "shards"), db,
                PromoteConfig(metric="no_such_metric"))
    decision = promote("clipgs", str(root / "work" / "shards"), db)
    assert decision["promoted"] is False and "kept the champion" in decision["reason"]
    assert client.get_model_version_by_alias("clipgs", "champion").version == before
    recorded = json.loads(client.get_model_version("clipgs", v2).tags["clipgs.promotion"])
    assert recorded["promoted"] is False


@pytest.mark.slow
def test_embed_with_the_champion(pipeline_run, shared_data, capsys):
    from clipgs.cli import main
    from clipgs.embed import embed_files

    root, db, summary, *_ = pipeline_run
    files = [str(shared_data / "splats/cat/cat_10k.splat"),
             str(shared_data / "gaussians/splatapult_test.ply")]
    assert main(["embed", "--tracking-uri", db, "--out", str(root / "e.npy"), *files]) == 0
    emb = np.load(root / "e.npy")
    assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert summary["package"].startswith(str(root / "work" / "train"))
    local = embed_files(files, summary["package"])
    np.testing.assert_allclose(emb, local, atol=1e-5)  # served == in-process
    bad = root / "bad.ply"
    bad.write_bytes(b"not a ply")
    assert main(["embed", "--tracking-uri", db, str(bad)]) == 2
    assert "bad.ply" in capsys.readouterr().err
    # a version registered with small serving limits: more files than its rows per request
    # go in several requests; a file over its size limit is one line naming the file
    capsys.readouterr()
    t = ["--tracking-uri", db]
    assert main(["register", "--run-id", summary["training_run_id"], "--max-rows", "1",
                 "--max-file-bytes", "1000000", *t]) == 0
    version = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"]
    small = f"models:/clipgs/{version}"
    assert main(["embed", "--model", small, "--out", str(root / "s.npy"), *t, *files]) == 0
    np.testing.assert_allclose(np.load(root / "s.npy"), emb, atol=1e-5)
    big = str(shared_data / "gaussians/donut.ply")
    capsys.readouterr()
    assert main(["embed", "--model", small, *t, big]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "donut.ply: file of about" in err
    assert "(max_file_bytes)" in err
