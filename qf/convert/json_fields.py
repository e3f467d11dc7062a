"""Checkpoint JSON files (config.json, tokenizer.json, ...): read them, and typed access to their fields.

Every failure is a ConvertError naming the file, the field (dotted path inside the file) and the expected type
or range: malformed JSON of any kind (Python's json raises ValueError for integers over 4300 digits and
RecursionError for deep nesting, besides JSONDecodeError), a string where a number belongs, a bool where an
integer belongs, a float layer count, a list where an object belongs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qf.format.errors import ConvertError

REQUIRED = object()  # default: the field must be present (and not null)
MAX_JSON_BYTES = 1 << 28  # real tokenizer.json files stay under 40 MiB; json.loads needs ~10x the text
MAX_REPR = 60  # characters of a bad value quoted in a message


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, or ConvertError naming the file (refused unread beyond MAX_JSON_BYTES)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ConvertError(f"{path}: {what} of {path.stat().st_size} bytes exceeds the limit of {MAX_JSON_BYTES}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvertError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read {what}: {e}") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is the 4300-digit limit
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConvertError(f"{path}: {what} is not valid JSON: {reason}") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: {what} is not a JSON object")
    return obj


def short(value: Any) -> str:
    """repr of a value, cut to MAX_REPR characters (containers by their size only)."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'} of {len(value)} items"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_REPR else text[:MAX_REPR - 3] + "..."


def is_int(value: Any) -> bool:
    """A JSON integer (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number (bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    """' in [lo, hi]', ' > lo', ... for a message."""
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f" <= {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}]"


class Fields:
    """Typed access to one JSON object of a file; `prefix` is the object's dotted path inside the file."""

    def __init__(self, obj: Any, path: Path, prefix: str = "") -> None:
        self.path, self.prefix = Path(path), prefix
        if not isinstance(obj, dict):
            where = repr(prefix.rstrip(".")) if prefix else "(top level)"
            raise ConvertError(f"{self.path}: {self.path.name} {where} must be a JSON object, got {short(obj)}")
        self.obj: dict[str, Any] = obj

    def error(self, key: str, value: Any, want: str) -> ConvertError:
        """ConvertError naming the file, the field and what it must be."""
        return ConvertError(f"{self.path}: {self.path.name} {self.prefix + key!r} must be {want}, got {short(value)}")

    def has(self, key: str) -> bool:
        """The field is present and not null."""
        return self.obj.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as parsed (default when absent or null)."""
        v = self.obj.get(key)
        return default if v is None else v

    def _value(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value): absent or null is the default, or an error when the field is required."""
        v = self.obj.get(key)
        if v is None:
            if default is REQUIRED:
                raise ConvertError(f"{self.path}: {self.path.name} {self.prefix + key!r} is missing")
            return False, default
        return True, v

    def int(self, key: str, default: Any = REQUIRED, lo: int | None = None, hi: int | None = None) -> Any:
        """An integer within [lo, hi] (either bound optional)."""
        present, v = self._value(key, default)
        if present and (not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi)):
            want = "a positive integer" if (lo, hi) == (1, None) else f"an integer{_range_text(lo, hi, False)}"
            raise self.error(key, v, want)
        return v

    def number(self, key: str, default: Any = REQUIRED, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, finite: bool = True) -> Any:
        """A number (int or float) as float; finite unless finite=False; within the bounds (lo open if asked)."""
        present, v = self._value(key, default)
        if not present:
            return v
        ok = is_number(v) and (not finite or math.isfinite(v))
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v <= hi
        if not ok:
            raise self.error(key, v, f"a {'finite ' if finite else ''}number{_range_text(lo, hi, lo_open)}")
        return float(v)

    def str(self, key: str, default: Any = REQUIRED) -> Any:
        """A string."""
        present, v = self._value(key, default)
        if present and not isinstance(v, str):
            raise self.error(key, v, "a string")
        return v

    def bool(self, key: str, default: Any = REQUIRED) -> Any:
        """true or false."""
        present, v = self._value(key, default)
        if present and not isinstance(v, bool):
            raise self.error(key, v, "true or false")
        return v

    def list(self, key: str, default: Any = REQUIRED) -> Any:
        """A JSON array."""
        present, v = self._value(key, default)
        if present and not isinstance(v, list):
            raise self.error(key, v, "a JSON array")
        return v

    def obj_fields(self, key: str) -> "Fields":
        """A nested JSON object (an empty one when absent or null)."""
        present, v = self._value(key, {})
        if present and not isinstance(v, dict):
            raise self.error(key, v, "a JSON object")
        return Fields(v, self.path, f"{self.prefix}{key}.")

    def int_values(self, lo: int | None = 0, hi: int | None = None) -> dict[str, int]:
        """This object as a map of strings to integers in [lo, hi]."""
        return {k: self.int(k, lo=lo, hi=hi) for k in self.obj}

    def int_map(self, key: str, lo: int | None = 0, hi: int | None = None) -> dict[str, int]:
        """A nested JSON object mapping strings to integers in [lo, hi] (empty when absent)."""
        return self.obj_fields(key).int_values(lo, hi)
