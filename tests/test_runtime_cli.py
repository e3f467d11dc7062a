"""qrun and qbench command lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_runtime_forward import build_tiny_gguf

from qf.tools import qbench, qrun


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf")


def _run(cmd, args: list[str], stdin: str | None = None):
    res = CliRunner().invoke(cmd.main, args, input=stdin, catch_exceptions=False)
    return res


def test_qrun_completion_streams_and_reports(tiny: Path) -> None:
    res = _run(qrun, [str(tiny), "-p", "hello", "-n", "8", "--temp", "0"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("hello")  # the prompt is echoed, then the continuation
    assert "[generation ended: length]" in res.stderr
    for what in ("load time", "prompt eval", "generation"):
        assert what in res.stderr
    assert re.search(r"generation\s+=.*/\s+8 tokens \(\s*[\d.]+ tokens per second\)", res.stderr), res.stderr


def test_qrun_greedy_is_deterministic_and_seed_matters(tiny: Path) -> None:
    a = _run(qrun, [str(tiny), "-p", "hi", "-n", "6", "--temp", "0", "--no-display-prompt"]).stdout
    b = _run(qrun, [str(tiny), "-p", "hi", "-n", "6", "--temp", "0", "--no-display-prompt"]).stdout
    assert a == b and not a.startswith("hi")
    sampled = {_run(qrun, [str(tiny), "-p", "hi", "-n", "6", "--temp", "1.5", "--top-k", "0", "--seed", str(s)]).stdout
               for s in range(4)}
    assert len(sampled) > 1


def test_qrun_interactive_chat_reads_lines_until_eof(tiny: Path) -> None:
    res = _run(qrun, [str(tiny), "-n", "4", "--temp", "0", "-sys", "be brief"], stdin="hello\n\nsecond turn\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("\n") == 2  # two replies, one per non-empty line
    m = re.search(r"prompt eval\s+=.*/\s+(\d+) tokens.*, (\d+) reused", res.stderr)
    assert m and int(m.group(2)) > 0  # the second turn reuses the first turn's cache


def test_qrun_reports_errors(tiny: Path, tmp_path: Path) -> None:
    res = _run(qrun, [str(tiny), "-p", "x" * 200, "-c", "16"])
    assert res.exit_code == 1 and "qrun: error:" in res.stderr and "context" in res.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    res = _run(qrun, [str(bad), "-p", "x"])
    assert res.exit_code == 1 and "qrun: error:" in res.stderr


@pytest.mark.slow
def test_qrun_chat_says_paris(smollm2_gguf: Path) -> None:
    res = _run(qrun, [str(smollm2_gguf), "-p", "What is the capital of France?", "--chat", "--temp", "0",
                      "-n", "48", "-c", "256"])
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


def test_qbench_table(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = _run(qbench, [str(tiny), "-p", "16", "-n", "4", "-r", "2", "-t", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0]
    assert re.search(r"\| pp16 +\| +[\d.]+ ± [\d.]+ *\|", res.stdout)
    assert re.search(r"\| tg4 +\| +[\d.]+ ± [\d.]+ *\|", res.stdout)
    import json

    data = json.loads(out.read_text())
    assert [r["test"] for r in data["results"]] == ["pp16", "tg4"]
    assert all(len(r["seconds"]) == 2 and r["median_tps"] > 0 for r in data["results"])


def test_prompt_files_are_bounded_and_regular(tmp_path: Path) -> None:
    """-f reads a regular UTF-8 file of bounded size; a FIFO, a device or a huge file is a clean error."""
    import os

    from qf.format.errors import QFError
    from qf.tools.qrun import read_prompt_file

    ok = tmp_path / "p.txt"
    ok.write_text("héllo")
    assert read_prompt_file(ok) == "héllo"
    with pytest.raises(QFError, match="larger than"):
        read_prompt_file(ok, limit=3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(QFError, match="not a regular file"):
            read_prompt_file(bad)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(QFError, match="not UTF-8"):
        read_prompt_file(latin)
