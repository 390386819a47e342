"""The MLflow pyfunc model, logged from code (this file), never a pickled object.

Input: a table whose rows are 3DGS files (``data``: .ply / .splat bytes in base64, optional
``format``), activated gaussian arrays (``gaussians``: [N, 14]) or captions (``text``); see
clipgs/registry/serving.py. Output: ``embedding`` (unit-norm floats in the teacher's space),
``kind`` ("3d" / "text" / "error") and ``error`` ("" when fine).

A bad row fails the whole request with an MlflowException(INVALID_PARAMETER_VALUE), which
MLflow's scoring server answers with HTTP 400 and the message, and goes on serving. With
``params={"errors": "skip"}`` bad rows come back as kind "error" with the reason and an empty
embedding instead, and the good rows are embedded.
"""

from __future__ import annotations

import threading

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

EMBED_BATCH = 32


class ClipGSModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from clipgs.models.package import load_package
        from clipgs.registry.serving import ServingLimits

        self.package = load_package(context.artifacts["package"])
        self.limits = ServingLimits.model_validate(context.model_config or {})
        self._teacher = None
        self._teacher_lock = threading.Lock()

    def teacher(self):
        """The teacher's text tower, built on the first text row (3D-only serving never
        pays for it), and checked to be the one the model was trained against."""
        with self._teacher_lock:
            if self._teacher is None:
                from clipgs.models.teacher import Teacher, TeacherConfig

                identity = self.package.meta["teacher"]
                teacher = Teacher(TeacherConfig(**identity["config"]))
                teacher.check_identity(identity, "the served model")
                self._teacher = teacher
            return self._teacher

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from clipgs.errors import ClipgsError
        from clipgs.registry.serving import Row, parse_rows

        errors = (params or {}).get("errors", "raise")
        if errors not in ("raise", "skip"):
            raise MlflowException(f"params.errors='{errors}'; expected 'raise' or 'skip'",
                                  error_code=INVALID_PARAMETER_VALUE)
        skip = errors == "skip"
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            rows = parse_rows(model_input, self.package, self.limits)
            if not skip:
                for row in rows:
                    if not isinstance(row, Row):
                        raise row
        except ClipgsError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        dim = int(self.package.meta["embed_dim"])
        emb = np.zeros((len(rows), dim), np.float32)
        shapes = [i for i, r in enumerate(rows) if isinstance(r, Row) and r.kind == "3d"]
        for start in range(0, len(shapes), EMBED_BATCH):
            chunk = shapes[start:start + EMBED_BATCH]
            emb[chunk] = self.package.embed_points([rows[i].points for i in chunk])
        texts = [i for i, r in enumerate(rows) if isinstance(r, Row) and r.kind == "text"]
        if texts:
            text_emb = self.teacher().encode_text([rows[i].text for i in texts])
            if text_emb.shape[1] != dim:
                raise MlflowException(f"the teacher's text width {text_emb.shape[1]} differs "
                                      f"from the model's {dim}; text rows cannot be served",
                                      error_code=INVALID_PARAMETER_VALUE)
            emb[texts] = text_emb
        ok = [isinstance(r, Row) for r in rows]
        return pd.DataFrame({
            "embedding": [e.astype(float).tolist() if good else []
                          for e, good in zip(emb, ok)],
            "kind": [r.kind if good else "error" for r, good in zip(rows, ok)],
            "error": ["" if good else str(r) for r, good in zip(rows, ok)],
        })


mlflow.models.set_model(ClipGSModel())
