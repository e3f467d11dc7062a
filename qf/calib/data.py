"""Calibration input: a plain text file, or JSONL of chat conversations rendered with the model's template;
checked before any work, tokenized, and cut into seeded random windows of L tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qf.format.errors import ConvertError

MIN_CHARS = 64  # a calibration text shorter than this is refused before tokenizing
MAX_BYTES = 1 << 30  # calibration files above 1 GiB are refused
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


@dataclass(frozen=True)
class CalibOptions:
    """--calib FILE, --calib-samples N, --calib-seqlen L, --seed."""

    path: Path
    samples: int = DEFAULT_SAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0


def _chat_record(rec: Any, where: str) -> list[dict[str, Any]]:
    """One JSONL record's messages: {"messages": [...]} or a bare list of {"role", "content"}."""
    msgs = rec.get("messages") if isinstance(rec, dict) else rec
    if (not isinstance(msgs, list) or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs)):
        raise ConvertError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} or a "
                           "list of such messages")
    return msgs


def read_documents(path: str | Path) -> tuple[list[str] | None, list[list[dict[str, Any]]] | None]:
    """(plain-text documents, None) or (None, chat conversations); ConvertError when the file is missing,
    empty, binary, not UTF-8, or too short. A `.jsonl` file (or one whose first line is a JSON object or
    list) is chat JSONL, one conversation per line."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise ConvertError(f"--calib {p}: {size} bytes; at most {MAX_BYTES} are read")
        raw = p.read_bytes()
    except OSError as e:
        raise ConvertError(f"--calib {p}: cannot read: {e.strerror or e}") from None
    if not raw.strip():
        raise ConvertError(f"--calib {p}: the file is empty")
    if b"\x00" in raw:
        raise ConvertError(f"--calib {p}: binary data (NUL bytes): give a plain text or JSONL file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"--calib {p}: not UTF-8 text (byte {e.start}): give a plain text or JSONL file") from None
    bad = sum(1 for c in text if ord(c) < 32 and c not in "\n\r\t\f")
    if bad > len(text) // 100:
        raise ConvertError(f"--calib {p}: {bad} control characters: this looks like binary data, not text")
    first = text.lstrip()[:1]
    if p.suffix.lower() == ".jsonl" or first in "{[":
        convs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"--calib {p}: line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{where}: not JSON ({e.msg})") from None
            convs.append(_chat_record(rec, where))
        return None, convs
    if len(text.strip()) < MIN_CHARS:
        raise ConvertError(f"--calib {p}: only {len(text.strip())} characters of text; give at least {MIN_CHARS} "
                           "(a few hundred tokens per --calib-seqlen window is the useful minimum)")
    return [text], None


def tokenize(docs: list[str] | None, convs: list[list[dict[str, Any]]] | None,
             encode: Callable[[str], list[int]], render: Callable[[list[dict[str, Any]]], str]) -> list[np.ndarray]:
    """Token ids per document (a conversation rendered with the chat template first), int64 each."""
    texts = docs if docs is not None else [render(c) for c in convs or []]
    return [np.asarray(encode(t), np.int64) for t in texts]


def sample_windows(docs: list[np.ndarray], opts: CalibOptions, bos: int | None) -> np.ndarray:
    """opts.samples windows of opts.seqlen tokens, int64 [N, L], from random offsets (seeded) of the documents
    joined end to end; each window starts with BOS when the model has one. ConvertError when the text holds
    fewer tokens than one window."""
    stream = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    if bos is not None:
        stream = stream[stream != bos]  # documents' own BOS tokens: each window gets one in front
    body = opts.seqlen - (bos is not None)
    if stream.size < body:
        raise ConvertError(f"--calib {opts.path}: {stream.size} tokens of text, fewer than one window of "
                           f"--calib-seqlen {opts.seqlen}; give more text or a shorter --calib-seqlen")
    rng = np.random.default_rng(opts.seed)
    starts = rng.integers(0, stream.size - body + 1, size=opts.samples)
    out = np.stack([stream[s:s + body] for s in starts])
    if bos is not None:
        out = np.concatenate([np.full((opts.samples, 1), bos, np.int64), out], axis=1)
    return out


def check_options(opts: CalibOptions) -> None:
    """Sample count and window length in range."""
    if not 1 <= opts.samples <= 1 << 16:
        raise ConvertError(f"--calib-samples {opts.samples}: must be in [1, 65536]")
    if not 2 <= opts.seqlen <= 1 << 17:
        raise ConvertError(f"--calib-seqlen {opts.seqlen}: must be in [2, 131072]")
