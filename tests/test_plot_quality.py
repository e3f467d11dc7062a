"""benchmarks/plot_quality.py: the KLD-vs-bits SVG is well-formed with one point per quantized row, and the
README table lists the rows by KLD with the F16 reference last."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROWS = [
    {"type": "F16", "bpw": 16.0, "kld": 0.0, "kld_err": 0.0, "ppl": 30.84, "same_top": 1.0, "convert_s": 4.8},
    {"type": "F16 unrotated", "bpw": 16.0, "kld": 6.8e-6, "kld_err": 2e-7, "ppl": 30.83, "same_top": 0.997,
     "convert_s": 3.3},
    {"type": "Q4_K_M", "bpw": 5.1, "kld": 0.2, "kld_err": 0.01, "ppl": 38.0, "same_top": 0.75, "convert_s": 30.0},
    {"type": "IQ4_XS", "bpw": 4.67, "kld": 0.237, "kld_err": 0.01, "ppl": 39.9, "same_top": 0.731, "convert_s": 35.2},
    {"type": "Q8_0", "bpw": 8.5, "kld": 0.002, "kld_err": 1e-4, "ppl": 30.9, "same_top": 0.98, "convert_s": 5.0},
    {"type": "IQ1_S", "bpw": 2.66, "kld": 8.61, "kld_err": 0.11, "ppl": 1.9e5, "same_top": 0.026, "convert_s": 55.7},
]


@pytest.fixture(scope="module")
def plot_quality():
    sys.path.insert(0, str(BENCH))
    try:
        import plot_quality
        yield plot_quality
    finally:
        sys.path.remove(str(BENCH))


def test_svg_has_one_point_per_quantized_row(plot_quality, tmp_path):
    root = ET.parse(plot_quality.write_svg(ROWS, tmp_path / "p.svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert all(t in texts for t in ("Q4_K_M", "IQ4_XS", "Q8_0", "IQ1_S")) and "F16" not in texts
    markers = len(list(root.iter(f"{ns}circle"))) + len(list(root.iter(f"{ns}path"))) \
        + len(list(root.iter(f"{ns}rect"))) - 2  # the background and the frame are rects
    assert markers == 4 + len(plot_quality.FAMILIES)  # the points and the legend's markers


def test_markdown_orders_by_kld(plot_quality):
    lines = plot_quality.markdown(ROWS).splitlines()
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["Q8_0", "Q4_K_M", "IQ4_XS", "IQ1_S", "F16 (reference)"]


def test_cli_writes_beside_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"rows": ROWS}))
    r = subprocess.run([sys.executable, str(BENCH / "plot_quality.py"), str(tmp_path / "results.json"), "--markdown"],
                       capture_output=True, text=True, check=True)
    assert "| IQ4_XS | 4.67 |" in r.stdout and (tmp_path / "kld_vs_bpw.svg").is_file()


def test_no_rows_is_an_error(plot_quality):
    with pytest.raises(ValueError, match="no quantized rows"):
        plot_quality.svg_text(ROWS[:2], "t")


def test_markdown_names_importance_sources_when_they_differ(plot_quality):
    rows = [dict(r, imatrix="/x/imatrix.gguf") for r in ROWS]
    assert "importance" not in plot_quality.markdown(rows)
    rows[-1]["imatrix"] = "/y/lc-imatrix.gguf"
    lines = plot_quality.markdown(rows).splitlines()
    assert lines[0].endswith("importance |") and lines[-2].endswith("lc-imatrix.gguf |")
