"""The MLflow pyfunc model, logged from code (this file), never a pickled object.

Input: a DataFrame with ``data`` (a .ply or .splat file, base64) and ``format`` ("ply" or
"splat"). Output: a DataFrame with ``embedding`` (unit-norm list of floats) per row.
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd


class ClipGSModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from clipgs.models.package import load_package

        self.package = load_package(context.artifacts["package"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from clipgs.data.formats import read_gaussians

        points = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            fmt = str(getattr(row, "format", "ply")).lower().lstrip(".")
            data = base64.b64decode(row.data, validate=False)
            cloud = read_gaussians(data, f"request row {i}.{fmt}")
            points.append(self.package.prepare(cloud, data))
        emb = self.package.embed_points(points)
        return pd.DataFrame({"embedding": [e.astype(float).tolist() for e in emb]})


mlflow.models.set_model(ClipGSModel())
