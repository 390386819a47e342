"""Serving: the request rules in-process, then a real `mlflow models serve` process on loopback
serving models:/clipgs@champion, sent real files from ../shared/data, good and bad."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipgs.config import ModelConfig
from clipgs.registry.serving import (RequestError, RequestTooLarge, ServingLimits, parse_rows,
                                     ply_vertex_count)
from conftest import free_port, wait_for_http

SMALL = ModelConfig(depth=1, width=48)
LIMITS = {"max_rows": 4, "max_file_bytes": 3_000_000, "max_gaussians": 50_000}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def lying_ply(count: int) -> bytes:
    """A .ply header that claims ``count`` gaussians over a body of one."""
    from clipgs.data.formats import PLY_REQUIRED

    header = "ply\nformat binary_little_endian 1.0\nelement vertex {}\n{}end_header\n".format(
        count, "".join(f"property float {p}\n" for p in PLY_REQUIRED))
    return header.encode() + bytes(4 * len(PLY_REQUIRED))


@pytest.fixture(scope="module")
def files(shared_data):
    donut = (shared_data / "gaussians/donut.ply").read_bytes()
    cat = (shared_data / "splats/cat/cat_10k.splat").read_bytes()
    return {"donut": donut, "cat": cat, "truncated": donut[:200_000],
            "garbage": np.random.default_rng(0).bytes(4999),
            "too_many_gaussians": cat * 6,  # 60k gaussians, 1.9 MB: under the byte limit
            "too_many_bytes": cat * 10,  # 3.2 MB
            "lying_header": lying_ply(10**9)}


@pytest.fixture(scope="module")
def package(tiny_dataset, tmp_path_factory):
    from clipgs.models.package import init_package, load_package

    return load_package(str(init_package(tmp_path_factory.mktemp("serve") / "pkg",
                                         str(tiny_dataset), SMALL)))


def test_request_rules_in_process(package, files):
    limits = ServingLimits(**LIMITS)
    frame = pd.DataFrame({"data": [b64(files["donut"]), b64(files["truncated"]),
                                   b64(files["lying_header"]), None],
                          "format": ["ply", "ply", None, None],
                          "text": [None, None, None, "a red cube"]})
    rows = parse_rows(frame, package, limits)
    assert rows[0].kind == "3d" and rows[0].points.shape == (package.points, 14)
    assert isinstance(rows[1], RequestError) and "truncated" in str(rows[1])
    assert isinstance(rows[2], RequestError) and "max_gaussians" in str(rows[2])
    assert rows[3].kind == "text"
    assert ply_vertex_count(files["donut"], "donut.ply") == 45_624
    with pytest.raises(RequestTooLarge, match="max_rows"):
        parse_rows(pd.DataFrame({"text": ["x"] * 5}), package, limits)
    points = np.random.default_rng(0).random((200, 14))
    array_row = parse_rows(pd.DataFrame({"gaussians": [points.tolist()]}), package, limits)[0]
    assert array_row.kind == "3d" and array_row.points.shape == (package.points, 14)
    bad = parse_rows(pd.DataFrame({"gaussians": [np.zeros((3, 5)).tolist()],
                                   "data": [None]}), package, limits)
    assert "expected [N, 14]" in str(bad[0])
    assert "exactly one of" in str(parse_rows(pd.DataFrame({"data": [None]}), package,
                                              limits)[0])
    assert "not valid base64" in str(parse_rows(pd.DataFrame({"data": ["%%%"]}), package,
                                                limits)[0])
    wrapped = b64(files["donut"])
    wrapped = "\n".join(wrapped[i:i + 76] for i in range(0, len(wrapped), 76))  # GNU base64
    assert parse_rows(pd.DataFrame({"data": [wrapped]}), package, limits)[0].kind == "3d"
    listed = parse_rows(pd.DataFrame({"text": [["a", "b"]]}), package, limits)[0]
    assert "'text' is a list; expected one string per row" in str(listed)


@pytest.fixture(scope="module")
def server(tiny_dataset, package, tmp_path_factory):
    """Register the package, promote it to champion, serve models:/clipgs@champion."""
    from clipgs.cli import main

    root = tmp_path_factory.mktemp("served")
    db = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default artifact root is ./mlruns
        assert main(["register", "--package", package.path, "--tracking-uri", db]) == 0
        assert main(["promote", "--data", str(tiny_dataset), "--tracking-uri", db,
                     "fewshot_episodes=0", "gallery_queries=0"]) == 0
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=db, SERVING_MODEL_CONFIG=json.dumps(LIMITS),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve",
                             "-m", "models:/clipgs@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/ping", proc, root / "serve.log", 240, "mlflow models serve")
    yield {"url": url, "db": db, "proc": proc}
    os.killpg(proc.pid, 15)  # the CLI and its uvicorn child (their own process group)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)
    log.close()


def post(server, records, params=None):
    import requests

    body = {"dataframe_records": records}
    if params:
        body["params"] = params
    return requests.post(f"{server['url']}/invocations", json=body, timeout=120)


@pytest.mark.slow
def test_served_champion_answers_good_and_bad_files(server, files, package):
    import mlflow

    good = post(server, [{"data": b64(files["donut"]), "format": "ply"}])
    assert good.status_code == 200, good.text
    served = np.array(good.json()["predictions"][0]["embedding"])
    assert served.shape == (package.meta["embed_dim"],)
    assert abs(np.linalg.norm(served) - 1) < 1e-5
    mlflow.set_tracking_uri(server["db"])
    in_process = mlflow.pyfunc.load_model("models:/clipgs@champion").predict(
        pd.DataFrame({"data": [b64(files["donut"])], "format": ["ply"]}))
    np.testing.assert_allclose(served, in_process["embedding"][0], atol=1e-5)

    splat = post(server, [{"data": b64(files["cat"])}])  # format sniffed from the bytes
    assert splat.status_code == 200 and splat.json()["predictions"][0]["kind"] == "3d"
    points = package.prepare_activated(np.random.default_rng(0).random((300, 14)))
    array = post(server, [{"gaussians": points.tolist()}])  # an activated array, not a file
    assert array.status_code == 200, array.text[:300]
    np.testing.assert_allclose(array.json()["predictions"][0]["embedding"],
                               package.embed_points([points])[0], atol=1e-5)

    bad = [("truncated", "ply", "truncated"), ("garbage", None, "neither a .ply"),
           ("garbage", "ply", "no PLY header"), ("garbage", "splat", "not a multiple of 32"),
           ("too_many_gaussians", "splat", "max_gaussians"),
           ("too_many_bytes", "splat", "max_file_bytes"), ("lying_header", None, "max_gaussians")]
    for name, fmt, expected in bad:
        resp = post(server, [{"data": b64(files[name]), **({"format": fmt} if fmt else {})}])
        assert resp.status_code == 400, (name, resp.status_code, resp.text[:300])
        error = resp.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert expected in error["message"], (name, error["message"][-300:])
        assert len(resp.content) < 20_000  # the error does not echo the file back
        assert server["proc"].poll() is None  # still serving
    rows = post(server, [{"text": "a cube"}] * 5)
    assert rows.status_code == 400 and "max_rows" in rows.json()["message"]

    mixed = post(server, [{"data": b64(files["truncated"]), "format": "ply"},
                          {"data": b64(files["donut"]), "format": "ply"},
                          {"text": "a red cube"}], params={"errors": "skip"})
    assert mixed.status_code == 200, mixed.text[:500]
    out = mixed.json()["predictions"]
    assert [r["kind"] for r in out] == ["error", "3d", "text"]
    assert "truncated" in out[0]["error"] and out[0]["embedding"] == []
    np.testing.assert_allclose(out[1]["embedding"], served, atol=1e-5)
    assert len(out[2]["embedding"]) == len(served)

    again = post(server, [{"data": b64(files["donut"]), "format": "ply"}])  # still serving
    assert again.status_code == 200
    np.testing.assert_allclose(again.json()["predictions"][0]["embedding"], served, atol=1e-6)
