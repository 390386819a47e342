"""The whole pipeline at tiny scale under Prefect's test harness, then the registry's gate and
the registered model used through `clipgs embed`."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import retrain_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    db = f"sqlite:///{root}/mlflow.db"
    with prefect_test_harness(server_startup_timeout=120):
        summary = retrain_pipeline(overrides=[
            f"workdir={root}/work", "primitives_per_class=6", "train.steps=6",
            "train.micro_batch=4", "train.log_every=3", "train.loader_workers=0",
            "ingest.points=512", "ingest.views=2"], tracking_uri=db)
    return root, db, summary


@pytest.mark.slow
def test_pipeline_ends_with_a_champion(pipeline_run):
    import mlflow

    root, db, summary = pipeline_run
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

    from clipgs.registry.registry import promote, register

    root, db, summary = pipeline_run
    mlflow.set_tracking_uri(db)
    client = mlflow.MlflowClient()
    before = client.get_model_version_by_alias("clipgs", "champion").version
    v2 = register(summary["training_run_id"], db)  # same weights: equal, so not better
    assert str(client.get_model_version_by_alias("clipgs", "challenger").version) == v2
    decision = promote("clipgs", str(root / "work" / "shards"), db)
    assert decision["promoted"] is False and "kept the champion" in decision["reason"]
    assert client.get_model_version_by_alias("clipgs", "champion").version == before
    recorded = json.loads(client.get_model_version("clipgs", v2).tags["clipgs.promotion"])
    assert recorded["promoted"] is False


@pytest.mark.slow
def test_embed_with_the_champion(pipeline_run, shared_data, capsys):
    from clipgs.cli import main
    from clipgs.embed import embed_files

    root, db, summary = pipeline_run
    files = [str(shared_data / "splats/cat/cat_10k.splat"),
             str(shared_data / "gaussians/splatapult_test.ply")]
    assert main(["embed", "--tracking-uri", db, "--out", str(root / "e.npy"), *files]) == 0
    emb = np.load(root / "e.npy")
    assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    local = embed_files(files, str(root / "work" / "train" / "package"))
    np.testing.assert_allclose(emb, local, atol=1e-5)  # served == in-process
    bad = root / "bad.ply"
    bad.write_bytes(b"not a ply")
    assert main(["embed", "--tracking-uri", db, str(bad)]) == 2
    assert "bad.ply" in capsys.readouterr().err
