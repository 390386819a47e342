"""An object's up axis, in its own coordinates: rendered views ring it and their image up is
along it. No torch here: sources and configs read it."""

from __future__ import annotations

import posixpath

# ``auto`` takes the convention of the file's format where one exists: glTF is
# +y up by its specification, Niantic's .spz by its (RUB: right, up, back; our reader does not
# convert it) and OBJ by custom (ShapeNet; Blender's and 3ds Max's exporters), antimatter15's
# .splat -y up (its viewer's camera; the shared .splat objects are); everything else (.ply,
# .stl, .off, .xyz, ModelNet grids) +z.
UP_AXES = ("+x", "-x", "+y", "-y", "+z", "-z")
FORMAT_UP = {".gltf": "+y", ".glb": "+y", ".spz": "+y", ".obj": "+y", ".splat": "-y"}


def parse_up(value: object) -> str | None:
    """``+y``, ``-Y``, ``y`` (= +y) -> the canonical axis; None if it is not one of the six."""
    text = str(value).strip().lower()
    text = text if text[:1] in "+-" else "+" + text
    return text if text in UP_AXES else None


def format_up(path: str) -> str:
    """The up axis ``auto`` gives a file: its format's convention (``FORMAT_UP``) or +z."""
    return FORMAT_UP.get(posixpath.splitext(path)[1].lower(), "+z")
