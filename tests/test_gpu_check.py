"""The prepared GPU visit (benchmarks/gpu_check.py) runs end to end on the CPU: --dry-run, tiny shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=os.environ | {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    for title in ("Environment", "CUDA tests", "Placements against the CPU path",
                  "Kernels: fused 4-bit matmul against bf16", "Decode and the planner"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"## {title}"))
        assert line.endswith("ok)"), line
    assert "| 0 | 0 |" in text  # no layer on the GPU: identical to the CPU path
