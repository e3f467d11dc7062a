"""Chat templates under budgets: hostile templates (compile-time folding, runaway loops, doubling, huge
formats, deep nesting, recursion) fail fast with TemplateBudgetError in bounded time and memory; loading
a template costs nothing; real templates render exactly as plain jinja2 renders them."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence


def reference_render(source: str, messages: Sequence[Mapping[str, Any]], bos_token: str = "",
                     eos_token: str = "", add_generation_prompt: bool = True, **extra: Any) -> str:
    """What plain jinja2 renders: its immutable sandbox with HF's helpers, no budgets. Constant folding is
    off (it only changes *when* an expression runs, so a dead branch cannot explode at compile time)."""
    from jinja2 import pass_context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Reference(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = Reference(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                    finalize=pass_context(lambda context, value: value))
    env.optimized = False
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        v, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source).render(messages=[dict(m) for m in messages], bos_token=bos_token,
                                          eos_token=eos_token, add_generation_prompt=add_generation_prompt, **extra)


# ---------------------------------------------------------------------------------------------------------
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from test_runtime_forward import build_tiny_gguf

from qf.runtime.chat import (CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, TemplateBudget, TemplateBudgetError,
                             chat_template_from_metadata)

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SECONDS = 5.0  # every hostile template fails well within this, on a loaded 2-core machine
PEAK_BYTES = 64 << 20  # ... and never holds more than this

# (id, source, the budget that runs out)
HOSTILE: list[tuple[str, str, str]] = [
    # jinja2 folds constants while compiling: none of these may be evaluated before render, nor at it
    ("fold-mul", "{{ 'a' * 10**9 }}", "value"),
    ("fold-percent", "{{ '%s' % ('x' * 10**8) }}", "value"),
    ("fold-width", "{{ '%999999999s' % 'a' }}", "value"),
    ("fold-star-width", "{{ '%*s' % (10**9, 'a') }}", "value"),
    ("fold-precision", "{{ '%.999999999f' % 1.0 }}", "value"),
    ("fold-filter", "{{ 'x' | center(10**9) }}", "value"),
    ("fold-autoescape", "{% autoescape ('a' * 10**9) | length > 0 %}x{% endautoescape %}", "value"),
    ("fold-dead-branch", "{% if false %}{{ 'a' * 10**9 }}{{ 'b' | center(10**9) }}{% endif %}"
     "{{ ('a' * 10**9) if false else 'ok' }}{{ 'a' * 10**9 }}", "value"),
    # runaway loops
    ("nested-range", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("nested-list", "{% set r = range(100000) | list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
     "steps"),
    ("loop-filter", "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",
     "steps"),
    # growth through the conversation and through namespaces
    ("content-mul", "{{ messages[0]['content'] * 10**8 }}", "value"),
    ("namespace-tilde", "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s | length }}", "value"),
    ("namespace-plus", "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "value"),
    ("namespace-list-dag", "{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(80) %}{% set ns.a = [ns.a, ns.a] %}"
     "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}", "value"),
    ("namespace-tuple-hash", "{% set ns = namespace(a=(1,)) %}{% for i in range(80) %}{% set ns.a = (ns.a, ns.a) %}"
     "{% endfor %}{{ {ns.a: 1} }}", "value"),
    ("namespace-shared-ref", "{% set ns = namespace(x=1) %}{% set big = [ns] * 1000 %}{% set ns.x = 'y' * 3000000 %}"
     "{{ big }}", "value"),
    ("hoard-list", "{% set ns = namespace(l=[]) %}{% for i in range(10000) %}{% set ns.l = ns.l + ['x' * 10**6 ~ i] %}"
     "{% endfor %}", "value"),
    ("alloc-churn", "{% for i in range(1000) %}{% set x = 'y' * 10**6 ~ i %}{% endfor %}", "alloc"),
    ("block-set", "{% set x %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endset %}{{ x | length }}",
     "value"),
    ("output-flood", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output"),
    # filters, methods and formats that build much more than they are given
    ("tojson-indent", "{{ messages | tojson(indent=10**8) }}", "json indent"),
    ("format-method", "{{ '{:>1000000000}'.format(1) }}", "value"),
    ("format-nested", "{{ '{:{}}'.format('a', 10**9) }}", "value"),
    ("str-center", "{{ 'a'.center(10**9) }}", "value"),
    ("replace-empty", "{{ ('a' * 1000) | replace('', 'b' * 100000) }}", "value"),
    ("join-separator", "{{ ('x' * 100000).join(range(100000) | map('string')) }}", "value"),
    ("expandtabs", "{{ ('\t' * 100000).expandtabs(100000) }}", "value"),
    ("translate", "{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "value"),
    ("indent", "{{ ('\n' * 100000) | indent(100000) }}", "value"),
    ("batch-padding", "{{ [1] | batch(10**9, 'x') | list }}", "value"),
    ("slice-count", "{{ [1] | slice(10**8) | list }}", "value"),
    ("sum-lists", "{{ ([[0] * 1000] * 1000) | sum(start=[]) | length }}", "value"),
    ("list-of-chars", "{{ ('x' * 4000000) | list | length }}", "value"),
    ("split-pieces", "{{ ('a,' * 2000000).split(',') | length }}", "value"),
    ("round-precision", "{{ 10 | round(-10**8) }}", "round digits"),
    ("int-power", "{{ 7 ** (10**8) }}", "integer"),
    ("int-squaring", "{% set ns = namespace(x=2) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     "integer"),
    ("int-from-hex", "{{ ('f' * 2000000) | int(base=16) }}", "integer"),
    ("strftime", "{{ strftime_now('%c' * 100000) }}", "strftime format"),
    ("striptags", "{{ ('<>' * 1000000) | striptags }}", "quadratic filter"),
    # nesting and recursion
    ("deep-parens", "{{ " + "(" * 100000 + "1" + ")" * 100000 + " }}", "nesting"),
    ("deep-ifs", "{% if 1 %}" * 40000 + "{% endif %}" * 40000, "nesting"),
    ("long-chain", "{{ " + "1+" * 16000 + "1 }}", "nesting"),
    ("token-flood", "{{ x }}" * 140000, "tokens"),
    ("recursive-macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "depth"),
    ("recursive-loop", "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "depth"),
    ("recursive-block", "{% block a %}{{ self.a() }}{% endblock %}", "depth"),
    ("recursive-caller", "{% macro f() %}{{ caller() }}{% endmacro %}{% macro g() %}{% call f() %}{{ g() }}"
     "{% endcall %}{% endmacro %}{{ g() }}", "depth"),
]


def _timed(source: str, budget: TemplateBudget | None = None) -> tuple[BaseException | None, float]:
    """(the error rendering raised, seconds from construction to failure)."""
    t0 = time.perf_counter()
    try:
        ChatTemplate(source, "<s>", "</s>", budget=budget).render(MESSAGES)
    except Exception as e:  # noqa: BLE001 - the tests check its type
        return e, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def _peak(source: str) -> int:
    """Peak bytes Python allocated from construction to failure (traced apart: tracing slows rendering)."""
    tracemalloc.start()
    try:
        _timed(source)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Failures while parsing: tracing makes jinja2's lexer and parser ~15x slower, so their memory is checked
# only by the address-space-limited child below (which runs every case).
PARSE_BUDGETS = {"tokens", "nesting"}


@pytest.mark.parametrize("name,source,budget", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_template_fails_fast_in_bounded_memory(name: str, source: str, budget: str) -> None:
    err, elapsed = _timed(source)
    assert isinstance(err, TemplateBudgetError), repr(err)
    assert err.budget == budget, str(err)
    assert "exceeded its " + budget + " budget" in str(err)
    assert elapsed < SECONDS, f"{name}: {elapsed:.2f} s"
    if budget not in PARSE_BUDGETS:
        peak = _peak(source)
        assert peak < PEAK_BYTES, f"{name}: {peak / 2**20:.1f} MiB"


def test_time_budget_stops_a_slow_render() -> None:
    budget = TemplateBudget(max_steps=10**12, max_seconds=0.3)
    err, elapsed = _timed(HOSTILE[8][1], budget)  # nested loops, steps unlimited
    assert isinstance(err, TemplateBudgetError) and err.budget == "time", repr(err)
    assert "QF_TEMPLATE_MAX_SECONDS" in str(err) and elapsed < 0.3 + 1.0


_CHILD = r"""
import json, resource, sys
sys.setrecursionlimit(1000)
from qf.runtime.chat import ChatTemplate, TemplateBudgetError
sources = json.loads(sys.stdin.read())
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
out = []
for s in sources:
    try:
        ChatTemplate(s).render([{"role": "user", "content": "hi"}])
        out.append("rendered")
    except TemplateBudgetError as e:
        out.append(e.budget)
    except BaseException as e:
        out.append(type(e).__name__ + ": " + str(e)[:200])
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_hostile_templates_under_a_hard_address_space_limit() -> None:
    """In a child limited to 256 MiB more address space, every hostile template still ends in its own
    budget (a MemoryError would have shown it really tried to allocate)."""
    import json

    cases = HOSTILE
    child = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([h[1] for h in cases]),
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout) == [h[2] for h in cases]


# -- loading costs nothing ---------------------------------------------------------------------------------

class _Meta(dict):
    """Just enough of qf.format.reader.Metadata for chat_template_from_metadata."""

    def get_str(self, key: str) -> str:
        return self[key]


def test_loading_a_hostile_template_costs_nothing() -> None:
    source = "{{ 'a' * 10**9 }}" + "{{ x }}" * 140000  # 1 MiB of tokens, and a fold that would take 1 GB
    t0 = time.perf_counter()
    t = chat_template_from_metadata(_Meta({"tokenizer.chat_template": source}), "<s>", "</s>")
    assert time.perf_counter() - t0 < 0.05
    assert not t.compiled
    with pytest.raises(TemplateBudgetError, match="tokens budget"):
        t.render(MESSAGES)


def test_model_load_does_not_compile_the_template(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "hostile.gguf", meta={"tokenizer.chat_template": HOSTILE[0][1]})
    from qf.runtime import Model

    with Model.load(path, n_ctx=64, warmup=False) as m:
        assert not m.template.compiled
        with pytest.raises(TemplateBudgetError, match="value budget"):
            m.apply_chat_template(MESSAGES)


def test_a_failed_compile_is_not_retried_on_every_render() -> None:
    t = ChatTemplate("{{ x }}" * 40000)
    t0 = time.perf_counter()
    with pytest.raises(TemplateBudgetError, match="tokens budget"):
        t.render(MESSAGES)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        with pytest.raises(TemplateBudgetError, match="tokens budget"):
            t.render(MESSAGES)
    assert time.perf_counter() - t0 < first + 0.05 and not t.compiled


def test_source_budget_is_checked_at_construction() -> None:
    with pytest.raises(TemplateBudgetError, match="source budget.*QF_TEMPLATE_MAX_SOURCE"):
        ChatTemplate("x" * ((1 << 20) + 1))
    with pytest.raises(ChatTemplateError, match="expected a string"):
        ChatTemplate(b"{{ x }}")  # type: ignore[arg-type]


# -- budgets are configurable ------------------------------------------------------------------------------

def test_budgets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QF_TEMPLATE_MAX_OUTPUT", "100")
    monkeypatch.setenv("QF_TEMPLATE_MAX_SECONDS", "2.5")
    b = TemplateBudget.from_env()
    assert b.max_output_chars == 100 and b.max_seconds == 2.5 and b.max_steps == TemplateBudget().max_steps
    with pytest.raises(TemplateBudgetError, match="output budget of 100 characters.*QF_TEMPLATE_MAX_OUTPUT"):
        ChatTemplate("{{ 'x' * 101 }}").render(MESSAGES)
    assert ChatTemplate("{{ 'x' * 100 }}").render(MESSAGES) == "x" * 100


@pytest.mark.parametrize("var,value", [("QF_TEMPLATE_MAX_STEPS", "lots"), ("QF_TEMPLATE_MAX_STEPS", "0"),
                                       ("QF_TEMPLATE_MAX_SECONDS", "nan"), ("QF_TEMPLATE_MAX_DEPTH", "1.5")])
def test_bad_budget_environment_is_named(var: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ChatTemplateError, match=f"{var}=.*expected a positive"):
        ChatTemplate("x")


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("max_seconds", float("inf")), ("max_depth", -1),
                                         ("max_value_chars", True), ("max_output_chars", "10")])
def test_bad_budget_values_are_named(field: str, value: Any) -> None:
    with pytest.raises(ChatTemplateError, match=f"TemplateBudget.{field}: expected a positive"):
        TemplateBudget(**{field: value})


def test_autoescape_blocks_and_long_error_messages() -> None:
    source = "{% autoescape true %}{{ ('<' ~ messages[0].content) | length }}|{{ '<a>' ~ '&' }}{% endautoescape %}"
    messages = [{"role": "user", "content": "x&y"}]
    assert ChatTemplate(source).render(messages) == reference_render(source, messages) == "4|&lt;a&gt;&amp;"
    for source in ("{{ raise_exception('x' * 100000) }}", "{{ {}['k' * 100000].x }}"):
        with pytest.raises(ChatTemplateError) as e:
            ChatTemplate(source).render(messages)
        assert len(str(e.value)) < 1200 and "(100000 characters)" in str(e.value) or "characters)" in str(e.value)


def test_budget_errors_are_chat_template_errors() -> None:
    err, _ = _timed("{{ 'a' * 10**9 }}")
    assert isinstance(err, ChatTemplateError) and err.env == "QF_TEMPLATE_MAX_VALUE"
    assert err.limit == TemplateBudget().max_value_chars


# -- real templates render exactly as plain jinja2 renders them ---------------------------------------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

LLAMA31_TOOLS = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Everything at once: macros with recursion and caller, namespaces, filters, formats, loops, literals.
FEATURES = """{%- set ns = namespace(count=0, text='', seen=[]) -%}
{%- macro render_schema(obj, depth=0) -%}
  {%- if obj is mapping -%}{ {%- for k, v in obj | dictsort -%}{{ k }}: {{ render_schema(v, depth + 1) }}
  {%- if not loop.last %}, {% endif %}{%- endfor -%} }
  {%- elif obj is iterable and obj is not string -%}[{{ obj | map('string') | join('|') }}]
  {%- else -%}{{ obj | string | upper }}{%- endif -%}
{%- endmacro -%}
{%- macro box(title) -%}[{{ title | center(12) }}]{{ caller() | indent(2) }}[/]{%- endmacro -%}
{%- for m in messages -%}
  {%- set ns.count = ns.count + 1 -%}
  {%- set ns.text = ns.text ~ m.role[:1] -%}
  {%- set ns.seen = ns.seen + [m.role] -%}
  {%- call box(m.role | title) -%}
  {{ '%-9s|%3d|%s' % (m.role, loop.index, m.content | replace('\\n', ' ') | truncate(40)) }}
  {{ '{0:>8}:{1!r}'.format(m.role, m.content[:12]) }} {{ loop.cycle('odd', 'even') }}
  {%- endcall %}
{% endfor -%}
{{ ns.count }} {{ ns.text }} {{ ns.seen | unique | list }} {{ ns.seen | groupby('0') | list | length }}
{{ render_schema(tools[0]) }}
{{ tools | tojson(indent=2) }} {{ tools | map(attribute='name') | list | pprint }}
{{ (messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(' / ')) | wordwrap(30) }}
{{ range(5) | batch(2, 0) | list }} {{ range(7) | slice(3) | list }} {{ [3, 1, 2] | sort | reverse | list }}
{{ (1, 2) + (3,) }} {{ {'b': 1, 'a': [1, 2]} | items | list }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 / 2 }} {{ -3 % 5 }}
{{ 'a-b c' | title }} {{ '<b>x</b>' | striptags }} {{ 'x' * 3 }} {{ [1] * 3 }} {{ 1.23456 | round(2) }} {{ '42' | int + 1 }}
{{ 'a,b,,c'.split(',') }} {{ ' pad '.strip().zfill(6) }} {{ '\t'.expandtabs(4) | length }} {{ 'a'.join(['x', 'y']) }}
{%- for x in [[1, [2, [3]]]] recursive %}({{ x if x is number else loop(x) }}){% endfor %}
{% set block %}{% for i in range(3) %}{{ i }}{% endfor %}{% endset %}{{ block ~ block }}
{% filter upper %}done {{ messages | length }}{% endfilter %}"""

TOOLS = [{"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "enum": [1, 3, 7]}},
    "required": ["city"]}}]
CONVERSATIONS = {
    "one": MESSAGES,
    "system": [{"role": "system", "content": "Be brief.\n"}] + MESSAGES,
    "multi": [{"role": "user", "content": "Hi é ✓ \\ \"quoted\" 'single'\n\ttab"},
              {"role": "assistant", "content": " Hello! How can I help? "},
              {"role": "user", "content": "Line 1\nLine 2\n\nLine 4 <b>bold</b>"}],
    "long": [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: " + "lorem ipsum dolor " * 200}
             for i in range(200)],
}
TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3, "gemma3": GEMMA3, "llama31-tools": LLAMA31_TOOLS,
             "qwen25-tools": QWEN25_TOOLS, "features": FEATURES}


@pytest.mark.parametrize("template", TEMPLATES, ids=list(TEMPLATES))
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_as_plain_jinja(template: str, conversation: str, add_generation_prompt: bool) -> None:
    source, messages = TEMPLATES[template], CONVERSATIONS[conversation]
    extra: dict[str, Any] = {"tools": TOOLS} if template in ("llama31-tools", "qwen25-tools", "features") else {}
    try:
        expected: str | None = reference_render(source, messages, "<s>", "</s>", add_generation_prompt, **extra)
    except ValueError:  # the template rejects this conversation (raise_exception)
        expected = None
    t = ChatTemplate(source, "<s>", "</s>")
    if expected is None:
        with pytest.raises(ChatTemplateError, match="rejected the conversation"):
            t.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    else:
        assert t.render(messages, add_generation_prompt=add_generation_prompt, **extra) == expected


def test_tool_call_messages_render_as_plain_jinja() -> None:
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]}
    reply = {"role": "tool", "content": '{"temp": 21}'}
    messages = [{"role": "system", "content": "sys"}, *MESSAGES, call, reply]
    for source in (LLAMA31_TOOLS, QWEN25_TOOLS):
        assert ChatTemplate(source, "<s>").render(messages, tools=TOOLS) == reference_render(
            source, messages, "<s>", tools=TOOLS)


def test_smollm2_template_renders_as_plain_jinja(smollm2_gguf: Path) -> None:
    from qf.format.reader import open_gguf

    with open_gguf(smollm2_gguf) as f:
        source = f.meta.get_str("tokenizer.chat_template")
    for messages in CONVERSATIONS.values():
        for agp in (True, False):
            expected = reference_render(source, messages, "<|im_start|>", "<|im_end|>", agp)
            assert ChatTemplate(source, "<|im_start|>", "<|im_end|>").render(messages, agp) == expected


def test_a_long_conversation_renders_fast_under_default_budgets() -> None:
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"{i} " + "word " * 2000} for i in range(500)]
    t = ChatTemplate(LLAMA31_TOOLS, "<s>")
    t0 = time.perf_counter()
    out = t.render(messages, tools=TOOLS)
    assert time.perf_counter() - t0 < 2.0
    assert out == reference_render(LLAMA31_TOOLS, messages, "<s>", tools=TOOLS) and len(out) > 5_000_000
