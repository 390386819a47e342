"""The stage ledger: ``stages.json`` in the run's workdir (a folder or ``s3://``) records each
finished stage with a key over its inputs and its output. A retrain that failed resumes from
the last finished stage: a stage whose key is in the ledger is not run again; a changed input
changes its key (and so every stage downstream of it, whose inputs include its output).

A stage is recorded only after it returned, and the ledger is written atomically, so a stage
that died half-way never looks finished. A retrain that reached its end marks the ledger
complete: the next (nightly) run starts from scratch and sees the new assets.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clipgs.data import storage
from clipgs.errors import StorageError

LEDGER = "stages.json"


def stage_key(stage: str, inputs: Any) -> str:
    blob = json.dumps([stage, inputs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageLedger:
    def __init__(self, workdir: str):
        self.url = storage.join(workdir, LEDGER)
        self.stages: dict[str, dict] = {}
        if storage.exists(self.url):
            try:
                saved = json.loads(storage.read_bytes(self.url))
                self.stages = {} if saved.get("complete") else saved["stages"]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StorageError(f"{self.url}: not a stage ledger ({exc}); delete it to "
                                   "start the retrain from scratch") from None
        self.resuming = bool(self.stages)

    def finished(self, stage: str, key: str, *older: str) -> dict | None:
        """The stage's output if it finished with these inputs: under ``key``, or under a key
        an older clipgs gave the same inputs (``older``)."""
        entry = self.stages.get(stage)
        return entry["output"] if entry and entry["key"] in (key, *older) else None

    def record(self, stage: str, key: str, output: Any, flow_run: str | None) -> None:
        self.stages[stage] = {"key": key, "output": output, "flow_run": flow_run}
        self._write(complete=False)

    def complete(self) -> None:
        self._write(complete=True)

    def _write(self, complete: bool) -> None:
        blob = {"complete": complete, "stages": self.stages}
        storage.write_bytes(self.url, json.dumps(blob, indent=1).encode())
