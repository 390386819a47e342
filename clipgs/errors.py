"""The project's own error types: every bad input surfaces as one of these, with a message a
user can act on (which file, which field, what was expected)."""

from __future__ import annotations


class ClipgsError(Exception):
    """Base class of every error clipgs raises on purpose."""


class GaussianFormatError(ClipgsError):
    """A 3DGS file that cannot be read: names the file, the field and what was expected."""

    def __init__(self, path: str, problem: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}: field '{field}': " if field else f"{self.path}: "
        super().__init__(where + problem)


class ConfigError(ClipgsError):
    """A configuration value that is missing, mistyped or inconsistent."""


class TeacherMismatchError(ClipgsError):
    """Shards or a model made with a different teacher than the one in use."""


class StorageError(ClipgsError):
    """A local or s3:// location that cannot be read or written."""
