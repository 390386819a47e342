"""Embeddings of 3DGS files with a registered model (through its MLflow pyfunc, as serving
runs it) or a local model package folder."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from clipgs.data.formats import read_gaussians
from clipgs.data.storage import read_bytes


def embed_files(files: list[str], model_uri: str) -> np.ndarray:
    """[len(files), D] unit embeddings; a bad file raises GaussianFormatError naming it."""
    if model_uri.startswith(("models:/", "runs:/")) and not model_uri.rstrip("/").endswith(
            "package"):
        import mlflow
        import pandas as pd

        blobs = [read_bytes(f) for f in files]
        for f, data in zip(files, blobs):  # validate here first: the error names the user's file
            read_gaussians(data, f)
        model = mlflow.pyfunc.load_model(model_uri)
        frame = pd.DataFrame({"data": [base64.b64encode(b).decode() for b in blobs],
                              "format": [Path(f).suffix.lstrip(".") for f in files]})
        return np.array(model.predict(frame)["embedding"].tolist(), dtype=np.float32)
    from clipgs.models.package import load_package

    package = load_package(model_uri)
    points = []
    for f in files:
        data = read_bytes(f)
        points.append(package.prepare(read_gaussians(data, f), data))
    return package.embed_points(points)
