"""Fuzzing chat templates built from a small typed grammar of jinja constructs (loops, conditions, set,
macros, namespaces, filters, methods, operators, literals, ranges with big numbers): rendering only ever
raises ChatTemplateError, and stays within its time, output and memory budgets."""

from __future__ import annotations

import time
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_h1_chat_budget import reference_render

from qf.runtime.chat import ChatTemplate, ChatTemplateError, TemplateBudget

# Small budgets keep each example cheap; the fuzz checks they hold, whatever the template does.
BUDGET = TemplateBudget(max_steps=20_000, max_seconds=1.0, max_output_chars=1 << 20, max_value_chars=1 << 18,
                        max_alloc_chars=1 << 21, max_depth=12)
PEAK_BYTES = 48 << 20
SLACK_SECONDS = 2.0  # compile time (bounded by the token budget) and a loaded machine
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b>\n" * 3},
            {"role": "assistant", "content": "Hello! é"}]
PRELUDE = ("{% set ns = namespace(v='ab', w=[1]) %}"
           "{% macro m(a) %}[{{ a }}]{% if a is number and a > 0 %}{{ m(a - 1) }}{% endif %}{% endmacro %}")

# -- grammar: each entry is a format string whose {i} / {s} / {l} / {a} holes take int / str / list / any
INT_LEAVES = ["0", "1", "2", "-1", "7", "64", "1000", "10**5", "10**6", "10**9", "2**62", "10**100", "loop_i"]
STR_LEAVES = ["''", "'a'", "'xy'", "'%s'", "'%*s'", "'{}'", "'{:>{}}'", "'<a>'", "'\\n'", "' a-b '", "'x@y.z ('",
              "ns.v", "messages[1].content", "bos_token"]
LIST_LEAVES = ["[1, 2]", "[]", "messages", "ns.w", "['a', 'b']", "[[1], [2, 3]]"]
INT_OPS = ["({i} + {i})", "({i} * {i})", "({i} ** {i})", "({i} // {i})", "({i} % {i})", "({s} | length)",
           "({l} | length)", "({l} | sum)", "({s} | int)", "({s}.count({s}))", "({i} | round({i}) | int)",
           "({l} | max)", "({i} if {s} else {i})", "m({i}) | length"]
STR_OPS = ["({s} ~ {s})", "({s} + {s})", "({s} * {i})", "({s} % {a})", "({s} % ({i}, {s}))", "({a} | string)",
           "({a} | tojson)", "({a} | tojson(indent={i}))", "({a} | pprint)", "({s} | upper)", "({s} | title)",
           "({s} | trim)", "({s} | center({i}))", "({s} | indent({i}))", "({s} | replace({s}, {s}))",
           "({s} | wordwrap({i}))", "({s} | format({a}))", "({s} | striptags)", "({s} | urlize)",
           "({s} | truncate({i}))", "({s} | escape)", "({l} | join({s}))", "({s}.center({i}))", "({s}.zfill({i}))",
           "({s}.join({l} | map('string')))", "({s}.replace({s}, {s}))", "({s}.format({a}, {i}))",
           "({s}.expandtabs({i}))", "({s}.translate({ 120: {s} }))", "m({a})", "({l} | first | string)",
           "{s}[{i}:{i}]", "({s} if {i} else {s})", "caller_free({s})"]
LIST_OPS = ["[{a}, {a}]", "({a}, {a})", "range({i})", "({l} + {l})", "({l} * {i})", "({s} | list)",
            "({l} | batch({i}) | list)", "({l} | slice({i}) | list)", "({l} | map('string') | list)",
            "({l} | sort)", "({l} | unique | list)", "({l} | reverse | list)", "({s}.split({s}))",
            "({s}.splitlines())", "({l} | sum(start=[]))", "({l} | batch({i}, {s}) | list)",
            "(namespace(q={l}).q)", "([ns, ns] if {i} else {l})", "({ {s}: {a} } | dictsort)",
            "({ {s}: {l} }.items() | list)"]


def _expand(pattern: str, ints: st.SearchStrategy[str], strs: st.SearchStrategy[str],
            lists: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Fill every hole of a pattern with an expression of the hole's type."""
    holes = [pattern[i + 1] for i in range(len(pattern) - 2) if pattern[i] == "{" and pattern[i + 2] == "}"
             and pattern[i + 1] in "isla"]
    kinds = {"i": ints, "s": strs, "l": lists, "a": st.one_of(ints, strs, lists)}

    def fill(args: list[str]) -> str:
        out = pattern
        for h, a in zip(holes, args):
            out = out.replace("{" + h + "}", a, 1)
        return out.replace("caller_free(", "(")

    return st.tuples(*(kinds[h] for h in holes)).map(lambda t: fill(list(t)))


def _typed(depth: int) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str], st.SearchStrategy[str]]:
    """(int, str, list) expression strategies nesting at most `depth` operations."""
    ints, strs, lists = st.sampled_from(INT_LEAVES), st.sampled_from(STR_LEAVES), st.sampled_from(LIST_LEAVES)
    for _ in range(depth):
        ops = [st.sampled_from(p).flatmap(lambda q, i=ints, s=strs, l=lists: _expand(q, i, s, l))
               for p in (INT_OPS, STR_OPS, LIST_OPS)]
        ints, strs, lists = (st.one_of(ints, ops[0]), st.one_of(strs, ops[1]), st.one_of(lists, ops[2]))
    return ints, strs, lists


INTS, STRS, LISTS = _typed(3)
ANY = st.one_of(INTS, STRS, LISTS)
simple = st.one_of(
    ANY.map(lambda e: "{{ " + e + " }}"),
    ANY.map(lambda e: "{% set ns.v = " + e + " %}"),
    LISTS.map(lambda e: "{% set ns.w = " + e + " %}"),
    st.sampled_from(["text ", "{% set ns.v = ns.v ~ ns.v %}", "{% set ns.w = [ns.w, ns.w] %}",
                     "{% set ns.w = ns.w + ns.w %}", "{{ ns.w }}", "{{ m(5) }}", "{{ k(1) }}"]),
)


def _closed(exprs: st.SearchStrategy[str], index: str) -> st.SearchStrategy[str]:
    """Expressions outside any loop: the loop-index leaf becomes a constant."""
    return exprs.map(lambda e: e.replace("loop_i", index))


LOOP = "{{% for x in {} %}}{}{{% endfor %}}"
RECURSIVE_LOOP = "{{% for x in {} recursive %}}{}{{{{ loop([x, x] if x is not string else []) }}}}{{% endfor %}}"
IF_ELSE = "{{% if {} %}}{}{{% else %}}{}{{% endif %}}"


def _stmt_step(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """One more layer of statements over `inner` (loop bodies may use the loop index)."""
    body = inner.map(lambda s: s.replace("loop_i", "loop.index"))
    return st.one_of(
        st.builds(lambda a, b: a + b, inner, inner),
        st.builds(LOOP.format, _closed(LISTS, "3"), body),
        st.builds(RECURSIVE_LOOP.format, _closed(LISTS, "3"), body),
        st.builds(IF_ELSE.format, _closed(ANY, "4"), inner, inner),
        st.builds(lambda s: f"{{% set y %}}{s}{{% endset %}}{{{{ y ~ y }}}}", inner),
        st.builds(lambda s: f"{{% filter upper %}}{s}{{% endfilter %}}", inner),
        st.builds(lambda s: f"{{% autoescape true %}}{s}{{% endautoescape %}}", inner),
    )


body = st.recursive(simple, _stmt_step, max_leaves=6)


def fuzzed_source(macro_body: str, main: str) -> str:
    """A whole template from two generated statement lists."""
    return (PRELUDE + "{% macro k(z) %}" + macro_body + "{% endmacro %}" + main).replace("loop_i", "5")


def render_fuzzed(source: str) -> tuple[str | None, float, int]:
    """Render under BUDGET: (output, or None when refused; seconds; peak traced bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out: str | None = ChatTemplate(source, "<s>", "</s>", budget=BUDGET).render(MESSAGES)
    except ChatTemplateError:
        out = None
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, elapsed, peak


@settings(max_examples=150, deadline=6000, suppress_health_check=[HealthCheck.too_slow])
@given(macro_body=body, main=body)
def test_fuzzed_templates_only_raise_our_error_within_budget(macro_body: str, main: str) -> None:
    source = fuzzed_source(macro_body, main)
    out, elapsed, peak = render_fuzzed(source)
    assert elapsed < BUDGET.max_seconds + SLACK_SECONDS
    assert peak < PEAK_BYTES
    if out is not None:  # within budget: exactly what plain jinja2 renders (iterator reprs hold addresses)
        assert len(out) <= BUDGET.max_output_chars
        if " object at 0x" not in out:
            assert out == reference_render(source, MESSAGES, "<s>", "</s>")
