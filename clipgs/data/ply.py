"""PLY, read fast and checked: the header is parsed here, a binary body becomes one numpy array
without a per-row loop (``np.fromfile`` for local files, ``np.frombuffer`` for bytes), and every
way a file can lie - counts, sizes, types - is one :class:`GaussianFormatError` naming the file
and field.

What a .ply holds decides what it is (:func:`kind`): INRIA 3DGS gaussians, a PlayCanvas
compressed splat (``chunk`` element), a mesh (a ``face`` element with faces) or a plain point
cloud (vertices with positions and maybe colours).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from clipgs.errors import GaussianFormatError

# A memory guard: files claiming more than this are refused before any allocation.
MAX_GAUSSIANS = int(os.environ.get("CLIPGS_MAX_GAUSSIANS", 20_000_000))
MAX_HEADER_BYTES = 64 * 1024

TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
GAUSSIAN_MARKERS = ("f_dc_0", "opacity", "scale_0", "rot_0")


@dataclass
class Element:
    name: str
    count: int
    properties: list[tuple[str, str]]  # (name, numpy type code); list properties have "list"

    @property
    def has_lists(self) -> bool:
        return any(t == "list" for _, t in self.properties)

    def names(self) -> list[str]:
        return [n for n, _ in self.properties]


@dataclass
class Header:
    format: str  # a key of FORMATS
    elements: list[Element]
    length: int  # bytes up to and including end_header's newline

    def element(self, name: str) -> Element | None:
        return next((e for e in self.elements if e.name == name), None)


def parse_header(head: bytes, path: str) -> Header:
    """The header of a PLY file from its first bytes (at least up to ``end_header``)."""
    if not head.startswith(b"ply"):
        raise GaussianFormatError(path, "not a .ply: the file does not start with 'ply'")
    # the line that is end_header, not those words inside a comment line
    found = re.search(rb"(?m)^end_header[ \t\r]*$", head[:MAX_HEADER_BYTES])
    end = found.start() if found else -1
    if end < 0:
        raise GaussianFormatError(path, f"no 'end_header' in the first {MAX_HEADER_BYTES} bytes;"
                                  " expected a PLY header (truncated or not a .ply)")
    newline = head.find(b"\n", end)
    if newline < 0:
        raise GaussianFormatError(path, "truncated right after 'end_header'; expected a body")
    try:
        lines = head[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise GaussianFormatError(path, "the header has non-ASCII bytes; expected a PLY "
                                  "header") from None
    fmt, elements = None, []
    for number, raw in enumerate(lines[1:], start=2):
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        where = f"header line {number} '{raw.strip()[:60]}'"
        if words[0] == "format":
            if len(words) < 2 or words[1] not in FORMATS:
                raise GaussianFormatError(path, f"{where}: expected one of {list(FORMATS)}",
                                          field="format")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise GaussianFormatError(path, f"{where}: expected 'element NAME COUNT'")
            elements.append(Element(words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise GaussianFormatError(path, f"{where}: a property before any element")
            if len(words) == 5 and words[1] == "list":
                elements[-1].properties.append((words[4], "list"))
            elif len(words) == 3 and words[1] in TYPES:
                elements[-1].properties.append((words[2], TYPES[words[1]]))
            else:
                raise GaussianFormatError(path, f"{where}: expected 'property TYPE NAME' with "
                                          f"TYPE one of {sorted(set(TYPES))}",
                                          field=words[-1] if len(words) > 2 else None)
        else:
            raise GaussianFormatError(path, f"{where}: unknown header keyword '{words[0]}'")
    if fmt is None:
        raise GaussianFormatError(path, "no 'format' line in the header", field="format")
    return Header(fmt, elements, newline + 1)


def kind(header: Header) -> str:
    """'gaussians', 'compressed', 'mesh' or 'points'."""
    if header.element("chunk") is not None:
        return "compressed"
    face = header.element("face")
    if face is not None and face.count > 0:
        return "mesh"
    vertex = header.element("vertex")
    if vertex is not None and any(m in vertex.names() for m in GAUSSIAN_MARKERS):
        return "gaussians"
    return "points"


def _guard(path: str, element: Element, what: str = "gaussians") -> None:
    if element.count > MAX_GAUSSIANS:
        raise GaussianFormatError(
            path, f"header declares {element.count:,} {what}, over the limit of "
            f"{MAX_GAUSSIANS:,} (CLIPGS_MAX_GAUSSIANS); refused before reading",
            field=element.name)


def read_vertices(source: bytes | memoryview | str, header: Header, path: str
                  ) -> dict[str, np.ndarray] | np.ndarray:
    """The ``vertex`` element's body. Returns a float32 matrix [N, P] (columns in property
    order) when every property is float32 - the common 3DGS case, no copy beyond the read - or
    else a dict of columns. ``source`` is the file's bytes or a local path."""
    vertex = header.element("vertex")
    if vertex is None:
        raise GaussianFormatError(path, "no 'vertex' element; expected the gaussians or points "
                                  "as vertices", field="vertex")
    _guard(path, vertex)
    if vertex.has_lists:
        raise GaussianFormatError(path, "list properties in 'vertex'; expected scalar "
                                  "properties only", field="vertex")
    if header.format == "ascii":
        return _read_ascii(source, header, vertex, path)
    if header.elements[0] is not vertex:
        raise GaussianFormatError(path, f"binary body with '{header.elements[0].name}' before "
                                  "'vertex'; expected 'vertex' first", field="vertex")
    if not vertex.properties:
        raise GaussianFormatError(path, "the 'vertex' element has no properties; expected "
                                  "x, y, z and the rest", field="vertex")
    order = FORMATS[header.format]
    types = {t for _, t in vertex.properties}
    uniform = types == {"f4"}
    dtype = np.dtype(order + "f4") if uniform else np.dtype(
        [(n, order + t) for n, t in vertex.properties])
    width = len(vertex.properties) if uniform else 1
    need = vertex.count * dtype.itemsize * width
    total = _size(source)
    body = total - header.length
    only = len(header.elements) == 1
    if body < need or (only and body - need >= dtype.itemsize * width):
        stride = dtype.itemsize * width
        held = body / stride
        raise GaussianFormatError(
            path, f"header declares {vertex.count:,} vertices ({need:,} bytes of body) but the "
            f"body has {body:,} bytes (room for {held:,.2f}); the file is truncated or its header"
            " lies about the count", field="vertex")
    array = _read_array(source, header.length, dtype, vertex.count * width)
    if uniform:
        array = array.reshape(vertex.count, width)
        return array if array.dtype.isnative else array.astype(np.float32)
    return {n: array[n] for n in array.dtype.names}


def _size(source: bytes | memoryview | str) -> int:
    if isinstance(source, str):
        return os.path.getsize(source)
    return len(source)


def _read_array(source, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    if isinstance(source, str):
        with open(source, "rb") as f:
            f.seek(offset)
            return np.fromfile(f, dtype=dtype, count=count)
    return np.frombuffer(source, dtype=dtype, count=count, offset=offset)


def _read_ascii(source, header: Header, vertex: Element, path: str) -> dict[str, np.ndarray]:
    if header.elements[0] is not vertex:
        raise GaussianFormatError(path, f"ASCII body with '{header.elements[0].name}' before "
                                  "'vertex'; expected 'vertex' first", field="vertex")
    data = _whole(source)
    width = len(vertex.properties)
    lines = data[header.length:].split(b"\n", vertex.count)
    if len(lines) < vertex.count or (len(lines) == vertex.count and not lines[-1].strip()):
        raise GaussianFormatError(path, f"header declares {vertex.count:,} vertices but the "
                                  f"body has fewer lines; the file is truncated or its header "
                                  "lies about the count", field="vertex")
    rest = lines[vertex.count].strip() if len(lines) > vertex.count else b""
    if rest and len(header.elements) == 1:
        raise GaussianFormatError(path, f"header declares {vertex.count:,} vertices but the "
                                  "body has more lines; its header lies about the count",
                                  field="vertex")
    try:
        values = np.array(b" ".join(lines[:vertex.count]).split(), dtype=np.float64)
    except ValueError:
        raise GaussianFormatError(path, "a vertex line holds something that is not a number; "
                                  "expected numbers only", field="vertex") from None
    if values.size != vertex.count * width:
        raise GaussianFormatError(path, f"{values.size:,} numbers in {vertex.count:,} vertex "
                                  f"lines; expected {width} per line", field="vertex")
    table = values.reshape(vertex.count, width)
    return {n: table[:, i].astype(t) for i, (n, t) in enumerate(vertex.properties)}


def _whole(source) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read()
    return bytes(source)


def read_head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_HEADER_BYTES)


def check_fields(header: Header, names: list[str], path: str, floats: bool = True) -> None:
    """Each of ``names`` is a vertex property and, when ``floats``, a float one."""
    props = dict(header.element("vertex").properties)
    for n in names:
        if n not in props:
            raise GaussianFormatError(path, f"missing; expected an INRIA 3DGS .ply with "
                                      f"{', '.join(names)}", field=n)
        if floats and props[n] not in ("f4", "f8"):
            raise GaussianFormatError(path, f"has type {props[n]}; expected a float property",
                                      field=n)


def columns(vertices: dict[str, np.ndarray] | np.ndarray, header: Header, names: list[str],
            path: str, floats: bool = True, checked: bool = False) -> np.ndarray:
    """Columns ``names`` of the vertex body as float32 [N, len(names)]: a view of the matrix
    when they are adjacent (the INRIA layout), else one copy. Each must exist and, when
    ``floats``, be a float property (``checked``: the caller has made sure)."""
    if not checked:
        check_fields(header, names, path, floats)
    if isinstance(vertices, np.ndarray):
        order = header.element("vertex").names()
        idx = [order.index(n) for n in names]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return vertices[:, idx[0]:idx[0] + len(idx)]
        return vertices[:, idx]
    return np.stack([np.asarray(vertices[n], np.float32) for n in names], axis=1)


def write_header(out: BinaryIO, count: int, fields: list[str], extra: list[str] = ()) -> None:
    lines = ["ply", "format binary_little_endian 1.0", *extra, f"element vertex {count}"]
    lines += [f"property float {f}" for f in fields] + ["end_header"]
    out.write(("\n".join(lines) + "\n").encode("ascii"))
