"""A Kubernetes API stand-in on loopback for the flows' calls (no cluster here): the real
``kubernetes`` client talks HTTP to it through a kubeconfig. It answers only what the flows
use - patching a serving Deployment, reading a Job's status - records every request, and can
refuse patches with a status or hang up on Job reads, so the client's real errors reach the
code under test."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEPLOYMENT = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/?]+)$")
JOB_STATUS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/?]+)/status$")


class KubeApi:
    """``deployments``: names that exist (others get 404); ``patch_status``: statuses to answer
    the next patches with instead of applying them (e.g. [403]); ``hang_up``: Job status reads
    to close unanswered; ``patches``: (namespace, name, body) of each applied patch."""

    def __init__(self, deployments=(), patch_status=(), hang_up: int = 0):
        self.deployments = set(deployments)
        self.patch_status = list(patch_status)
        self.hang_up = hang_up
        self.patches: list[tuple[str, str, dict]] = []
        self.job_reads = 0
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                blob = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def _status(self, code: int, reason: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": reason, "code": code, "message": reason})

            def do_PATCH(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                m = DEPLOYMENT.match(self.path)
                with api.lock:
                    refuse = api.patch_status.pop(0) if api.patch_status else None
                if not m or m.group(2) not in api.deployments:
                    return self._status(404, "NotFound")
                if refuse:
                    return self._status(refuse, "Refused")
                with api.lock:
                    api.patches.append((m.group(1), m.group(2), body))
                self._send(200, {"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": m.group(2), "namespace": m.group(1)}})

            def do_GET(self):  # noqa: N802
                m = JOB_STATUS.match(self.path)
                if not m:
                    return self._status(404, "NotFound")
                with api.lock:
                    api.job_reads += 1
                    hang_up = api.job_reads <= api.hang_up
                if hang_up:
                    self.close_connection = True
                    return
                self._send(200, {"apiVersion": "batch/v1", "kind": "Job",
                                 "metadata": {"name": m.group(2), "namespace": m.group(1)},
                                 "status": {"succeeded": 2, "conditions": [
                                     {"type": "Complete", "status": "True"}]}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
