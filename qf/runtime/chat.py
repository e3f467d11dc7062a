"""Chat prompts from the file's `tokenizer.chat_template`, rendered only inside jinja2's immutable sandbox
and under explicit budgets.

A template inside a downloaded model file is untrusted code (CVE-2024-34359): it is never rendered by a
plain jinja2 Environment. It is also a denial-of-service vector, so:

* loading is free: the source is only length-checked; it is compiled on first render, with jinja's
  constant folding off (no arithmetic, filter or output is evaluated at compile time) and its syntax
  tree nesting bounded;
* every render runs under a `TemplateBudget`: steps (loop iterations, calls, operators, filters,
  attribute lookups), wall time, output size, the size of any one value it builds (checked *before*
  an operator such as `'a' * n`, `'%99999999s' % x`, `x | center(n)` or `tojson(indent=n)` builds it,
  counting a nested list or dict as its printed size), total characters allocated, and call depth.
  Running out raises `TemplateBudgetError` naming the budget and the environment variable raising it.

The helpers mirror what Hugging Face exposes to templates.
"""

from __future__ import annotations

import contextvars
import json
import math
import operator
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

from qf.format.errors import ModelError
from qf.format.model_check import MAX_TEMPLATE_CHARS  # the loader's limit: one value for both

# Used when a file carries no template (what llama.cpp falls back to as well).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_OUTPUT_CHARS = 1 << 24  # a prompt beyond this is a runaway template, not a conversation

# Fixed limits (no real template comes near them): name -> (limit, unit).
MAX_NESTING = 100        # syntax tree depth of the template source
MAX_INT_BITS = 4096      # any integer the template computes
MAX_JSON_INDENT = 64     # tojson(indent=...)
MAX_ROUND_DIGITS = 1000  # round(precision=...)
MAX_STRFTIME_CHARS = 256  # strftime_now(format)
MAX_QUADRATIC_FILTER_CHARS = 1 << 16  # input of striptags / urlize (quadratic in the worst case)
_FIXED_LIMITS = {
    "nesting": (MAX_NESTING, "levels of template nesting"),
    "integer": (MAX_INT_BITS, "bits in one integer"),
    "json indent": (MAX_JSON_INDENT, "characters of tojson indent"),
    "round digits": (MAX_ROUND_DIGITS, "digits of round() precision"),
    "strftime format": (MAX_STRFTIME_CHARS, "characters of strftime_now format"),
    "quadratic filter": (MAX_QUADRATIC_FILTER_CHARS, "characters into striptags or urlize"),
}


@dataclass(frozen=True)
class TemplateBudget:
    """What one chat template may cost: source size at load; steps, time, sizes and call depth per render."""

    max_source_chars: int = MAX_TEMPLATE_CHARS
    max_source_tokens: int = 1 << 15  # compile time grows with tokens (about 40 us each): real templates use < 5000
    max_steps: int = 1_000_000  # loop iterations, calls, operators, filters, lookups
    max_seconds: float = 5.0
    max_output_chars: int = MAX_OUTPUT_CHARS
    max_value_chars: int = 1 << 22  # any one string, or a list/dict counted as its printed size
    max_alloc_chars: int = 1 << 25  # everything one render builds, summed
    max_depth: int = 32  # nested macro / caller / recursive-loop calls

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ChatTemplateError(f"TemplateBudget.{f.name}: expected a positive finite number, got {v!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TemplateBudget:
        """Defaults, overridden by the QF_TEMPLATE_* environment variables."""
        environ = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        for name, (field, env, _unit) in _BUDGETS.items():
            if env in environ:
                kw[field] = _parse_budget_env(env, environ[env], float if name == "time" else int)
        return cls(**kw)


# Budget name -> (TemplateBudget field, environment variable, unit).
_BUDGETS = {
    "source": ("max_source_chars", "QF_TEMPLATE_MAX_SOURCE", "characters of template source"),
    "tokens": ("max_source_tokens", "QF_TEMPLATE_MAX_TOKENS", "tokens of template source"),
    "steps": ("max_steps", "QF_TEMPLATE_MAX_STEPS", "steps"),
    "time": ("max_seconds", "QF_TEMPLATE_MAX_SECONDS", "seconds"),
    "output": ("max_output_chars", "QF_TEMPLATE_MAX_OUTPUT", "characters of output"),
    "value": ("max_value_chars", "QF_TEMPLATE_MAX_VALUE", "characters in one value"),
    "alloc": ("max_alloc_chars", "QF_TEMPLATE_MAX_ALLOC", "characters allocated"),
    "depth": ("max_depth", "QF_TEMPLATE_MAX_DEPTH", "nested calls"),
}


def _parse_budget_env(env: str, text: str, kind: type) -> int | float:
    """One QF_TEMPLATE_* variable as a positive number."""
    try:
        v = kind(text)
    except ValueError:
        v = None
    if v is None or not (0 < v < math.inf):
        raise ChatTemplateError(f"environment variable {env}={text!r}: expected a positive "
                                f"{'number' if kind is float else 'integer'}")
    return v


class ChatTemplateError(ModelError):
    """The chat template is malformed, unsafe, or failed while rendering."""


class TemplateBudgetError(ChatTemplateError):
    """The chat template ran out of one of its budgets (`budget` names it, `env` the variable raising it)."""

    def __init__(self, budget: str, limit: int | float, unit: str, env: str | None, detail: str = "") -> None:
        self.budget, self.limit, self.env = budget, limit, env
        how = f"; raise with {env}" if env else " (a fixed limit)"
        super().__init__(f"tokenizer.chat_template exceeded its {budget} budget of {limit} {unit}"
                         f"{': ' + detail if detail else ''}{how}")


def _over(budget: TemplateBudget | None, name: str, detail: str = "") -> TemplateBudgetError:
    """The error for running out of budget `name` (a TemplateBudget field, or a fixed limit when budget is None)."""
    if budget is not None and name in _BUDGETS:
        field, env, unit = _BUDGETS[name]
        return TemplateBudgetError(name, getattr(budget, field), unit, env, detail)
    limit, unit = _FIXED_LIMITS[name]
    return TemplateBudgetError(name, limit, unit, None, detail)


class _TemplateRaised(Exception):
    """A template called raise_exception(message)."""


def _raise_exception(message: str) -> None:
    """The `raise_exception` helper HF templates call to reject a conversation."""
    raise _TemplateRaised(_shorten(str(message)))


def _shorten(text: str, limit: int = 1000) -> str:
    """An error message quoting template values, cut to a readable length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _strftime_now(fmt: str) -> str:
    """The `strftime_now` helper (llama 3.x templates print today's date)."""
    fmt = str(fmt)
    if len(fmt) > MAX_STRFTIME_CHARS:
        raise _over(None, "strftime format", f"{len(fmt)} characters")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | str | None = None, ensure_ascii: bool = False,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's tojson filter: no HTML escaping, unicode kept."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


# --------------------------------------------------------------------------------------------------------
# The meter: one per render, reached by every hook through a context variable.

_METER: contextvars.ContextVar[_Meter | None] = contextvars.ContextVar("qf_template_meter", default=None)

# Printed size of scalars (the longest repr of a float is 24 characters).
_SCALAR_CHARS: dict[type, int] = {bool: 5, type(None): 4, float: 24}
_OTHER_CHARS = 128  # an object of another type (macro, loop, undefined...): its repr is short
_CYCLE_CHARS = 16  # a namespace met again inside itself prints as {...}
_VIEW_TYPES = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINER_TYPES = (list, tuple, dict, set, frozenset, *_VIEW_TYPES)
# Characters escaped by repr() or json.dumps(): up to 6 characters each (\u001f).
_ESCAPED = dict.fromkeys([*range(0x20), 0x7F, ord("\\"), ord('"'), ord("'")])
_MEMO_MIN_CHARS = 1024  # strings at least this long have their quoted size remembered


def _quoted_len(s: str) -> int:
    """Upper bound on len(repr(s)) and len(json.dumps(s, ensure_ascii=False)), without building either."""
    plain = s.translate(_ESCAPED)
    if not plain.isprintable():
        return 2 + 12 * len(s)  # some non-ASCII character repr() escapes as \U0010ffff
    return 2 + len(plain) + 6 * (len(s) - len(plain))


def _namespace_attrs(ns: Any) -> dict:
    """The attribute dict inside a jinja2 Namespace."""
    return object.__getattribute__(ns, "_Namespace__attrs")


class _Meter:
    """Counts one render's steps, time, allocation and call depth; measures values before they are built."""

    def __init__(self, budget: TemplateBudget) -> None:
        self.budget = budget
        self.steps = self.alloc = self.depth = 0
        self.deadline = time.monotonic() + budget.max_seconds
        self.memo: dict[int, tuple[Any, int, int, int]] = {}  # id -> (object kept alive, chars, items, depth)

    def over(self, name: str, detail: str = "") -> TemplateBudgetError:
        """The error for budget `name` running out."""
        return _over(self.budget, name, detail)

    def tick(self, n: int = 1) -> None:
        """Charge n steps; check the step and time budgets."""
        self.steps += n
        if self.steps > self.budget.max_steps:
            raise self.over("steps")
        if time.monotonic() > self.deadline:
            raise self.over("time")

    def allow(self, chars: int, what: str) -> None:
        """Refuse to build a value of `chars` characters beyond the value budget."""
        if chars > self.budget.max_value_chars:
            raise self.over("value", f"{what} would be {chars} characters")

    def charge(self, chars: int) -> None:
        """Count characters built against the allocation budget."""
        self.alloc += chars
        if self.alloc > self.budget.max_alloc_chars:
            raise self.over("alloc")

    def enter(self) -> None:
        """One call deeper; refuse beyond the depth budget."""
        self.depth += 1
        if self.depth > self.budget.max_depth:
            raise self.over("depth")

    def leave(self) -> None:
        """Back from a call."""
        self.depth -= 1

    # -- sizes ---------------------------------------------------------------------------------------------
    def text(self, v: Any) -> int:
        """Upper bound on len(str(v))."""
        return len(v) if isinstance(v, str) else self.measure(v)[0]

    def measure(self, root: Any) -> tuple[int, int, int]:
        """(printed characters, items, nesting depth) of a value, as repr / json print it inside a container."""
        leaf = self._leaf(root)
        if leaf is not None:
            return leaf
        local: dict[int, tuple[int, int, int]] = {}
        stack, active, unstable = [root], set(), set()
        while stack:
            obj = stack[-1]
            key = id(obj)
            if key in local or key in self.memo:
                stack.pop()
            elif key not in active:
                active.add(key)
                kids = self._children(obj)[2]
                self.tick(1 + len(kids))
                stack.extend(k for k in kids if self._leaf(k) is None and id(k) not in active)
            else:
                stack.pop()
                active.discard(key)
                local[key] = self._combine(obj, local, unstable)
        return self._known(root, local)

    def is_container(self, v: Any) -> bool:
        """Whether v holds other values (list, tuple, dict, set, dict view, namespace)."""
        return isinstance(v, _CONTAINER_TYPES) or _is_namespace(v)

    def _leaf(self, v: Any) -> tuple[int, int, int] | None:
        """Size of a non-container (None for containers)."""
        t = type(v)
        if t in _SCALAR_CHARS:
            return _SCALAR_CHARS[t], 0, 0
        if isinstance(v, str):
            if len(v) < _MEMO_MIN_CHARS:
                return _quoted_len(v), 0, 0
            hit = self.memo.get(id(v))
            if hit is None:
                self.tick(1 + len(v) // 4096)
                hit = self.memo[id(v)] = (v, _quoted_len(v), 0, 0)
            return hit[1:]
        if isinstance(v, int):
            return v.bit_length() // 3 + 2, 0, 0
        if self.is_container(v):
            return None
        return _OTHER_CHARS, 0, 0

    def _known(self, v: Any, local: dict[int, tuple[int, int, int]]) -> tuple[int, int, int]:
        """Size of a value measured in this walk or an earlier one."""
        leaf = self._leaf(v)
        if leaf is not None:
            return leaf
        if id(v) in local:
            return local[id(v)]
        hit = self.memo.get(id(v))
        return hit[1:] if hit is not None else (_CYCLE_CHARS, 0, 0)

    def _children(self, obj: Any) -> tuple[int, int, list]:
        """(own characters, characters per child, children) of a container as repr prints it."""
        if _is_namespace(obj):
            return 13, 0, [_namespace_attrs(obj)]
        if isinstance(obj, dict):
            return 2, 2, [x for kv in obj.items() for x in kv]
        if isinstance(obj, type({}.items())):
            return 14, 4, [x for kv in obj for x in kv]
        return (14 if isinstance(obj, _VIEW_TYPES) else 2), 2, list(obj)

    def _combine(self, obj: Any, local: dict[int, tuple[int, int, int]], unstable: set[int]) -> tuple[int, int, int]:
        """Size of a container from its children's; remembered across walks unless a namespace (which
        `{% set ns.x = ... %}` changes) is inside it, or it is small and flat (cheap to measure again)."""
        own, per, kids = self._children(obj)
        chars, items, depth, mutable = own, 0, 0, _is_namespace(obj)
        for k in kids:
            c, i, d = self._known(k, local)
            chars, items, depth = chars + c + per, items + 1 + i, max(depth, d)
            mutable = mutable or id(k) in unstable
        size = (chars, items, depth + 1)
        if mutable:
            unstable.add(id(obj))
        elif items >= 16 or depth >= 1:
            self.memo[id(obj)] = (obj, *size)
            self.charge(64)  # the memo keeps it alive
        return size

    # -- values the template builds ------------------------------------------------------------------------
    def produced(self, v: Any, what: str = "a value") -> Any:
        """Check a value an operation returned against the value and allocation budgets; meter iterators."""
        if isinstance(v, str):
            self.allow(len(v), what)
            self.charge(len(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            if v.bit_length() > MAX_INT_BITS:
                raise self.over("integer", f"{what} has {v.bit_length()} bits")
        elif self.is_container(v):
            chars = self.measure(v)[0]
            self.allow(chars, what)
            self.charge(chars)
        elif isinstance(v, Iterator):
            return self.metered(v)
        return v

    def metered(self, it: Iterable) -> Iterator:
        """Iterate, charging one step per item."""
        for x in it:
            self.tick()
            yield x


def _is_namespace(v: Any) -> bool:
    """A jinja2 Namespace (the one mutable container a template can reach)."""
    from jinja2.utils import Namespace

    return type(v) is Namespace


def _meter() -> _Meter | None:
    """The meter of the render running on this thread (None while compiling)."""
    return _METER.get()


# --------------------------------------------------------------------------------------------------------
# Size bounds of operations that can build much more than they are given (data: name -> bound function).

def _index(v: Any) -> int:
    """An integer argument (TypeError otherwise, as Python's own would raise)."""
    return operator.index(v)


def _capped_int(digits: str) -> int:
    """A width / precision written in a format string (absurd lengths stay absurd, without parsing)."""
    return int(digits) if len(digits) <= 18 else 1 << 62


_PERCENT_SPEC = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d*))?[hlL]?(?P<conv>.?)", re.S)
_NUMBER_CHARS = 330  # longest %f of a float (1e308) plus sign and point


def _percent_bound(m: _Meter, fmt: str, args: Any) -> int:
    """Upper bound on len(fmt % args)."""
    values = list(args) if isinstance(args, tuple) else [args]
    total, i = len(fmt), 0

    def take() -> Any:
        nonlocal i
        i += 1
        return values[i - 1] if i <= len(values) else 0

    for spec in _PERCENT_SPEC.finditer(fmt):
        if spec["conv"] == "%":
            continue
        width = abs(_index(take())) if spec["width"] == "*" else _capped_int(spec["width"] or "0")
        prec = spec["prec"]
        prec = abs(_index(take())) if prec == "*" else _capped_int(prec) if prec else None
        arg = args[spec["key"]] if spec["key"] is not None and isinstance(args, Mapping) else take()
        if spec["conv"] in ("s", "r", "a"):
            piece = m.text(arg) if spec["conv"] == "s" else 12 * m.text(arg) + 2
            piece = piece if prec is None else min(piece, prec)
        else:
            piece = m.text(arg) + (prec or 0) + _NUMBER_CHARS
        total += max(width, piece)
    return total


def _spec_bound(m: _Meter, value: Any, spec: str) -> int:
    """Upper bound on len(format(value, spec)) (str.format's fields)."""
    nums = [_capped_int(d) for d in re.findall(r"\d+", spec)]
    return max(nums, default=0) + m.text(value) + _NUMBER_CHARS


def _sized(m: _Meter, items: Iterable) -> list:
    """Materialise an iterable argument (metered) so that it can be measured before use."""
    return items if isinstance(items, (list, tuple)) else list(m.metered(items))


def _join_bound(m: _Meter, sep: str, items: Sequence) -> int:
    """Upper bound on len(sep.join(map(str, items)))."""
    return sum(m.text(x) for x in items) + max(len(items) - 1, 0) * len(str(sep))


def _replace_bound(s: str, old: str, new: str, count: int = -1) -> int:
    """Upper bound on len(s.replace(old, new, count))."""
    old, new = str(old), str(new)
    n = len(s) + 1 if not old else s.count(old)
    if count is not None and _index(count) >= 0:
        n = min(n, _index(count))
    return len(s) + n * max(len(new) - len(old), 0)


def _split_bound(s: str, sep: str | None = None, maxsplit: int = -1) -> int:
    """Upper bound on the printed size of s.split(sep) (each piece costs its quotes and separator)."""
    pieces = (s.count(sep) if sep else len(s) // 2) + 1
    if _index(maxsplit) >= 0:
        pieces = min(pieces, _index(maxsplit) + 1)
    return 2 + len(s) * 12 // 10 + 4 * pieces if s.isascii() else 2 + 12 * len(s) + 4 * pieces


def _translate_bound(s: str, table: Any) -> int:
    """Upper bound on len(s.translate(table))."""
    values = table.values() if isinstance(table, Mapping) else ()
    return len(s) * max((len(v) for v in values if isinstance(v, str)), default=1)


# str methods: name -> bound(meter, the string, *args, **kwargs) on the printed size of the result.
_STR_METHOD_BOUNDS: dict[str, Callable[..., int]] = {
    "center": lambda m, s, width, fillchar=" ": max(len(s), _index(width)),
    "ljust": lambda m, s, width, fillchar=" ": max(len(s), _index(width)),
    "rjust": lambda m, s, width, fillchar=" ": max(len(s), _index(width)),
    "zfill": lambda m, s, width: max(len(s), _index(width)),
    "expandtabs": lambda m, s, tabsize=8: len(s) + s.count("\t") * max(_index(tabsize), 0),
    "replace": lambda m, s, old, new, count=-1: _replace_bound(s, old, new, count),
    "join": lambda m, s, items: _join_bound(m, s, items),
    "translate": lambda m, s, table: _translate_bound(s, table),
    "split": lambda m, s, sep=None, maxsplit=-1: _split_bound(s, sep, maxsplit),
    "rsplit": lambda m, s, sep=None, maxsplit=-1: _split_bound(s, sep, maxsplit),
    "splitlines": lambda m, s, keepends=False: _split_bound(s, None),
    "upper": lambda m, s: 3 * len(s), "lower": lambda m, s: 3 * len(s), "title": lambda m, s: 3 * len(s),
    "capitalize": lambda m, s: 3 * len(s), "swapcase": lambda m, s: 3 * len(s),
    "casefold": lambda m, s: 3 * len(s), "encode": lambda m, s, *a, **k: 4 * len(s),
}


def _indent_bound(m: _Meter, v: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> int:
    """Upper bound on len(v | indent(width))."""
    w = len(width) if isinstance(width, str) else max(_index(width), 0)
    n = m.text(v)
    lines = v.count("\n") + 1 if isinstance(v, str) else n + 1
    return n + lines * w


def _tojson_bound(m: _Meter, v: Any, indent: int | str | None = None, ensure_ascii: bool = False,
                  separators: tuple[str, str] | None = None, sort_keys: bool = False) -> int:
    """Upper bound on len(v | tojson(...)); refuses indents beyond MAX_JSON_INDENT."""
    w = 0 if indent is None else len(indent) if isinstance(indent, str) else max(_index(indent), 0)
    if w > MAX_JSON_INDENT:
        raise m.over("json indent", f"indent={w}")
    chars, items, depth = m.measure(v) if m.is_container(v) else (m.text(v) + 2, 0, 0)
    sep = sum(len(str(s)) for s in separators) if separators else 4
    return chars * (12 if ensure_ascii else 1) + items * (1 + w * depth + sep)


def _batch_bound(m: _Meter, v: Any, linecount: int, fill_with: Any = None) -> int:
    """batch pads its last batch to `linecount` items: bound the padding list."""
    return 8 * max(_index(linecount), 0)


def _sum_bound(m: _Meter, v: Sequence, attribute: Any = None, start: Any = 0) -> int:
    """sum over lists or tuples copies the running total each step: bound that work."""
    if attribute is not None or not any(isinstance(x, (list, tuple)) for x in (start, *v)):
        return 0
    total = m.measure(list(v))[0] + m.text(start)
    return total * len(v) // 2


def _round_bound(m: _Meter, v: Any, precision: int = 0, method: str = "common") -> int:
    """round(x, -10**9) computes 10**(10**9): refuse absurd precisions."""
    if abs(_index(precision)) > MAX_ROUND_DIGITS:
        raise m.over("round digits", f"precision={precision}")
    return 0


def _quadratic_bound(m: _Meter, v: Any, *args: Any, **kwargs: Any) -> int:
    """striptags and urlize take time quadratic in their input: refuse long inputs."""
    n = m.text(v)
    if n > MAX_QUADRATIC_FILTER_CHARS:
        raise m.over("quadratic filter", f"{n} characters")
    return 10 * n + 64


def _pprint_bound(m: _Meter, v: Any) -> int:
    """Upper bound on len(pformat(v)): its printed size plus one indent per level on each item's line."""
    if not m.is_container(v):
        return m.text(v)
    chars, items, depth = m.measure(v)
    return chars + items * (depth + 2)


def _list_bound(m: _Meter, v: Any) -> int:
    """list of a string is one item per character."""
    return 5 * len(v) + 2 if isinstance(v, str) else 0


# Filters that can build much more than they are given: name -> bound(meter, value, *args, **kwargs).
_FILTER_BOUNDS: dict[str, Callable[..., int]] = {
    "center": lambda m, v, width=80: max(m.text(v), _index(width)),
    "indent": _indent_bound,
    "format": lambda m, v, *args, **kwargs: _percent_bound(m, str(v), kwargs or args),
    "replace": lambda m, v, old, new, count=None: _replace_bound(str(v), old, new, count),
    "join": lambda m, v, d="", attribute=None: _join_bound(m, str(d), v) if attribute is None else 0,
    "wordwrap": lambda m, v, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
        m.text(v) * (1 + len(str(wrapstring or "\n"))) + 1,
    "batch": _batch_bound,
    "slice": lambda m, v, slices, fill_with=None: 8 * max(_index(slices), 0),
    "sum": _sum_bound,
    "round": _round_bound,
    "tojson": _tojson_bound,
    "string": lambda m, v: m.text(v),
    "pprint": _pprint_bound,
    "list": _list_bound,
    "upper": lambda m, v: 3 * m.text(v), "lower": lambda m, v: 3 * m.text(v),
    "title": lambda m, v: 3 * m.text(v), "capitalize": lambda m, v: 3 * m.text(v),
    "escape": lambda m, v: 6 * m.text(v), "e": lambda m, v: 6 * m.text(v),
    "forceescape": lambda m, v: 6 * m.text(v), "xmlattr": lambda m, v, autospace=True: 6 * m.text(v) + 2,
    "urlencode": lambda m, v: 12 * m.text(v), "urlize": _quadratic_bound, "striptags": _quadratic_bound,
}
_JINJA_CALL_KWARGS = frozenset({"_loop_vars", "_block_vars"})  # passed by generated code, removed by Context.call
_MATERIALISE = frozenset({"join", "sum"})  # filters whose (possibly lazy) input is measured before use


def _binop_bound(m: _Meter, op: str, a: Any, b: Any) -> None:
    """Refuse an operator whose result would break the value or integer budget, before computing it."""
    seqs = (str, list, tuple)
    if op == "*":
        if isinstance(a, seqs) and isinstance(b, int) or isinstance(b, seqs) and isinstance(a, int):
            seq, n = (a, b) if isinstance(a, seqs) else (b, a)
            size = len(seq) if isinstance(seq, str) else m.measure(seq)[0]
            m.allow(size * max(n, 0), f"'*' of a {type(seq).__name__}")
        elif isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise m.over("integer", "'*' of two integers")
    elif op == "+" and any(isinstance(a, t) and isinstance(b, t) for t in seqs):
        m.allow(m.text(a) + m.text(b) if isinstance(a, str) else m.measure(a)[0] + m.measure(b)[0], "'+'")
    elif op == "**" and isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0:
        if b > MAX_INT_BITS or b * a.bit_length() > MAX_INT_BITS:
            raise m.over("integer", f"'**' with exponent {b}")
    elif op == "%" and isinstance(a, str):
        m.allow(_percent_bound(m, a, b), "'%' formatting")


# --------------------------------------------------------------------------------------------------------
# The environment: jinja2's immutable sandbox with every expensive operation passing through the meter.

def _pass_arg(func: Callable) -> str | None:
    """Which jinja object a filter wants first: 'context', 'eval_context', 'environment' or None."""
    arg = getattr(func, "jinja_pass_arg", None)
    return None if arg is None else arg.name


def _budgeted_filter(name: str, func: Callable) -> Callable:
    """A filter wrapped to charge steps, pre-check its output size and check what it returns."""
    from jinja2 import pass_context

    wants = _pass_arg(func)
    bound = _FILTER_BOUNDS.get(name)

    @pass_context
    def wrapper(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        m = _meter()
        if m is not None:
            m.tick(1 + (len(value) // 64 if isinstance(value, (str, list, tuple, dict)) else 0))
            if name in _MATERIALISE and value is not None and not isinstance(value, (str, Mapping)):
                value = _sized(m, value)
            if bound is not None:
                m.allow(bound(m, value, *args, **kwargs), f"filter {name!r}")
        first = {"context": context, "eval_context": getattr(context, "eval_ctx", None),
                 "environment": getattr(context, "environment", None)}.get(wants or "", None)
        out = func(first, value, *args, **kwargs) if wants else func(value, *args, **kwargs)
        return out if m is None else m.produced(out, f"filter {name!r}")

    return wrapper


def _make_environment(budget: TemplateBudget) -> Any:
    """A fresh budgeted, immutable sandboxed environment (classes built lazily: jinja2 loads on first render)."""
    from jinja2 import nodes, pass_context
    from jinja2.compiler import CodeGenerator
    from jinja2.lexer import TokenStream
    from jinja2.runtime import LoopContext, markup_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
    from markupsafe import EscapeFormatter

    class BoundedFormatter(SandboxedFormatter):
        """str.format in the sandbox, each field measured before it is formatted."""

        def __init__(self, env: Any, meter: _Meter, **kwargs: Any) -> None:
            super().__init__(env, **kwargs)
            self.meter, self.total = meter, 0

        def format_field(self, value: Any, format_spec: str) -> Any:
            self.meter.tick()
            self.total += _spec_bound(self.meter, value, format_spec)
            self.meter.allow(self.total, "str.format")
            return super().format_field(value, format_spec)

        def convert_field(self, value: Any, conversion: str | None) -> Any:
            if conversion in ("r", "a"):
                self.meter.allow(12 * self.meter.text(value) + 2, "str.format !r")
            return super().convert_field(value, conversion)

    class BoundedEscapeFormatter(BoundedFormatter, EscapeFormatter):
        """The same for Markup strings (arguments escaped)."""

    class Generator(CodeGenerator):
        """Code generation routing `~` and container literals through the meter."""

        def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
            self.write("environment.qf_concat(context, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def _literal(self, node: nodes.Expr, frame: Any, visit: Callable) -> None:
            """Wrap a container literal in environment.qf_literal(...)."""
            if getattr(node, "ctx", "load") != "load":
                return visit(self, node, frame)
            self.write("environment.qf_literal(")
            visit(self, node, frame)
            self.write(")")

        def visit_List(self, node: nodes.List, frame: Any) -> None:
            self._literal(node, frame, CodeGenerator.visit_List)

        def visit_Tuple(self, node: nodes.Tuple, frame: Any) -> None:
            self._literal(node, frame, CodeGenerator.visit_Tuple)

        def visit_Dict(self, node: nodes.Dict, frame: Any) -> None:
            self._literal(node, frame, CodeGenerator.visit_Dict)

    class Environment(ImmutableSandboxedEnvironment):
        """ImmutableSandboxedEnvironment metering calls, operators, lookups, loops, literals and output."""

        code_generator_class = Generator
        intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])
        intercepted_unops = frozenset(["+", "-"])

        def _tokenize(self, source: str, name: str | None, filename: str | None = None,
                      state: str | None = None) -> TokenStream:
            stream = super()._tokenize(source, name, filename, state)
            return TokenStream(_counted_tokens(stream, budget), name, filename)

        def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
            tree = super()._parse(source, name, filename)
            for loop in _checked_loops(tree, budget):
                loop.iter = nodes.Filter(loop.iter, "qf:loop", [], [], None, None, lineno=loop.lineno)
            return tree

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            m = _meter()
            if m is None:
                return super().call(__context, __obj, *args, **kwargs)
            m.tick()
            if isinstance(__obj, LoopContext) and args:
                args = (m.metered(args[0]), *args[1:])
            owner = getattr(__obj, "__self__", None)
            bound = _STR_METHOD_BOUNDS.get(getattr(__obj, "__name__", "")) if isinstance(owner, str) else None
            if bound is not None:
                if __obj.__name__ == "join" and args:
                    args = (_sized(m, args[0]), *args[1:])
                public = {k: v for k, v in kwargs.items() if k not in _JINJA_CALL_KWARGS}
                m.allow(bound(m, owner, *args, **public), f"str.{__obj.__name__}")
            m.enter()
            try:
                out = super().call(__context, __obj, *args, **kwargs)
            finally:
                m.leave()
            return m.produced(out, f"a call to {getattr(__obj, '__name__', type(__obj).__name__)}")

        def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
            m = _meter()
            if m is not None:
                m.tick()
                _binop_bound(m, operator_, left, right)
            out = self.binop_table[operator_](left, right)
            return out if m is None else m.produced(out, f"operator {operator_!r}")

        def getattr(self, obj: Any, attribute: str) -> Any:
            m = _meter()
            if m is not None:
                m.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            m = _meter()
            if m is not None:
                m.tick()
            return super().getitem(obj, argument)

        def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
            if super().wrap_str_format(value) is None:
                return None
            return _bounded_str_format(self, value, BoundedFormatter, BoundedEscapeFormatter)

        def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
            parts = list(parts)
            m = _meter()
            if m is not None:
                n = sum(map(len, parts))
                m.allow(n, "a block of template output")
                m.charge(n)
            return "".join(parts)

        def qf_concat(self, context: Any, parts: tuple) -> str:
            """The `~` operator: measured before it is joined (escaping inside {% autoescape true %})."""
            m = _meter()
            if m is not None:
                m.tick()
                m.allow(sum(m.text(p) for p in parts), "'~'")
            out = markup_join(parts) if context.eval_ctx.autoescape else "".join(map(str, parts))
            if m is not None:
                m.charge(len(out))
            return out

        def qf_literal(self, value: Any) -> Any:
            """A list, tuple or dict literal: measured like any built value."""
            m = _meter()
            return value if m is None else m.produced(value, "a literal")

    @pass_context
    def finalize(context: Any, value: Any) -> Any:
        """Output of {{ ... }}: anything but a string is measured before str() prints it."""
        m = _meter()
        if m is not None and not isinstance(value, str):
            n = m.text(value)
            m.allow(n, "printed value")
            m.charge(n)
        return value

    @pass_context
    def loop_filter(context: Any, iterable: Any) -> Any:
        """What a {% for %} iterates: one step per item."""
        m = _meter()
        return iterable if m is None else m.metered(iterable)

    env = Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False, finalize=finalize)
    env.optimized = False  # no constant folding at compile time
    env.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs; no chat template uses it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    for name, func in list(env.filters.items()):
        env.filters[name] = _budgeted_filter(name, func)
    env.filters["qf:loop"] = loop_filter
    return env


def _bounded_str_format(env: Any, method: Any, plain: type, escaping: type) -> Callable[..., str]:
    """str.format / str.format_map of a sandboxed string, with every field measured."""
    from jinja2.sandbox import SandboxedEnvironment
    from markupsafe import Markup

    fmt_self, is_map = method.__self__, method.__name__ == "format_map"

    def wrapper(*args: Any, **kwargs: Any) -> str:
        m = _meter()
        if m is None:
            return SandboxedEnvironment.wrap_str_format(env, method)(*args, **kwargs)
        if is_map:
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one positional argument")
            args, kwargs = (), args[0]
        formatter = escaping(env, m, escape=fmt_self.escape) if isinstance(fmt_self, Markup) else plain(env, m)
        return type(fmt_self)(formatter.vformat(fmt_self, args, kwargs))

    return wrapper


def _counted_tokens(stream: Iterable, budget: TemplateBudget) -> Iterator:
    """The lexer's tokens, stopping once the source has more than the token budget."""
    for n, token in enumerate(stream):
        if n >= budget.max_source_tokens:
            raise _over(budget, "tokens")
        yield token


def _checked_loops(tree: Any, budget: TemplateBudget) -> list:
    """The template's {% for %} nodes, after checking its syntax tree nests at most MAX_NESTING deep."""
    from jinja2 import nodes

    loops, stack = [], [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise _over(budget, "nesting")
        if isinstance(node, nodes.For):
            loops.append(node)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return loops


# --------------------------------------------------------------------------------------------------------

class ChatTemplate:
    """A sandboxed chat template: compiled on first render, every render under its TemplateBudget."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 budget: TemplateBudget | None = None) -> None:
        self.budget = budget if budget is not None else TemplateBudget.from_env()
        if not isinstance(source, str):
            raise ChatTemplateError(f"tokenizer.chat_template: expected a string, got {type(source).__name__}")
        if len(source) > self.budget.max_source_chars:
            raise _over(self.budget, "source", f"{len(source)} characters")
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._template: Any = None
        self._error: ChatTemplateError | None = None  # why compiling failed (not retried on every render)
        self._lock = threading.Lock()

    @property
    def compiled(self) -> bool:
        """Whether the template has been compiled (loading a model never does it)."""
        return self._template is not None

    def compile(self) -> None:
        """Compile now (render does it on first use); a template that does not compile raises ChatTemplateError."""
        with self._lock:
            if self._template is None and self._error is None:
                try:
                    self._template = _compiled(self.source, self.budget)
                except ChatTemplateError as e:
                    self._error = e
            if self._error is not None:
                raise self._error.with_traceback(None)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for a conversation; any failure, refusal or exhausted budget raises ChatTemplateError."""
        from jinja2.sandbox import SecurityError

        _check_messages(messages)
        self.compile()
        ctx = {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt,
               "bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        meter = _Meter(self.budget)
        token = _METER.set(meter)
        try:
            return self._render_bounded(ctx, meter)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"tokenizer.chat_template tried an unsafe operation (refused): "
                                    f"{_shorten(str(e))}") from e
        except _TemplateRaised as e:
            raise ChatTemplateError(f"tokenizer.chat_template rejected the conversation: {e}") from e
        except RecursionError as e:
            raise meter.over("depth", "Python's recursion limit was reached") from e
        except Exception as e:  # any failure of untrusted code is the template's
            raise ChatTemplateError(f"tokenizer.chat_template failed: {type(e).__name__}: {_shorten(str(e))}") from e
        finally:
            _METER.reset(token)
            meter.memo.clear()

    def _render_bounded(self, ctx: dict[str, Any], meter: _Meter) -> str:
        """Render chunk by chunk, stopping a runaway template before it fills memory."""
        parts, size, limit = [], 0, self.budget.max_output_chars
        for chunk in self._template.generate(**ctx):
            meter.tick()
            size += len(chunk)
            if size > limit:
                raise meter.over("output")
            parts.append(chunk)
        return "".join(parts)


def _compiled(source: str, budget: TemplateBudget) -> Any:
    """The jinja2 Template of a source, in a fresh budgeted environment; ChatTemplateError when it cannot be."""
    env = _make_environment(budget)
    try:
        return env.from_string(source)
    except ChatTemplateError:
        raise
    except RecursionError as e:
        raise _over(budget, "nesting", "the parser ran out of Python stack") from e
    except Exception as e:  # any failure of untrusted source is the template's
        raise ChatTemplateError(f"tokenizer.chat_template does not compile: {type(e).__name__}: "
                                f"{_shorten(str(e))}") from e


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Each message is a mapping with a string role and string content."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} must be a mapping with string 'role' and 'content'")


def chat_template_from_metadata(meta: Any, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """The file's template (tokenizer.chat_template), or ChatML when the file has none; compiled on first render."""
    key = "tokenizer.chat_template"
    source = str(meta.get_str(key)) if key in meta else CHATML_TEMPLATE
    return ChatTemplate(source, bos_token, eos_token)
