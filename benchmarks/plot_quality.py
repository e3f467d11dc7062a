"""KLD-vs-bits/weight plot (SVG, no plotting library) and the README's short table from bench_quality's results.json.

    python benchmarks/plot_quality.py bench-out/results.json [-o kld_vs_bpw.svg] [--markdown]

Each quantized row is one point (mean KLD vs F16 on a log axis, its error bar, its name), coloured by family:
the IQ types, the K mixes (Q2_K_S among them) and the legacy 32-block types. The F16 rows are left out (the
reference, and the unrotated original whose KLD only shows what the rotation changes). --markdown prints the
table (mix, bits/weight, KLD, top-1, PPL, seconds to quantize), smallest KLD first.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from xml.sax.saxutils import escape

SKIP = ("F16", "F16 unrotated", "F32", "BF16")
FAMILIES = {"IQ": ("#d95f02", "square"), "K": ("#1b9e77", "circle"), "legacy": ("#7570b3", "diamond")}
W, H, LEFT, RIGHT, TOP, BOTTOM = 820, 520, 70, 30, 40, 50  # canvas and margins, px
FONT = 11  # label font size, px; a label is taken to be FONT * 0.6 px per character wide


def family(name: str) -> str:
    """'IQ', 'K' or 'legacy' for a --type name (suffixes such as '+imatrix' ignored)."""
    base = name.split("+")[0]
    return "IQ" if base.startswith("IQ") else "K" if "_K" in base else "legacy"


def points(rows: list[dict]) -> list[dict]:
    """The quantized rows with a positive KLD, by bits/weight."""
    return sorted((r for r in rows if r["type"] not in SKIP and r.get("kld", 0) > 0), key=lambda r: r["bpw"])


def _scale(lo: float, hi: float, a: float, b: float, log: bool = False):
    """Affine (or log10) map of [lo, hi] onto pixel range [a, b]."""
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    span = (f(hi) - f(lo)) or 1.0
    return lambda v: a + (f(v) - f(lo)) / span * (b - a)


def _marker(shape: str, x: float, y: float, color: str) -> str:
    """One point marker."""
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'
    if shape == "square":
        return f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{color}"/>'
    return f'<path d="M{x:.1f},{y - 5:.1f} l5,5 l-5,5 l-5,-5 z" fill="{color}"/>'


def _place_labels(marks: list[tuple[float, float, str]]) -> list[tuple[float, float]]:
    """Label anchors right of each (x, y, text) point, moved down until no two label boxes overlap."""
    boxes, out = [], []
    for x, y, text in marks:
        lx, ly, w = x + 7, y + 4, len(text) * FONT * 0.6
        while any(lx < bx + bw and bx < lx + w and abs(ly - by) < FONT for bx, by, bw in boxes):
            ly += 3
        boxes.append((lx, ly, w))
        out.append((lx, ly))
    return out


def _axes(xs, ys, x_lo, x_hi, y_lo, y_hi) -> list[str]:
    """Frame, grid lines and tick labels (integer bits; decades and 2x/5x of KLD)."""
    svg = [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" '
           f'stroke="#444"/>']
    for b in range(math.ceil(x_lo), math.floor(x_hi) + 1):
        svg += [f'<line x1="{xs(b):.1f}" y1="{TOP}" x2="{xs(b):.1f}" y2="{H - BOTTOM}" stroke="#ddd"/>',
                f'<text x="{xs(b):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{b}</text>']
    for e in range(math.floor(math.log10(y_lo)), math.ceil(math.log10(y_hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if y_lo <= v <= y_hi:
                svg.append(f'<line x1="{LEFT}" y1="{ys(v):.1f}" x2="{W - RIGHT}" y2="{ys(v):.1f}" '
                           f'stroke="{"#ccc" if m == 1 else "#eee"}"/>')
                svg.append(f'<text x="{LEFT - 6}" y="{ys(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    svg += [f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">bits per weight</text>',
            f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">mean KLD vs F16 (log)</text>']
    return svg


def svg_text(rows: list[dict], title: str) -> str:
    """The whole SVG document."""
    pts = points(rows)
    if not pts:
        raise ValueError("no quantized rows with a KLD to plot")
    x_lo, x_hi = math.floor(min(r["bpw"] for r in pts)) - 0.2, math.ceil(max(r["bpw"] for r in pts)) + 0.5
    y_lo = 10 ** math.floor(math.log10(min(r["kld"] for r in pts)))
    y_hi = 10 ** math.ceil(math.log10(max(r["kld"] + r.get("kld_err", 0) for r in pts)))
    xs, ys = _scale(x_lo, x_hi, LEFT, W - RIGHT), _scale(y_lo, y_hi, H - BOTTOM, TOP, log=True)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="{FONT}">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    svg += _axes(xs, ys, x_lo, x_hi, y_lo, y_hi)
    marks = sorted(((xs(r["bpw"]), ys(r["kld"]), r["type"]) for r in pts), key=lambda m: m[1])
    for r in pts:
        color, shape = FAMILIES[family(r["type"])]
        x, y, err = xs(r["bpw"]), ys(r["kld"]), r.get("kld_err", 0)
        if err and r["kld"] - err > 0:
            svg.append(f'<line x1="{x:.1f}" y1="{ys(r["kld"] - err):.1f}" x2="{x:.1f}" '
                       f'y2="{ys(r["kld"] + err):.1f}" stroke="{color}"/>')
        svg.append(_marker(shape, x, y, color))
    for (x, y, text), (lx, ly) in zip(marks, _place_labels(marks)):
        svg.append(f'<text x="{lx:.1f}" y="{ly:.1f}" fill="{FAMILIES[family(text)][0]}">{escape(text)}</text>')
    for i, (name, (color, shape)) in enumerate(FAMILIES.items()):  # legend, top right
        lx, ly = W - RIGHT - 110, TOP + 16 + 16 * i
        svg += [_marker(shape, lx, ly - 4, color), f'<text x="{lx + 10}" y="{ly}">{name} types</text>']
    return "\n".join(svg + ["</svg>"]) + "\n"


def write_svg(rows: list[dict], path: Path, title: str = "KLD vs F16 by bits per weight") -> Path:
    """Write the plot of `rows` (bench_quality rows: type, bpw, kld, kld_err) to path."""
    Path(path).write_text(svg_text(rows, title))
    return Path(path)


def markdown(rows: list[dict]) -> str:
    """README table: quantized rows by KLD, then the F16 reference; an importance column when rows used different
    importance matrices (bench_quality's `imatrix` field, e.g. rows reused from a run with llama-imatrix's)."""
    pts = sorted(points(rows), key=lambda r: r["kld"])
    sources = {r.get("imatrix") for r in pts}
    imx = len(sources) > 1
    lines = ["| mix | bits/weight | KLD vs F16 | top-1 % | PPL | quantize s |" + (" importance |" if imx else ""),
             "|---|---|---|---|---|---|" + ("---|" if imx else "")]
    for r in pts:
        src = f" {Path(str(r.get('imatrix'))).name if r.get('imatrix') else '-'} |" if imx else ""
        lines.append(f"| {r['type']} | {r['bpw']:.2f} | {r['kld']:.3g} ± {r['kld_err']:.1g} | "
                     f"{100 * r['same_top']:.1f} | {r['ppl']:.4g} | {r['convert_s']:.0f} |{src}")
    ref = [r for r in rows if r["type"] == "F16"]
    if ref:
        lines.append(f"| F16 (reference) | 16.00 | 0 | 100 | {ref[0]['ppl']:.4g} | {ref[0]['convert_s']:.0f} |"
                     + (" - |" if imx else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Read results.json; write the SVG (and print the table with --markdown)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="bench_quality.py's results.json")
    ap.add_argument("-o", "--out", type=Path, default=None, help="SVG path (default: kld_vs_bpw.svg beside results)")
    ap.add_argument("--title", default="SmolLM2-135M, widened reference: KLD vs F16 by bits per weight")
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    args = ap.parse_args()
    rows = json.loads(args.results.read_text())["rows"]
    path = write_svg(rows, args.out or args.results.with_name("kld_vs_bpw.svg"), args.title)
    if args.markdown:
        print(markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
