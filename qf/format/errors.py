"""The project's error types: every failure a user can cause surfaces as one of these."""

from __future__ import annotations

import os


class QFError(Exception):
    """Base of all errors this project raises on bad input or impossible requests."""


class FormatError(QFError):
    """A file is malformed, truncated, hostile or unsupported; names the file, field and offset."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 field: str | None = None, offset: int | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.offset = offset
        where = []
        if self.path is not None:
            where.append(self.path)
        if field is not None:
            where.append(f"field {field!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")


class ChecksumError(FormatError):
    """Tensor data does not match the checksum recorded in the file."""


class ConvertError(QFError):
    """A checkpoint cannot be converted (unsupported architecture, missing keys, bad shards...)."""


class ModelError(QFError):
    """A model file is readable but its hyperparameters or tensors are inconsistent."""


class ContextOverflowError(QFError):
    """The prompt (plus requested tokens) does not fit in the context window."""


class PlanError(QFError):
    """A device placement cannot fit the requested budget."""


class ModelClosedError(ModelError):
    """The model was closed: every call fails and running generations end with this error."""
