"""Hostile input, round two (#16): metadata that is tiny on disk but huge in memory, non-regular files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from gguf_builder import RawGGUF, arr, f32_tensor_file, gstr, kv, tinfo
from qf.format.errors import FormatError, QFError
from qf.format.reader import MetadataLimits, open_gguf
from qf.format.values import (
    ENV_MAX_METADATA_MIB, ENV_MAX_METADATA_VALUES, MAX_METADATA_BYTES, MAX_METADATA_VALUES, GGUFValueType as V,
)

EMPTY_U8_ARRAY = arr(V.UINT8, 0, b"")  # 12 bytes on disk, ~120 bytes as a numpy array in a list


def nested_empty(n: int) -> bytes:
    """An ARRAY of n empty UINT8 arrays (value only): 12 bytes on disk per inner array."""
    return arr(V.ARRAY, n, EMPTY_U8_ARRAY * n)


def write(tmp_path: Path, raw: RawGGUF, name: str = "m.gguf") -> Path:
    """raw written to tmp_path/name."""
    p = tmp_path / name
    p.write_bytes(raw.build())
    return p


def measure(fn) -> tuple[BaseException | None, float, int]:
    """(exception raised or None, seconds, tracemalloc peak bytes) of fn()."""
    tracemalloc.start()
    t = time.perf_counter()
    err = None
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 (returned to the test)
        err = e
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return err, dt, peak


# ---------------------------------------------------------------------------------------------
# Metadata budget


def test_millions_of_empty_nested_arrays_are_refused_before_allocating(tmp_path: Path) -> None:
    n = MAX_METADATA_VALUES + 1  # 48 MB on disk; ~500 MB as Python objects before the budget
    p = write(tmp_path, RawGGUF(kvs=[kv("evil.nested", V.ARRAY, nested_empty(n))]))
    err, dt, peak = measure(lambda: open_gguf(p))
    assert isinstance(err, FormatError), err
    assert err.field == "evil.nested" and "metadata budget exceeded" in str(err)
    assert ENV_MAX_METADATA_VALUES in str(err) or ENV_MAX_METADATA_MIB in str(err)  # how to raise it
    assert peak < 4 << 20 and dt < 5, (peak, dt)


def test_empty_nested_arrays_under_the_budget_share_one_empty_array(tmp_path: Path) -> None:
    p = write(tmp_path, RawGGUF(kvs=[kv("many.empty", V.ARRAY, nested_empty(200_000))]))
    err, dt, peak = measure(lambda: open_gguf(p).close())
    assert err is None and peak < 8 << 20 and dt < 10, (err, peak, dt)  # a list of 200k slots
    with open_gguf(p) as f:
        inner = f.meta.get_array("many.empty")
        assert len(inner) == 200_000 and inner[0].size == 0 and not inner[0].flags.writeable


def test_millions_of_empty_strings_are_refused_before_allocating(tmp_path: Path) -> None:
    n = MAX_METADATA_VALUES + 1
    p = write(tmp_path, RawGGUF(kvs=[kv("evil.strings", V.ARRAY, arr(V.STRING, n, bytes(8) * n))]))
    err, dt, peak = measure(lambda: open_gguf(p))
    assert isinstance(err, FormatError) and err.field == "evil.strings", err
    assert f"{MAX_METADATA_VALUES:,} values" in str(err)
    assert peak < 4 << 20 and dt < 5, (peak, dt)


def test_many_keys_of_nested_arrays_stop_at_the_budget(tmp_path: Path) -> None:
    """Split over many keys, the amplification is paid up to the budget and no further."""
    budget = 8 << 20
    one = arr(V.UINT8, 1, b"\x07")  # 13 bytes on disk, ~120 bytes as a numpy array in a list
    kvs = [kv(f"evil.{i}", V.ARRAY, arr(V.ARRAY, 20_000, one * 20_000)) for i in range(40)]  # 10 MB -> ~100 MB
    p = write(tmp_path, RawGGUF(kvs=kvs))
    err, dt, peak = measure(lambda: open_gguf(p, limits=MetadataLimits(max_bytes=budget)))
    assert isinstance(err, FormatError) and err.field.startswith("evil.") and "8 MiB" in str(err), err
    assert peak < 2 * budget and dt < 15, (peak, dt)


def test_long_strings_count_their_bytes(tmp_path: Path) -> None:
    kvs = [kv("big.array", V.ARRAY, arr(V.STRING, 3, gstr("x" * 600_000) * 3)),
           kv("big.str", V.STRING, gstr("y" * 200_000))]
    p = write(tmp_path, RawGGUF(kvs=kvs))
    with pytest.raises(FormatError, match="budget") as e:
        open_gguf(p, limits=MetadataLimits(max_bytes=1 << 20))
    assert e.value.field == "big.array[1]"
    with open_gguf(p, limits=MetadataLimits(max_bytes=2 << 20)) as f:
        assert len(f.meta.get_array("big.array")[2]) == 600_000
    with pytest.raises(FormatError, match="budget") as e:
        open_gguf(p, limits=MetadataLimits(max_bytes=2_000_000))
    assert e.value.field == "big.str"


def test_key_and_tensor_counts_are_charged_up_front(tmp_path: Path) -> None:
    raw = f32_tensor_file()
    p = write(tmp_path, raw)
    with pytest.raises(FormatError, match="past 1 values") as e:
        open_gguf(p, limits=MetadataLimits(max_values=1))
    assert e.value.field == "n_tensors"
    many = RawGGUF(kvs=[kv(f"k{i}", V.UINT8, b"\x00") for i in range(5000)])
    p = write(tmp_path, many, "keys.gguf")
    with pytest.raises(FormatError, match="budget") as e:
        open_gguf(p, limits=MetadataLimits(max_bytes=500_000))
    assert e.value.field == "n_kv" and e.value.offset == 16
    names = RawGGUF(infos=[tinfo(f"t{i}", (0,), 0, 0) for i in range(5000)])
    with pytest.raises(FormatError, match="budget") as e:
        open_gguf(write(tmp_path, names, "tensors.gguf"), limits=MetadataLimits(max_bytes=1_000_000))
    assert e.value.field == "n_tensors"


def test_the_budget_is_raised_by_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kvs = [kv(f"big.{i}", V.ARRAY, nested_empty(1000)) for i in range(3)]
    p = write(tmp_path, RawGGUF(kvs=kvs))
    monkeypatch.setenv(ENV_MAX_METADATA_VALUES, "2000")
    with pytest.raises(FormatError, match="2,000 values"):
        open_gguf(p)
    monkeypatch.setenv(ENV_MAX_METADATA_VALUES, "4000")
    monkeypatch.setenv(ENV_MAX_METADATA_MIB, "1")
    with open_gguf(p) as f:
        assert len(f.meta.get_array("big.2")) == 1000
    assert MetadataLimits.from_env() == MetadataLimits(4000, 1 << 20)
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(ENV_MAX_METADATA_MIB, bad)
        with pytest.raises(QFError, match=ENV_MAX_METADATA_MIB):
            open_gguf(p)
    monkeypatch.delenv(ENV_MAX_METADATA_MIB)
    monkeypatch.delenv(ENV_MAX_METADATA_VALUES)
    assert MetadataLimits.from_env() == MetadataLimits(MAX_METADATA_VALUES, MAX_METADATA_BYTES)


def test_ordinary_metadata_fits_far_below_the_budget(tmp_path: Path) -> None:
    """A 262k-token vocabulary with scores and types (Gemma 3's size) takes a small part of the default."""
    from qf.format.reader import _Cursor, _read_kvs  # the charge is what the budget sees

    n = 262_144
    toks = b"".join(gstr(f"tok{i}") for i in range(n))
    kvs = [kv("tokenizer.ggml.tokens", V.ARRAY, arr(V.STRING, n, toks)),
           kv("tokenizer.ggml.scores", V.ARRAY, arr(V.FLOAT32, n, bytes(4 * n))),
           kv("tokenizer.ggml.token_type", V.ARRAY, arr(V.INT32, n, bytes(4 * n)))]
    body = b"".join(kvs)
    cur = _Cursor(body, len(body), "mem")
    _read_kvs(cur, 3)
    assert cur.values < MAX_METADATA_VALUES // 10 and cur.mem < MAX_METADATA_BYTES // 8, (cur.values, cur.mem)


# ---------------------------------------------------------------------------------------------
# Non-regular files


def test_directory_and_char_device_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="a directory, not a regular file") as e:
        open_gguf(tmp_path)
    assert e.value.path == str(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(FormatError, match="a character device, not a regular file"):
            open_gguf("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """open() on a FIFO waits for a writer: run it in a child so a regression fails instead of hanging."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        from qf.format.errors import FormatError
        from qf.format.reader import open_gguf
        try:
            open_gguf({str(fifo)!r})
        except FormatError as e:
            print("REFUSED", e)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("open_gguf blocked on a FIFO")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("REFUSED") and "FIFO" in r.stdout and str(fifo) in r.stdout, r.stdout


def test_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    p = write(tmp_path, f32_tensor_file())
    link = tmp_path / "link.gguf"
    link.symlink_to(p)
    with open_gguf(link) as f:
        assert list(f.tensors) == ["t"]
