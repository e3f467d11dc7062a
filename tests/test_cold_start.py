"""Cold start: the integer prefill kernels compile in background processes that the kernels then wait for."""

from __future__ import annotations

from pathlib import Path

import pytest

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu


def test_background_precompile_runs_once_and_is_awaited(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu, "_STARTED", set())
    monkeypatch.setattr(cpu, "_precompiled_marker", lambda t, parts: tmp_path / f"{t.name}.done")
    procs = cpu.precompile_background(["Q4_0", GGMLType.F32, "Q4_0"], processes=4)
    assert len(procs) == 1  # one uncached integer type: one process; F32 has no integer kernel
    assert cpu.precompile_background(["Q4_0"]) == []  # already under way in this process
    cpu.wait_precompiled()
    assert procs[0].returncode == 0 and not cpu._BACKGROUND


def test_background_precompile_splits_types_over_processes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu, "_STARTED", set())
    (tmp_path / "Q8_0.done").touch()  # cached already
    monkeypatch.setattr(cpu, "_precompiled_marker", lambda t, parts: tmp_path / f"{t.name}.done")
    procs = cpu.precompile_background(["Q4_0", "Q6_K", "Q8_0"], processes=2)
    assert len(procs) == 2 and cpu._STARTED == {GGMLType.Q4_0, GGMLType.Q6_K}
    cpu.wait_precompiled()
    assert all(p.returncode == 0 for p in procs)
