"""Evaluation: the metric functions on hand-checked cases, then the whole protocol on the tiny
shard set with an untrained model, its MLflow logging and the CLI."""

import json

import numpy as np
import pytest

from conftest import fails

from clipgs.config import EvalConfig, ModelConfig
from clipgs.errors import ClipgsError
from clipgs.eval.fewshot import linear_probe_episodes
from clipgs.eval.metrics import (duplicate_groups, match_ranks, per_class_accuracy, recall_at_k,
                                 retrieval_metrics)

SMALL = ModelConfig(depth=1, width=48)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ranks_ties_and_duplicates():
    eye = np.eye(4, dtype=np.float32)
    assert match_ranks(eye, eye).tolist() == [0, 0, 0, 0]
    # a collapsed model (every object the same embedding) gets no credit from ties
    collapsed = np.tile([[1.0, 0.0]], (4, 1))
    assert recall_at_k(eye[:, :2], collapsed, 1) == 0.0
    # objects sharing one caption: either object is a right answer for it, both ways
    txt = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    g = np.array([[0.9, 0.1], [1, 0], [0, 1]], np.float32)
    groups = duplicate_groups(txt)
    assert groups[0] == groups[1] != groups[2]
    assert match_ranks(txt, g).tolist() == [1, 0, 0]
    assert match_ranks(txt, g, groups).tolist() == [0, 0, 0]
    metrics = retrieval_metrics({"g": g, "txt": txt, "img": g}, [1])
    assert metrics["retrieval_text_to_3d_r1"] == metrics["retrieval_3d_to_text_r1"] == 1.0
    assert retrieval_metrics({"g": collapsed[:3], "txt": txt, "img": g}, [1])[
        "retrieval_text_to_3d_r1"] == 0.0
    # a caption's query scores by its best object: g1 (same caption) first is a hit for
    # caption 0 even though g0 itself is below g2
    g = np.array([[0.6, 0.8], [1, 0], [0.8, 0.6]], np.float32)
    assert match_ranks(txt, g, duplicate_groups(txt)).tolist() == [0, 0, 1]
    assert retrieval_metrics({"g": g, "txt": txt, "img": g}, [1])[
        "retrieval_text_to_3d_r1"] == pytest.approx(2 / 3)


def test_recall_against_brute_force_with_class_captions():
    """10 classes x 30 objects with one caption a class (ModelNet's shape): every figure
    equals a brute force - text->3D: any object of the class within the top k objects;
    3D->text: the class's caption within the top k distinct captions; ties count against."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    captions = _unit(rng.normal(size=(10, 16)))
    g = _unit(captions[labels] + 0.9 * rng.normal(size=(300, 16)))
    txt = captions[labels]
    m = retrieval_metrics({"g": g, "txt": txt, "img": g}, [1, 5, 10])

    def brute(scores, right, k):
        hits = []
        for s, r in zip(scores, right):
            best = s[r].max()
            hits.append((s[~r] >= best).sum() < k)
        return float(np.mean(hits))

    t2g = captions @ g.T  # one row per caption, repeated for each of its 30 queries
    same = labels[None, :] == labels[:, None]
    g2t = g @ captions.T
    right = np.arange(10)[None, :] == labels[:, None]
    for k in (1, 5, 10):
        assert m[f"retrieval_text_to_3d_r{k}"] == pytest.approx(brute(t2g[labels], same, k))
        assert m[f"retrieval_3d_to_text_r{k}"] == pytest.approx(brute(g2t, right, k))
    assert m["retrieval_3d_to_text_r10"] == 1.0  # ten captions: always within the top ten
    assert m["retrieval_text_to_3d_r1"] > 0.5 and m["retrieval_3d_to_text_r5"] > \
        m["retrieval_3d_to_text_r1"]


def test_retrieval_metrics_four_directions():
    rng = np.random.default_rng(0)
    g = _unit(rng.normal(size=(20, 8)))
    emb = {"g": g, "txt": g.copy(), "img": _unit(rng.normal(size=(20, 8)))}
    m = retrieval_metrics(emb, [1, 5, 10])
    assert len(m) == 12
    assert m["retrieval_text_to_3d_r1"] == m["retrieval_3d_to_text_r1"] == 1.0
    assert m["retrieval_image_to_3d_r1"] <= m["retrieval_image_to_3d_r5"] \
        <= m["retrieval_image_to_3d_r10"]
    assert m["retrieval_image_to_3d_r1"] < 0.5  # random images: near chance (1/20)


def test_linear_probe_separates_clusters_and_not_noise():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 12)
    centres = _unit(rng.normal(size=(6, 16))) * 4
    clustered = centres[labels] + rng.normal(size=(72, 16))
    good = linear_probe_episodes(clustered, labels, way=5, shot=3, episodes=4, queries=5)
    noise = linear_probe_episodes(rng.normal(size=(72, 16)), labels, way=5, shot=3,
                                  episodes=4, queries=5)
    assert good["fewshot_acc_mean"] > 0.9 and good["fewshot_way"] == 5
    assert noise["fewshot_acc_mean"] < 0.6
    again = linear_probe_episodes(clustered, labels, way=5, shot=3, episodes=4, queries=5)
    assert again == good  # seeded: the same embeddings give the same figure
    # too few objects per class: reduced way, then skipped
    assert linear_probe_episodes(clustered, labels, way=10, shot=3, episodes=2)[
        "fewshot_way"] == 6
    assert linear_probe_episodes(clustered[:8], labels[:8], way=2, shot=3, episodes=2) is None


def test_linear_probe_draws_support_from_another_split():
    """support=(emb, labels): the probe learns from that pool and is scored on all of the
    evaluated objects (even with fewer of them than `shot`); a class without `shot` support
    objects is left out."""
    rng = np.random.default_rng(2)
    centres = _unit(rng.normal(size=(6, 16))) * 4
    pool_y = np.repeat(np.arange(6), 10)
    pool = centres[pool_y] + rng.normal(size=(60, 16))
    query_y = np.repeat(np.arange(6), 2)  # 2 a class: too few for a same-split 3-shot probe
    queries = centres[query_y] + rng.normal(size=(12, 16))
    assert linear_probe_episodes(queries, query_y, way=5, shot=3, episodes=2) is None
    good = linear_probe_episodes(queries, query_y, way=5, shot=3, episodes=4, queries=5,
                                 support=(pool, pool_y))
    assert good["fewshot_acc_mean"] > 0.9 and good["fewshot_way"] == 5
    wrong = linear_probe_episodes(queries, query_y, way=5, shot=3, episodes=4, queries=5,
                                  support=(pool, rng.permutation(pool_y)))
    assert wrong["fewshot_acc_mean"] < 0.6  # the support's labels are what it learns from
    thin = pool_y.copy()
    thin[thin == 5] = 0  # class 5 has no support objects left
    assert linear_probe_episodes(queries, query_y, way=6, shot=3, episodes=2,
                                 support=(pool, thin))["fewshot_way"] == 5


def test_per_class_accuracy_skips_absent_classes():
    confusion = np.array([[2, 1, 0], [0, 0, 0], [1, 0, 3]])
    assert per_class_accuracy(confusion, ["a", "b", "c"]) == {"a": 2 / 3, "c": 0.75}


@pytest.fixture(scope="module")
def untrained(tiny_dataset, tmp_path_factory):
    from clipgs.models.package import init_package

    return init_package(tmp_path_factory.mktemp("pkg") / "untrained", str(tiny_dataset), SMALL)


def test_evaluating_on_shards_of_another_size_says_so(tiny_dataset, untrained, teacher,
                                                     tmp_path, caplog):
    """A model trained at 1024 gaussians an object, evaluated on shards of another size: the
    figures are not serving's (which resamples to 1024), and the log says so."""
    import json
    import shutil

    from clipgs.eval.evaluate import evaluate

    pkg = tmp_path / "pkg"
    shutil.copytree(untrained, pkg)
    meta = json.loads((pkg / "clipgs.json").read_text())
    (pkg / "clipgs.json").write_text(json.dumps(dict(meta, points=2048)))
    cfg = EvalConfig(fewshot_episodes=0, plots=False)
    with caplog.at_level("WARNING"):
        evaluate(str(pkg), str(tiny_dataset), cfg, teacher=teacher)
    assert "gaussians an object; the model was trained on (and serving resamples to) " \
        "2048" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate(str(untrained), str(tiny_dataset), cfg, teacher=teacher)
    assert "serving resamples" not in caplog.text


def test_evaluate_logs_metrics_and_plots(tiny_dataset, untrained, teacher, tmp_path,
                                         monkeypatch):
    import mlflow

    from clipgs.eval.evaluate import evaluate, log_to_mlflow, metric_names

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    cfg = EvalConfig(fewshot_way=3, fewshot_shot=1, fewshot_episodes=3, gallery_queries=3)
    result = evaluate(str(untrained), str(tiny_dataset), cfg, teacher=teacher)
    m = result["metrics"]
    assert m["eval_objects"] == 12
    for key in ("zeroshot_top1", "zeroshot_top3", "zeroshot_top5", "zeroshot_mean_class_acc",
                "fewshot_acc_mean", "fewshot_acc_std", "retrieval_3d_to_image_r10"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["zeroshot_top1"] <= m["zeroshot_top3"] <= m["zeroshot_top5"]
    assert m["fewshot_way"] == 3 and m["fewshot_shot"] == 1
    assert set(result["per_class"]) == set(result["classes"])
    assert result["confusion"].sum() == 12
    # the test split is the default, and the train split is a different measurement
    on_train = evaluate(str(untrained), str(tiny_dataset), cfg.model_copy(update={
        "split": "train", "fewshot_episodes": 0}), teacher=teacher)
    assert on_train["metrics"]["eval_objects"] == 24 and "fewshot_acc_mean" not in \
        on_train["metrics"]
    # support drawn from the train split (4 objects a class), queries from the test split (2
    # a class: too few for a 2-shot probe within it)
    within = evaluate(str(untrained), str(tiny_dataset), cfg.model_copy(update={
        "fewshot_shot": 2, "plots": False}), teacher=teacher)
    assert "fewshot_acc_mean" not in within["metrics"]
    apart = evaluate(str(untrained), str(tiny_dataset), cfg.model_copy(update={
        "fewshot_support_split": "train", "fewshot_shot": 2, "plots": False}), teacher=teacher)
    assert apart["metrics"]["fewshot_shot"] == 2 and apart["metrics"]["fewshot_way"] == 3
    for r in (result, on_train, apart):  # what a promotion gate's names are checked against
        assert set(r["metrics"]) <= set(metric_names(EvalConfig(**r["config"])))
    assert 0.0 <= apart["metrics"]["fewshot_acc_mean"] <= 1.0
    with pytest.raises(ClipgsError, match="no 'val' shards to draw the few-shot support"):
        evaluate(str(untrained), str(tiny_dataset), cfg.model_copy(update={
            "fewshot_support_split": "val"}), teacher=teacher)
    with pytest.raises(ValueError, match="is the evaluated split"):
        EvalConfig(fewshot_support_split="test")

    db = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_to_mlflow(result, None, db)
    mlflow.set_tracking_uri(db)
    run = mlflow.get_run(run_id)
    assert run.data.metrics["eval_zeroshot_top1"] == m["zeroshot_top1"]
    assert any(k.startswith("eval_class_acc.") for k in run.data.metrics)
    client = mlflow.MlflowClient()
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/confusion_matrix.png", "plots/retrieval_gallery.png",
                     "plots/retrieval_gallery_image.png", "plots/embedding_map.png"}
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots")
    from PIL import Image

    for name in ("retrieval_gallery.png", "retrieval_gallery_image.png"):
        with Image.open(f"{local}/{name}") as im:
            assert im.size[0] > 400 and im.size[1] > 300  # 3 query rows x 6 columns


def test_gallery_ranks_by_the_query_kind(tiny_dataset, untrained, teacher):
    """The text gallery ranks by the caption, the image gallery by the first view's
    embedding; a hit is right when it is the query's own object or of its class."""
    from clipgs.eval.evaluate import evaluate, gallery

    cfg = EvalConfig(fewshot_episodes=0, gallery_queries=0)
    result = evaluate(str(untrained), str(tiny_dataset), cfg, teacher=teacher)
    out = result["embeddings"]
    for kind, source in (("text", out["txt"]), ("image", out["img"])):
        gal = gallery(result, 4, 5, seed=1, query=kind)
        assert len(set(out["labels"][q] for q in gal["query_objects"][:3])) == 3  # classes first
        for q, hits, right in zip(gal["query_objects"], gal["retrieved"], gal["correct"]):
            scores = source[q] @ out["g"].T
            assert hits == np.argsort(-scores)[:5].tolist()
            assert right == [j == q or out["labels"][j] == out["labels"][q] for j in hits]
    assert gallery(result, 4, 5, seed=1, query="text")["retrieved"] != \
        gallery(result, 4, 5, seed=1, query="image")["retrieved"]
    with pytest.raises(ValueError, match="expected 'text' or 'image'"):
        gallery(result, 4, 5, query="audio")


def test_evaluate_cli_and_clear_errors(tiny_dataset, untrained, tmp_path, capsys):
    from clipgs.cli import main

    assert main(["evaluate", "--model", str(untrained), "--data", str(tiny_dataset),
                 "fewshot_episodes=0", "gallery_queries=0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "retrieval_text_to_3d_r5" in out["metrics"] and out["per_class_accuracy"]
    assert main(["evaluate", "--model", str(untrained), "--data", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(untrained), "--data", str(tiny_dataset),
                 "split=validation"]) == 2
    assert "no 'validation' shards" in capsys.readouterr().err


def test_damaged_package_shard_and_run_id_are_one_line(tiny_dataset, untrained, tmp_path,
                                                      monkeypatch, capsys):
    """A truncated weights file, meta or shard names the file; a --run-id that does not exist
    is refused before the evaluation runs."""
    import shutil

    from clipgs.data.shards import iterate

    data, quick = str(tiny_dataset), ["fewshot_episodes=0", "gallery_queries=0"]
    for name, keep, what in (("encoder.safetensors", 1000, "damaged weights"),
                             ("clipgs.json", 50, "damaged package meta")):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(untrained, bad)
        (bad / name).write_bytes((bad / name).read_bytes()[:keep])
        for argv in (["evaluate", "--model", bad, "--data", data, *quick],
                     ["embed", "--model", bad, "--text", "a cube"]):
            assert f"{bad / name}: {what}" in fails(capsys, *argv)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_dataset, shards)
    tar = shards / "test-00000.tar"
    tar.write_bytes(tar.read_bytes()[:100_000])
    line = fails(capsys, "evaluate", "--model", untrained, "--data", shards, *quick)
    assert f"{tar}: 100000 bytes; the manifest records" in line
    with pytest.raises(ClipgsError, match=f"{tar}: damaged shard"):  # read without the check
        list(iterate([str(tar)]))

    def not_now(*a, **k):
        raise AssertionError("evaluated before the run was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("clipgs.eval.evaluate.evaluate", not_now)
    line = fails(capsys, "evaluate", "--model", untrained, "--data", data, "--run-id",
                 "deadbeef", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert "run deadbeef: not found in MLflow" in line
