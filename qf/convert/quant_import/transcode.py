"""Whether a quantized checkpoint's payloads become ggml block types, and the summary lines saying why.

A file is transcoded whole or not at all: when every payload has an exact rule (qf.quant.formats.transcode)
whose check passes, or a lossy one allowed by --transcode-lossy, every quantized linear becomes that ggml type
(llama.cpp then runs the file); otherwise every payload is kept native. --keep-payload always keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qf.convert.quant_import.base import LinearPayload
from qf.format.ggml_types import GGMLType
from qf.quant.formats.transcode import Rule, inexact_scales, rule_for, worst_q4_1_error

LOSSY_ERRORS = {GGMLType.Q4_1: worst_q4_1_error}  # lossy target -> worst-error measure (absolute, steps)


@dataclass
class Verdict:
    """One payload's outcome: the rule it takes (None: stays native), why, and the lossy error if any."""

    rule: Rule | None
    why: str
    error: tuple[float, float] | None = None


@dataclass
class Decision:
    """Target ggml type per HF weight (empty: payloads kept) and one summary line per scheme."""

    targets: dict[str, GGMLType] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _arrays(lp: LinearPayload, suffixes: tuple[str, ...]) -> dict:
    """The named members of a payload read from the checkpoint (small ones: scales, zero points)."""
    return {s: lp.members[s].read() for s in suffixes if s in lp.members}


def verdict(lp: LinearPayload, lossy: bool) -> Verdict:
    """What one payload can become."""
    rule, why = rule_for(lp.scheme, lp.n_in)
    if rule is None:
        return Verdict(None, why)
    if rule.exact:
        bad = inexact_scales(lp.members["weight_scale"].read())
        if bad:
            return Verdict(None, f"{bad} scales are not exact in fp16 ({rule.target.name} stores d as fp16)")
        return Verdict(rule, f"exact: {rule.grid}, every scale exact in fp16")
    if not lossy:
        return Verdict(None, f"{rule.target.name} would be lossy ({rule.grid}); --transcode-lossy allows it")
    err = LOSSY_ERRORS[rule.target](lp.scheme, _arrays(lp, ("weight_scale", "weight_zero")), lp.n_in)
    return Verdict(rule, f"lossy (--transcode-lossy): {rule.grid}", err)


def _group_note(scheme: str, lps: list[tuple[str, Verdict]], written: bool, why_native: str) -> str:
    """The summary line of one scheme."""
    n = len(lps)
    if written:
        v = lps[0][1]
        line = f"{scheme}: {n} weights -> {v.rule.target.name} ({v.why})"
        errs = [(v.error, name) for name, v in lps if v.error is not None]
        if errs:
            (a, steps), name = max(errs, key=lambda e: e[0][0])
            line += f"; worst |error| {a:.3g} ({steps:.3g} quantization steps) in {name}"
        return line
    own = next((v.why for _, v in lps if v.rule is None), None)
    return f"{scheme}: {n} weights kept as payload ({own or why_native})"


def decide(payloads: dict[str, LinearPayload], keep_payload: bool, lossy: bool) -> Decision:
    """Transcode every payload or none; notes per scheme say what is written and why."""
    if not payloads:
        return Decision()
    by_scheme: dict[str, list[tuple[str, Verdict]]] = {}
    for name, lp in payloads.items():
        v = Verdict(None, "--keep-payload") if keep_payload else verdict(lp, lossy)
        by_scheme.setdefault(lp.scheme, []).append((name, v))
    blocked = [(s, name, v.why) for s, vs in by_scheme.items() for name, v in vs if v.rule is None]
    whole = not blocked
    why_native = ("--keep-payload" if keep_payload else
                  f"a file is transcoded whole; {blocked[0][1]} cannot be: {blocked[0][2]}" if blocked else "")
    notes = [_group_note(s, vs, whole, why_native) for s, vs in by_scheme.items()]
    targets = {name: v.rule.target for vs in by_scheme.values() for name, v in vs} if whole else {}
    return Decision(targets, notes)
