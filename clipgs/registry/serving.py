"""What a served request may hold, and turning its rows into model inputs within limits.

A request is a table; each row is one of:
  - ``data`` (a .ply or .splat file, base64) with an optional ``format`` ("ply" / "splat";
    sniffed from the bytes when absent),
  - ``gaussians``: activated gaussians [N, 14] in the layout of clipgs.data.gaussians
    (as the shards store them),
  - ``text``: a caption, embedded by the teacher's text tower into the same space.

Limits are checked before anything large is built: the number of rows, each file's decoded
size (from the base64 length, before decoding), the request's total, and the gaussian count
(from the .ply header or the .splat size, before parsing). MLflow's scoring server reads the
whole HTTP body before the model sees it, so a cap on the body itself belongs in front of it
(an ingress ``client_max_body_size``); see the README.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from clipgs.data.formats import SPLAT_RECORD_BYTES, read_gaussians
from clipgs.data.gaussians import NUM_ATTRIBUTES
from clipgs.errors import ClipgsError, GaussianFormatError

FORMATS = ("ply", "splat")
PLY_HEADER_MAX = 64 * 1024  # INRIA headers are < 4 KB; more is not a 3DGS .ply


class ServingLimits(BaseModel):
    """Stored as the MLflow model's ``model_config``; at serve time MLflow's own
    ``SERVING_MODEL_CONFIG`` environment variable (JSON) overrides any of them."""

    model_config = ConfigDict(extra="ignore")

    max_rows: int = Field(64, gt=0, description="rows (objects or texts) per request")
    max_file_bytes: int = Field(64 * 2**20, gt=0, description="one decoded file")
    max_request_bytes: int = Field(256 * 2**20, gt=0, description="all decoded files")
    max_gaussians: int = Field(1_000_000, gt=0, description="gaussians in one object")
    max_text_chars: int = Field(2000, gt=0)


class RequestError(ClipgsError):
    """A request row the model refuses: malformed, or over a limit. Served as HTTP 400."""


class RequestTooLarge(RequestError):
    """The request as a whole is over a limit (rows, total bytes): refused whole."""


@dataclass
class Row:
    index: int
    kind: str  # "3d" or "text"
    points: np.ndarray | None = None  # the model's input [M, 14] for "3d"
    text: str | None = None


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    if isinstance(value, str):
        return value != ""
    return True


def ply_vertex_count(data: bytes, name: str) -> int:
    """The gaussian count a .ply header declares, read without parsing the body."""
    end = data.find(b"end_header", 0, PLY_HEADER_MAX)
    if not data.startswith(b"ply") or end < 0:
        raise GaussianFormatError(name, "no PLY header ('ply' ... 'end_header' in the first "
                                  f"{PLY_HEADER_MAX} bytes); expected an INRIA 3DGS .ply")
    match = re.search(rb"^element\s+vertex\s+(\d+)\s*$", data[:end], re.MULTILINE)
    if not match:
        raise GaussianFormatError(name, "the header declares no 'element vertex N'",
                                  field="vertex")
    return int(match.group(1))


def _sniff(data: bytes, declared, name: str) -> str:
    if _present(declared):
        fmt = str(declared).lower().lstrip(".")
        if fmt not in FORMATS:
            raise RequestError(f"{name}: format '{declared}'; expected one of {FORMATS}")
        return fmt
    if data.startswith(b"ply"):
        return "ply"
    if len(data) % SPLAT_RECORD_BYTES == 0:
        return "splat"
    raise RequestError(f"{name}: neither a .ply (no 'ply' magic) nor a .splat (size "
                       f"{len(data)} is not a multiple of {SPLAT_RECORD_BYTES}); set 'format'")


def _decode_file(i: int, b64, declared, limits: ServingLimits) -> tuple[bytes, str, int]:
    name = f"row {i}"
    if not isinstance(b64, (str, bytes)):
        raise RequestError(f"{name}: 'data' must be one base64 string per row, got "
                           f"{type(b64).__name__}; send rows as dataframe_records, "
                           "dataframe_split, or 'inputs' as a list of records")
    # line breaks (GNU base64 wraps at 76 columns unless -w0) are not part of the data
    b64 = b"".join(b64.split()) if isinstance(b64, bytes) else "".join(b64.split())
    approx = len(b64) * 3 // 4
    if approx > limits.max_file_bytes:
        raise RequestError(f"{name}: file of about {approx} bytes exceeds the limit of "
                           f"{limits.max_file_bytes} bytes (max_file_bytes)")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{name}: 'data' is not valid base64 ({exc})") from None
    fmt = _sniff(data, declared, name)
    count = ply_vertex_count(data, f"{name}.ply") if fmt == "ply" else \
        len(data) // SPLAT_RECORD_BYTES
    if count > limits.max_gaussians:
        raise RequestError(f"{name}: {count} gaussians exceeds the limit of "
                           f"{limits.max_gaussians} (max_gaussians)")
    return data, f"{name}.{fmt}", len(data)


def _array(i: int, value, limits: ServingLimits) -> np.ndarray:
    try:  # JSON gives a list of lists; MLflow's schema enforcement may give arrays of arrays
        points = np.stack([np.asarray(r, np.float32) for r in value]) if len(value) else \
            np.zeros((0, NUM_ATTRIBUTES), np.float32)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"row {i}: 'gaussians' is not a numeric [N, {NUM_ATTRIBUTES}] "
                           f"array ({exc})") from None
    if points.ndim != 2 or points.shape[1] != NUM_ATTRIBUTES or not len(points):
        raise RequestError(f"row {i}: 'gaussians' has shape {points.shape}; expected "
                           f"[N, {NUM_ATTRIBUTES}] activated gaussians with N >= 1")
    if len(points) > limits.max_gaussians:
        raise RequestError(f"row {i}: {len(points)} gaussians exceeds the limit of "
                           f"{limits.max_gaussians} (max_gaussians)")
    if not np.isfinite(points).all():
        raise RequestError(f"row {i}: 'gaussians' holds NaN or Inf; expected finite values")
    return points


def parse_rows(frame, package, limits: ServingLimits) -> list[Row | RequestError]:
    """One entry per row: a Row ready for the model, or the RequestError that refused it.
    Request-wide limits (rows, total bytes) raise instead."""
    if len(frame) > limits.max_rows:
        raise RequestTooLarge(f"{len(frame)} rows exceeds the limit of {limits.max_rows} per "
                           "request (max_rows); split the request")
    columns = set(frame.columns)
    if not columns & {"data", "gaussians", "text"}:
        raise RequestError(f"columns {sorted(columns)}: expected 'data' (+ 'format'), "
                           "'gaussians' or 'text'")
    out: list[Row | RequestError] = []
    total = 0
    for i, record in enumerate(frame.to_dict("records")):
        given = [c for c in ("data", "gaussians", "text") if _present(record.get(c))]
        try:
            if len(given) != 1:
                raise RequestError(f"row {i}: expected exactly one of 'data', 'gaussians', "
                                   f"'text'; got {given or 'none'}")
            if given == ["text"]:
                text = record["text"]
                if not isinstance(text, str):  # str() of a list would embed "['a', 'b']"
                    raise RequestError(f"row {i}: 'text' is a {type(text).__name__}; expected "
                                       "one string per row")
                if len(text) > limits.max_text_chars:
                    raise RequestError(f"row {i}: text of {len(text)} characters exceeds the "
                                       f"limit of {limits.max_text_chars}")
                out.append(Row(i, "text", text=text))
            elif given == ["gaussians"]:
                points = _array(i, record["gaussians"], limits)
                out.append(Row(i, "3d", points=package.prepare_activated(points)))
            else:
                data, name, size = _decode_file(i, record["data"], record.get("format"), limits)
                total += size
                if total > limits.max_request_bytes:
                    raise RequestTooLarge(f"files up to row {i} total {total} bytes, over the "
                                       f"limit of {limits.max_request_bytes} per request "
                                       "(max_request_bytes)")
                out.append(Row(i, "3d", points=package.prepare(read_gaussians(data, name),
                                                               data)))
        except RequestTooLarge:
            raise
        except RequestError as exc:
            out.append(exc)
        except GaussianFormatError as exc:
            out.append(RequestError(str(exc)))
    return out
