"""A production-like stack on loopback, then the retraining deployment run through it as on a
cluster: an S3-compatible server (moto), an MLflow tracking server (sqlite backend, artifacts
proxied to S3), a Prefect server, the work pool and a process worker; `prefect deploy` of
prefect.yaml's retrain-local; one run of it through the worker (assets read from S3, training
on local ranks, evaluation, registration, promotion); checks of what it left; then everything
is shut down. Bounded in time (--timeout); every server listens on 127.0.0.1 only.

    .venv/bin/python infra/local-stack.py                 # tiny run, about 5 minutes on 2 cores
    .venv/bin/python infra/local-stack.py --keep          # keep the stack's folder for a look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "clipgs-local"
DEPLOYMENT = "clipgs-retrain/retrain-local"
BUCKET = "clipgs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


class Stack:
    """The processes this script started, each in its own process group, stopped in reverse."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = root, env, []
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def run(self, name: str, cmd: list[str], timeout: float) -> str:
        out = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True,
                             timeout=timeout)
        (self.root / "logs" / f"{name}.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-2000:]}")
        return out.stdout

    def wait_http(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = dict(self.procs)[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                   f"{self.root}/logs/{name}.log")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} not healthy at {url} after {timeout:.0f} s")

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=1200, help="give up after this many seconds")
    p.add_argument("--steps", type=int, default=20, help="training steps of the run")
    p.add_argument("--per-class", type=int, default=6, help="generated primitives per class")
    p.add_argument("--keep", action="store_true", help="keep the stack's folder")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    root = Path(tempfile.mkdtemp(prefix="clipgs-stack-"))
    s3_port, mlflow_port, prefect_port = free_port(), free_port(), free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # S3 (moto) with throwaway credentials; the same variables a cluster's Secret provides
        "AWS_ENDPOINT_URL": s3_url, "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": "local-stack", "AWS_SECRET_ACCESS_KEY": "local-stack",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL":
            f"sqlite+aiosqlite:///{root}/prefect/prefect.db",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "CLIPGS_HOME": str(REPO),  # prefect.yaml's pull step: where flows run from
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"),
    })
    (root / "prefect").mkdir()
    stack = Stack(root, env)
    print(f"stack folder {root}", flush=True)
    ok = False
    try:
        stack.start("s3", [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1",
                           "-p", str(s3_port)])
        stack.wait_http("s3", s3_url + "/moto-api/", 60)
        os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        from clipgs.data import storage
        from clipgs.data.synthetic import generate

        storage.s3_client().create_bucket(Bucket=BUCKET)
        step(f"S3 (moto) on {s3_url}, bucket {BUCKET}", t0)

        stack.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                               str(mlflow_port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                               "--serve-artifacts", "--artifacts-destination",
                               f"s3://{BUCKET}/mlflow"])
        stack.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host",
                                       "127.0.0.1", "--port", str(prefect_port)])
        # the user's assets, in object storage
        src = generate(root / "assets", per_class=args.per_class)
        files = sorted(f for f in Path(src).rglob("*") if f.is_file())
        for f in files:
            storage.write_bytes(f"s3://{BUCKET}/assets/{f.relative_to(src)}", f.read_bytes())
        step(f"uploaded {len(files)} asset files to s3://{BUCKET}/assets", t0)
        stack.wait_http("mlflow", mlflow_url + "/health", 180)
        step(f"MLflow tracking server on {mlflow_url} (artifacts in s3://{BUCKET}/mlflow)", t0)
        stack.wait_http("prefect-server", prefect_api + "/health", 180)
        step(f"Prefect server on {prefect_api}", t0)

        prefect = str(BIN / "prefect")
        stack.run("work-pool", [prefect, "work-pool", "create", POOL, "--type", "process"], 120)
        stack.run("deploy", [prefect, "--no-prompt", "deploy", "--name", "retrain-local"], 300)
        stack.start("worker", [prefect, "worker", "start", "--pool", POOL, "--type", "process",
                               "--limit", "1"])
        step(f"work pool {POOL}, deployment {DEPLOYMENT}, a process worker", t0)

        os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME",
                                                "PREFECT_SERVER_ANALYTICS_ENABLED")})
        from prefect.deployments import run_deployment

        workdir = root / "work"
        params = {"config": {
            "source": f"s3://{BUCKET}/assets", "workdir": str(workdir),
            "ingest": {"points": 512, "views": 2},
            "train": {"steps": args.steps, "micro_batch": 8, "log_every": 5,
                      "loader_workers": 0, "checkpoint_every": args.steps}}}
        remaining = deadline - time.monotonic()
        run = run_deployment(DEPLOYMENT, parameters=params, timeout=max(remaining - 60, 60))
        step(f"flow run {run.name} ({run.id}) through the worker: {run.state.type.value}", t0)
        if not run.state.is_completed():
            log_tail = (root / "logs" / "worker.log").read_text()[-3000:]
            raise RuntimeError(f"the retrain ended {run.state.type.value}: "
                               f"{run.state.message}\n--- worker log ---\n{log_tail}")
        ok = check(run, env, mlflow_url, workdir)
        step("checks passed" if ok else "checks FAILED", t0)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"local stack: {exc}", file=sys.stderr)
    finally:
        stack.stop()
        step("stack stopped", t0)
        if args.keep:
            print(f"kept {root} (logs/, mlflow.db, work/)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"local stack: {'OK' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s")
    return 0 if ok else 1


def check(run, env: dict, mlflow_url: str, workdir: Path) -> bool:
    """What a user would look at: the champion in the registry, its artifacts in S3, the
    run's Prefect artifact and the stage ledger."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from clipgs.data import storage

    mlflow.set_tracking_uri(mlflow_url)
    champion = mlflow.MlflowClient().get_model_version_by_alias("clipgs", "champion")
    in_s3 = storage.list_files(f"s3://{BUCKET}/mlflow")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    saved = json.loads((workdir / "stages.json").read_text())
    ledger = saved["stages"]
    report = {"champion": f"models:/clipgs/{champion.version}",
              "champion_run": champion.run_id,
              "mlflow_artifacts_in_s3": len(in_s3),
              "prefect_artifacts": sorted(a.key for a in artifacts if a.key),
              "stages": list(ledger),
              "metrics": ledger["evaluate"]["output"]}
    print(json.dumps(report, indent=1))
    return (len(in_s3) > 0 and "clipgs-retrain" in report["prefect_artifacts"]
            and list(ledger) == ["ingest", "train", "evaluate", "register", "promote"]
            and saved["complete"])


if __name__ == "__main__":
    sys.exit(main())
