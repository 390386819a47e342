"""Serving: one 10k-gaussian object's latency (p50/p95) and batch embeddings per second through
a real ``mlflow models serve`` process on loopback, against the named anchor: the same MLflow
model called in-process (``mlflow.pyfunc.load_model(...).predict``) on the same inputs.

The model is the default CPU configuration (clipgs.config.ModelConfig) with freshly
initialised weights - speed does not depend on the weights - registered in a throw-away
sqlite store; or any registered model with ``--model models:/NAME@ALIAS`` (and
``MLFLOW_TRACKING_URI``). Inputs: the 12 real 10k-gaussian .splat objects of
../shared/data/splats (cat_10k.splat for single-object latency). The client and the server
share this machine's cores.

    .venv/bin/python -m benchmarks.serving [--requests 40] [--batch 32] [--batches 5]
                                           [--threads 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipgs.train.launch import free_port

SPLATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "splats"


def build_model(root: Path) -> tuple[str, str]:
    """A default-config package registered in a sqlite store under ``root``."""
    from clipgs.config import IngestConfig, ModelConfig
    from clipgs.models.package import package_meta, save_package
    from clipgs.models.encoder import GSEncoder
    from clipgs.models.teacher import Teacher
    from clipgs.registry.registry import log_package_run, register

    teacher = Teacher()
    manifest = {"embed_dim": teacher.embed_dim, "config": {"points": IngestConfig().points},
                "teacher": teacher.identity()}
    model = ModelConfig()
    meta = package_meta(model, manifest, untrained=True)
    encoder = GSEncoder(model, meta["embed_dim"])
    save_package(root / "package", {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                 meta)
    uri = f"sqlite:///{root}/mlflow.db"
    version = register(log_package_run(str(root / "package"), uri), uri)
    return uri, f"models:/clipgs/{version}"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q))


def measure(calls: dict, single, batch, requests: int, batches: int) -> dict:
    """Latency of ``single`` and throughput on ``batch`` for each call, interleaved (the
    order alternating each round) so that load from elsewhere hits every call alike."""
    names = list(calls)
    for name in names:  # warm-up
        calls[name](single)
        calls[name](batch)
    latency = {n: [] for n in names}
    busy = {n: 0.0 for n in names}
    for i in range(max(requests, batches)):
        for name in (names if i % 2 == 0 else names[::-1]):
            if i < requests:
                t0 = time.perf_counter()
                calls[name](single)
                latency[name].append(time.perf_counter() - t0)
            if i < batches:
                t0 = time.perf_counter()
                calls[name](batch)
                busy[name] += time.perf_counter() - t0
    return {n: {"p50_ms": pct(latency[n], 50), "p95_ms": pct(latency[n], 95),
                "emb_per_s": batches * len(batch["records"]) / busy[n]} for n in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a registered model URI (default: build one)")
    parser.add_argument("--requests", type=int, default=40, help="single-object requests")
    parser.add_argument("--batch", type=int, default=32, help="objects per batch request")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side "
                        "(the same for both, so the ratio is MLflow's serving overhead)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server inherits it
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import mlflow
    import pandas as pd
    import requests as http

    files = sorted(SPLATS.glob("*/*_10k.splat"))
    cat = SPLATS / "cat" / "cat_10k.splat"
    encoded = {f: base64.b64encode(f.read_bytes()).decode() for f in files}
    single = {"records": [{"data": encoded[cat], "format": "splat"}]}
    batch = {"records": [{"data": encoded[files[i % len(files)]], "format": "splat"}
                         for i in range(args.batch)]}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # MLflow's default artifact root is ./mlruns
        if args.model:
            tracking, model_uri = os.environ.get("MLFLOW_TRACKING_URI", ""), args.model
        else:
            tracking, model_uri = build_model(root)
        mlflow.set_tracking_uri(tracking)
        model = mlflow.pyfunc.load_model(model_uri)
        in_process = lambda r: model.predict(pd.DataFrame(r["records"]))  # noqa: E731

        port = free_port()
        env = dict(os.environ, MLFLOW_TRACKING_URI=tracking,
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        log = open(root / "serve.log", "wb")
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve",
                                 "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                                 "-p", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if http.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except http.ConnectionError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("server did not start:\n"
                                     + (root / "serve.log").read_text()[-2000:])
                time.sleep(0.5)
            session = http.Session()

            def served(r):
                resp = session.post(f"{url}/invocations", timeout=300,
                                    data=json.dumps({"dataframe_records": r["records"]}),
                                    headers={"Content-Type": "application/json"})
                resp.raise_for_status()
                return resp

            check = np.array(served(single).json()["predictions"][0]["embedding"])
            ref = np.array(model.predict(pd.DataFrame(single["records"]))["embedding"][0])
            assert np.allclose(check, ref, atol=1e-5), "served and in-process embeddings differ"
            result = measure({"anchor": in_process, "served": served}, single, batch,
                             args.requests, args.batches)
            anchor, server = result["anchor"], result["served"]
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
            log.close()
            os.chdir("/")

    body = len(json.dumps({"dataframe_records": single["records"]}))
    print(f"model {model_uri}; one object: {cat.name} (10,000 gaussians, request body "
          f"{body / 1e6:.2f} MB); batch: {args.batch} objects; {args.requests} single "
          f"requests, {args.batches} batches; torch threads {args.threads} a side; "
          f"{os.cpu_count()} CPU cores shared by client and server")
    print(f"{'':32s}{'p50 ms':>10s}{'p95 ms':>10s}{'emb/s (batch)':>16s}")
    for name, r in (("in-process pyfunc (anchor)", anchor), ("mlflow models serve", server)):
        print(f"{name:32s}{r['p50_ms']:10.1f}{r['p95_ms']:10.1f}{r['emb_per_s']:16.1f}")
    print(f"served / anchor: p50 latency x{server['p50_ms'] / anchor['p50_ms']:.2f}, "
          f"p95 latency x{server['p95_ms'] / anchor['p95_ms']:.2f}, "
          f"throughput x{server['emb_per_s'] / anchor['emb_per_s']:.2f}")


if __name__ == "__main__":
    main()
