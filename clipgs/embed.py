"""Embeddings of 3DGS files and captions with a registered model (through its MLflow pyfunc,
as serving runs it) or a local model package folder (the teacher's text tower for text)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from clipgs.data.formats import read_file_bytes, read_gaussians


def _is_registered(model_uri: str) -> bool:
    return model_uri.startswith(("models:/", "runs:/")) and not model_uri.rstrip("/").endswith(
        "package")


def _batches(sizes: list[int], max_rows: int, max_bytes: int) -> list[list[int]]:
    """Row indices in requests within the model's limits (rows, decoded bytes)."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not out or len(out[-1]) >= max_rows or total + size > max_bytes:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return out


def _pyfunc_embed(model_uri: str, frame, names: list[str],
                  sizes: list[int] | None = None) -> np.ndarray:
    """Through the registered pyfunc, as serving runs it: in requests within its serving
    limits (so 65 files are two requests, not a refused one); a row it refuses is one line
    naming the user's file (``names``), not the request's row number."""
    import re

    import mlflow

    from clipgs.errors import ClipgsError
    from clipgs.models.package import mlflow_error
    from clipgs.registry.serving import ServingLimits

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:  # no such model, alias, version or run
        raise mlflow_error(model_uri, exc) from None
    limits = getattr(model.unwrap_python_model(), "limits", None) or ServingLimits()
    out = []
    for rows in _batches(sizes or [0] * len(frame), limits.max_rows, limits.max_request_bytes):
        try:
            answer = model.predict(frame.iloc[rows].reset_index(drop=True))
        except mlflow.exceptions.MlflowException as exc:
            message = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0]
            message = re.sub(r"^row (\d+)", lambda m: names[rows[int(m[1])]], message)
            raise ClipgsError(f"{message} (refused by {model_uri})") from None
        out.append(np.array(answer["embedding"].tolist(), dtype=np.float32))
    return np.concatenate(out)


def embed_files(files: list[str], model_uri: str) -> np.ndarray:
    """[len(files), D] unit embeddings; a bad file raises GaussianFormatError naming it."""
    if _is_registered(model_uri):
        import pandas as pd

        blobs = [read_file_bytes(f) for f in files]
        for f, data in zip(files, blobs):  # validate here first: the error names the user's file
            read_gaussians(data, f)
        return _pyfunc_embed(model_uri, pd.DataFrame({
            "data": [base64.b64encode(b).decode() for b in blobs],
            "format": [Path(f).suffix.lstrip(".") for f in files]}), files,
            [len(b) for b in blobs])
    from clipgs.models.package import load_package

    package = load_package(model_uri)
    points = []
    for f in files:
        data = read_file_bytes(f)
        points.append(package.prepare(read_gaussians(data, f), data))
    return package.embed_points(points)


def embed_texts(texts: list[str], model_uri: str) -> np.ndarray:
    """[len(texts), D]: captions in the same space, by the teacher the model was trained to."""
    if _is_registered(model_uri):
        import pandas as pd

        return _pyfunc_embed(model_uri, pd.DataFrame({"text": texts}),
                             [f"text {i}" for i in range(len(texts))])
    from clipgs.models.package import load_package
    from clipgs.models.teacher import Teacher, TeacherConfig

    identity = load_package(model_uri).meta["teacher"]
    teacher = Teacher(TeacherConfig(**identity["config"]))
    teacher.check_identity(identity, f"model {model_uri}")
    return teacher.encode_text(texts)
