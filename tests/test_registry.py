"""The registry through the `clipgs` commands: the pyfunc model as logged (from code, safetensors,
signature, lineage), gated promotion between a trained and an untrained candidate (the worse
never becomes champion), rollback, and the same commands against an MLflow tracking server on
loopback whose artifacts live in S3 (moto)."""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from clipgs.config import ModelConfig, PromoteConfig
from clipgs.registry.registry import gate
from conftest import fails, free_port, stop_process_group, wait_for_http

SMALL = ModelConfig(depth=1, width=48)
# both candidates are measured on the split the trained one was fitted to: what matters here
# is that one is really better, deterministically, not how well it generalises
EVAL = ["split=train", "fewshot_episodes=0", "gallery_queries=0"]


def test_gate_reasons():
    cfg = PromoteConfig(metric="m", margin=0.05, guard_metrics=["g"], guard_tolerance=0.1)
    ok, why = gate(cfg, {"m": 0.7, "g": 0.45}, {"m": 0.6, "g": 0.5})
    assert ok and "better" in why and "held" in why
    ok, why = gate(cfg, {"m": 0.64, "g": 0.5}, {"m": 0.6, "g": 0.5})
    assert not ok and "not better" in why  # inside the margin
    ok, why = gate(cfg, {"m": 0.9, "g": 0.3}, {"m": 0.6, "g": 0.5})
    assert not ok and "regressed" in why


def test_default_guards_are_skipped_where_not_measured_named_ones_are_checked():
    from clipgs.config import EvalConfig, PromoteConfig
    from clipgs.errors import ConfigError
    from clipgs.registry.registry import check_gate_names

    no_r1 = EvalConfig(retrieval_ks=[5, 10])
    check_gate_names(PromoteConfig(), no_r1)  # the defaults' *_r1 guards: "not measured"
    # the same list after a trip through JSON (Prefect parameters) is still the defaults
    check_gate_names(PromoteConfig.model_validate(PromoteConfig().model_dump()), no_r1)
    with pytest.raises(ConfigError, match="retrieval_text_to_3d_r1"):
        check_gate_names(PromoteConfig(guard_metrics=["retrieval_text_to_3d_r1"]), no_r1)


def test_a_package_trained_from_a_uni3d_checkpoint_loads(tiny_dataset, tmp_path):
    """Its meta keeps init_from (where training started) under a custom size: loading it
    does not apply the training-time rule that init_from needs a Uni3D size."""
    from clipgs.models.package import init_package, load_package

    pkg = init_package(tmp_path / "pkg", str(tiny_dataset), SMALL)
    meta = json.loads((pkg / "clipgs.json").read_text())
    meta["model"]["init_from"] = "s3://models/uni3d-ti.safetensors"
    (pkg / "clipgs.json").write_text(json.dumps(meta))
    assert load_package(str(pkg)).encoder is not None


def test_save_package_never_leaves_new_weights_under_old_meta(tiny_dataset, tmp_path):
    """A save that dies after the weights (here: meta that is not JSON) leaves a folder that
    load_package refuses, not the new weights under the old meta."""
    from clipgs.errors import ConfigError
    from clipgs.models.package import init_package, load_package, save_package

    path = init_package(tmp_path / "pkg", str(tiny_dataset), SMALL, seed=0)
    other = load_package(str(init_package(tmp_path / "other", str(tiny_dataset), SMALL, seed=1)))
    meta = load_package(str(path)).meta
    with pytest.raises(TypeError):
        save_package(path, {f"encoder.{k}": v for k, v in other.encoder.state_dict().items()},
                     {**meta, "not_json": object()})
    with pytest.raises(ConfigError, match="expected clipgs.json and encoder.safetensors"):
        load_package(str(path))
    assert sorted(p.name for p in path.iterdir()) == ["encoder.safetensors"]  # no leftovers
    save_package(path, {f"encoder.{k}": v for k, v in other.encoder.state_dict().items()}, meta)
    again = load_package(str(path)).encoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in other.encoder.state_dict().items())


def test_lookups_and_gate_mistakes_fail_in_one_line_before_evaluating(
        tiny_dataset, tmp_path, monkeypatch, capsys):
    """What MLflow does not have (model, version, alias, run) and a gate that cannot be
    judged (negative margin, a metric or guard evaluation never reports) are one line each,
    and nothing is evaluated first."""
    import shutil

    from clipgs.models.package import init_package

    def not_now(*a, **k):
        raise AssertionError("evaluated before the request was checked")

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    monkeypatch.setattr("clipgs.registry.registry._version_metrics", not_now)
    t, data = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], str(tiny_dataset)
    assert "models:/clipgs@champion: not found in MLflow" in fails(
        capsys, "embed", "--text", "a donut", *t)  # nothing registered yet
    assert "models:/nosuch/1: not found in MLflow" in fails(
        capsys, "evaluate", "--model", "models:/nosuch/1", "--data", data, *t)
    assert "runs:/deadbeef/package: not found in MLflow" in fails(
        capsys, "evaluate", "--model", "runs:/deadbeef/package", "--data", data, *t)
    assert "models:/clipgs/99: not found in MLflow" in fails(
        capsys, "promote", "--data", data, "--version", "99", *t)
    assert "margin: Input should be greater than or equal to 0" in fails(
        capsys, "promote", "--data", data, "--version", "1", "--margin", "-0.5", *t)
    assert "guard metric(s) ['retrieval_txt_to_3d_r1'] are not metrics" in fails(
        capsys, "promote", "--data", data, "--version", "1", "--guard",
        "retrieval_txt_to_3d_r1", *t)
    assert "gate metric 'zeroshot_top' is not a metric" in fails(
        capsys, "promote", "--data", data, "--version", "1", "--metric", "zeroshot_top", *t)
    # probe metrics are no gate when the probe does not run
    assert "guard metric(s) ['fewshot_acc_mean']" in fails(
        capsys, "promote", "--data", data, "--version", "1", "--guard", "fewshot_acc_mean",
        *t, "fewshot_episodes=0")
    bad = tmp_path / "bad"
    shutil.copytree(init_package(tmp_path / "pkg", data, SMALL), bad)
    (bad / "clipgs.json").write_text('{"model": {')
    assert f"{bad / 'clipgs.json'}: damaged package meta" in fails(
        capsys, "register", "--package", bad, *t)


def train_a_little(package_dir: Path, data: str, steps: int = 40) -> None:
    """A few full-batch steps of the symmetric contrastive loss (3D<->text, 3D<->first view)
    on the train split, in place: a candidate that is really better than an untrained one."""
    import torch.nn.functional as F

    from clipgs.data.shards import iterate, read_manifest, shard_urls
    from clipgs.models.package import load_package, save_package
    from clipgs.models.tokenizer import group_numpy

    package = load_package(str(package_dir))
    cfg = package.encoder.config
    samples = list(iterate(shard_urls(data, read_manifest(data), "train")))
    grouped = [group_numpy(s["gaussians"], cfg.groups, cfg.group_size) for s in samples]
    patches = torch.from_numpy(np.stack([g[0] for g in grouped]))
    centres = torch.from_numpy(np.stack([g[1] for g in grouped]))
    targets = [torch.from_numpy(np.stack([s[k] for s in samples]).astype(np.float32))
               for k in ("txt_emb", "img_emb")]
    targets[1] = targets[1][:, 0]
    encoder = package.encoder.train()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: on a busy 2-core runner threads only contend
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-3)
    labels = torch.arange(len(samples))
    for _ in range(steps):
        g = F.normalize(encoder(patches, centres), dim=-1)
        loss = 0
        for t in targets:
            logits = 20.0 * g @ F.normalize(t, dim=-1).T
            loss = loss + F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # BatchNorm's running statistics trail weights that moved this fast in 40 steps (branch 2
    # starts at zero and moves last): settle them on the final weights ("precise BN")
    with torch.no_grad():
        for _ in range(20):
            encoder(patches, centres)
    torch.set_num_threads(threads)
    save_package(package_dir, {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                 {**package.meta, "untrained": False})


@pytest.fixture(scope="module")
def candidates(tiny_dataset, tmp_path_factory, teacher):
    """Three packages: untrained (seed 0), trained a little, untrained (seed 1)."""
    from clipgs.config import EvalConfig
    from clipgs.eval.evaluate import evaluate
    from clipgs.models.package import init_package

    root = tmp_path_factory.mktemp("candidates")
    data = str(tiny_dataset)
    out = {"untrained": init_package(root / "untrained", data, SMALL, seed=0),
           "trained": init_package(root / "trained", data, SMALL, seed=0),
           "untrained2": init_package(root / "untrained2", data, SMALL, seed=1)}
    train_a_little(out["trained"], data)
    cfg = EvalConfig(split="train", fewshot_episodes=0, gallery_queries=0)
    scores = {k: evaluate(str(p), data, cfg, teacher)["metrics"]["zeroshot_top1"]
              for k, p in out.items()}
    # the premise of the promotion test, checked rather than assumed
    assert scores["trained"] > max(scores["untrained"], scores["untrained2"]) + 0.2, scores
    return {k: str(v) for k, v in out.items()}


def clipgs(*argv) -> dict:
    """Run a `clipgs` command in-process; its JSON answer (the last line it prints)."""
    from clipgs.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main([str(a) for a in argv])
    assert code == 0, (argv, code)
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def champion(client) -> str:
    return str(client.get_model_version_by_alias("clipgs", "champion").version)


def run_promotion_story(uri: str, data: str, candidates: dict, capsys) -> None:
    """register -> promote three times (first, better, worse) -> rollback, through the CLI."""
    import mlflow

    from clipgs.cli import main

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    t = ["--tracking-uri", uri]
    v1 = clipgs("register", "--package", candidates["untrained"], *t)["version"]
    first = clipgs("promote", "--data", data, *t, *EVAL)
    assert first["promoted"] and "no champion yet" in first["reason"]
    v2 = clipgs("register", "--package", candidates["trained"], *t)["version"]
    assert str(client.get_model_version_by_alias("clipgs", "challenger").version) == v2
    better = clipgs("promote", "--data", data, *t, *EVAL)
    assert better["promoted"], better["reason"]
    assert better["reason"].startswith(f"promoted v{v2} over v{v1}")
    assert champion(client) == v2
    v3 = clipgs("register", "--package", candidates["untrained2"], *t)["version"]
    worse = clipgs("promote", "--data", data, *t, *EVAL)
    assert not worse["promoted"] and f"kept the champion v{v2}" in worse["reason"]
    assert "zeroshot_top1" in worse["reason"]
    assert champion(client) == v2  # the worse one never becomes champion
    # the decision is recorded on the version, tag and description
    mv3 = client.get_model_version("clipgs", v3)
    assert json.loads(mv3.tags["clipgs.promotion"])["promoted"] is False
    assert "kept the champion" in mv3.description
    assert "promoted v2" in client.get_model_version("clipgs", v2).description
    # promoting the champion itself is a recorded no-op
    same = clipgs("promote", "--data", data, "--version", v2, *t, *EVAL)
    assert not same["promoted"] and "already champion" in same["reason"]

    client.set_registered_model_alias("clipgs", "challenger", v2)  # v2 the latest promoted
    back = clipgs("promote", "--rollback", *t)
    assert back["champion"] == v1 and back["from"] == v2
    assert champion(client) == v1
    # a plain promote does not put the version just rolled back up again
    assert "'challenger' no longer names v" in back["reason"]
    capsys.readouterr()
    assert main(["promote", "--data", data, *t, *EVAL]) == 2
    assert "has no 'challenger' alias" in capsys.readouterr().err
    assert "rolled back" in client.get_model_version("clipgs", v2).description
    capsys.readouterr()
    assert main(["promote", "--rollback", *t]) == 2  # v1 was the first champion
    assert "nothing to roll back to" in capsys.readouterr().err
    assert champion(client) == v1
    # the version taken down stays down when named (a retried pipeline, or its run registered
    # again, names it): the refusal is recorded, and it is not evaluated
    kept = clipgs("promote", "--data", data, "--version", v2, *t, *EVAL)
    assert not kept["promoted"] and kept["metrics"] is None, kept
    assert kept["reason"].startswith(f"kept the champion v{v1}: v{v2} was rolled back at ")
    assert "--allow-rolled-back" in kept["reason"] and champion(client) == v1
    assert "was rolled back at" in client.get_model_version("clipgs", v2).description
    client.set_registered_model_alias("clipgs", "challenger", v2)  # as its run registered again
    assert "was rolled back at" in clipgs("promote", "--data", data, *t, *EVAL)["reason"]
    assert champion(client) == v1
    # put back up on purpose, it is an ordinary champion again (rollback goes to v1)
    again = clipgs("promote", "--data", data, "--version", v2, "--allow-rolled-back", *t, *EVAL)
    assert again["promoted"] and "promoted again with allow_rolled_back" in again["reason"]
    assert champion(client) == v2
    assert "clipgs.rollback" not in client.get_model_version("clipgs", v2).tags


@pytest.mark.slow
def test_model_as_logged_and_promotion_on_sqlite(tiny_dataset, candidates, tmp_path,
                                                 monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_promotion_story(uri, str(tiny_dataset), candidates, capsys)

    client = mlflow.MlflowClient()
    mv = client.get_model_version("clipgs", "2")
    for tag in ("clipgs.training_run_id", "clipgs.git_commit", "clipgs.dataset_manifest_sha256",
                "clipgs.teacher_sha256"):
        assert mv.tags[tag], tag
    local = Path(mlflow.artifacts.download_artifacts("models:/clipgs/2"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/package/encoder.safetensors" in files
    assert {"artifacts/model_config.json", "artifacts/teacher.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    mlmodel = (local / "MLmodel").read_text()
    assert "pyfunc_model.py" in mlmodel and "signature" in mlmodel
    teacher = json.loads((local / "artifacts/teacher.json").read_text())
    assert teacher["sha256"] == mv.tags["clipgs.teacher_sha256"]
    signature = mlflow.models.get_model_info("models:/clipgs/2").signature
    assert {c.name for c in signature.inputs.inputs} == {"data", "format", "gaussians", "text"}


@pytest.fixture
def tracking_server(s3_server, tmp_path):
    """`mlflow server` on loopback: sqlite metadata, artifacts proxied to S3 (moto)."""
    port = free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         f"{s3_server}/mlartifacts", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, tmp_path / "server.log", 120, "mlflow server")
    yield url
    stop_process_group(proc)
    log.close()


@pytest.mark.slow
def test_commands_against_a_tracking_server_with_s3_artifacts(
        tracking_server, s3_server, tiny_dataset, candidates, shared_data, tmp_path,
        monkeypatch, capsys):
    import mlflow

    from clipgs.data import storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the evaluation shards in the same object store
    for f in Path(tiny_dataset).iterdir():
        storage.write_bytes(f"{s3_server}/shards/{f.name}", f.read_bytes())
    data = f"{s3_server}/shards"
    run_promotion_story(tracking_server, data, candidates, capsys)

    t = ["--tracking-uri", tracking_server]
    emb = tmp_path / "e.npy"
    clipgs("embed", str(shared_data / "gaussians/donut.ply"), "--text", "a donut",
           "--out", str(emb), *t)
    vectors = np.load(emb)
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    evaluated = clipgs("evaluate", "--model", "models:/clipgs@champion", "--data", data,
                       "--log", *t, "fewshot_shot=1", "fewshot_way=3", "gallery_queries=2")
    assert "retrieval_image_to_3d_r10" in evaluated["metrics"]
    mlflow.set_tracking_uri(tracking_server)
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(evaluated["mlflow_run_id"],
                                                                   "plots")}
    assert "plots/retrieval_gallery.png" in plots
    # everything the server stored went to S3, none to its local disk
    keys = [o["Key"] for page in storage.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket="clipgs", Prefix="mlartifacts/") for o in page.get("Contents", [])]
    assert any(k.endswith("package/encoder.safetensors") for k in keys)
    assert any(k.endswith("plots/retrieval_gallery.png") for k in keys)
    assert any(k.endswith("teacher.json") for k in keys)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


# a register that waits, after looking for a version of its run, until the other has looked too
RACING_REGISTER = """
import sys, time
from pathlib import Path
from clipgs.registry import registry
run_id, uri, barrier, me = sys.argv[1:]
make = registry._log_and_register
def after_both_looked(*args, **kwargs):
    (Path(barrier) / me).touch()
    deadline = time.monotonic() + 300
    while len(list(Path(barrier).iterdir())) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the other register never came")
        time.sleep(0.05)
    return make(*args, **kwargs)
registry._log_and_register = after_both_looked
print(registry.register(run_id, uri, "clipgs"))
"""


@pytest.mark.slow
def test_two_registers_of_one_run_at_once_leave_one_version(tiny_dataset, tmp_path):
    """Two processes register the same run at the same moment: both find no version of it,
    both make one. They agree on the first, the other is deleted with its logged model, and
    the challenger alias names the one left."""
    import mlflow

    from clipgs.models.package import init_package
    from clipgs.registry.registry import log_package_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    package = init_package(tmp_path / "pkg", str(tiny_dataset), SMALL)
    run_id = log_package_run(str(package), uri)
    (tmp_path / "barrier").mkdir()
    procs = [subprocess.Popen(
        [sys.executable, "-c", RACING_REGISTER, run_id, uri, str(tmp_path / "barrier"), str(i)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    versions = {out.strip().splitlines()[-1] for out, _ in outs}
    client = mlflow.MlflowClient(uri)
    left = [str(v.version) for v in client.search_model_versions("name = 'clipgs'")]
    assert len(versions) == 1 and left == list(versions), (versions, left)
    assert "same time by another register" in "".join(err for _, err in outs)
    mv = client.get_model_version_by_alias("clipgs", "challenger")
    assert str(mv.version) == left[0] and mv.tags["clipgs.training_run_id"] == run_id
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models(experiment_ids=[experiment])
    assert [f"models:/{m.model_id}" for m in logged] == [mv.source]
