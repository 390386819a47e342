"""Embeddings of 3DGS files and captions with a registered model (through its MLflow pyfunc,
as serving runs it) or a local model package folder (the teacher's text tower for text)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from clipgs.data.formats import read_gaussians
from clipgs.data.storage import read_bytes


def _is_registered(model_uri: str) -> bool:
    return model_uri.startswith(("models:/", "runs:/")) and not model_uri.rstrip("/").endswith(
        "package")


def _pyfunc_embed(model_uri: str, frame) -> np.ndarray:
    import mlflow

    from clipgs.models.package import mlflow_error

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:  # no such model, alias, version or run
        raise mlflow_error(model_uri, exc) from None
    return np.array(model.predict(frame)["embedding"].tolist(), dtype=np.float32)


def embed_files(files: list[str], model_uri: str) -> np.ndarray:
    """[len(files), D] unit embeddings; a bad file raises GaussianFormatError naming it."""
    if _is_registered(model_uri):
        import pandas as pd

        blobs = [read_bytes(f) for f in files]
        for f, data in zip(files, blobs):  # validate here first: the error names the user's file
            read_gaussians(data, f)
        return _pyfunc_embed(model_uri, pd.DataFrame({
            "data": [base64.b64encode(b).decode() for b in blobs],
            "format": [Path(f).suffix.lstrip(".") for f in files]}))
    from clipgs.models.package import load_package

    package = load_package(model_uri)
    points = []
    for f in files:
        data = read_bytes(f)
        points.append(package.prepare(read_gaussians(data, f), data))
    return package.embed_points(points)


def embed_texts(texts: list[str], model_uri: str) -> np.ndarray:
    """[len(texts), D]: captions in the same space, by the teacher the model was trained to."""
    if _is_registered(model_uri):
        import pandas as pd

        return _pyfunc_embed(model_uri, pd.DataFrame({"text": texts}))
    from clipgs.models.package import load_package
    from clipgs.models.teacher import Teacher, TeacherConfig

    identity = load_package(model_uri).meta["teacher"]
    teacher = Teacher(TeacherConfig(**identity["config"]))
    teacher.check_identity(identity, f"model {model_uri}")
    return teacher.encode_text(texts)
