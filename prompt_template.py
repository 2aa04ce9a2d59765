"""The system prompt as a template: `{{ name }}` placeholders filled from the
conversation's variables at each turn.

Templates run in Jinja2's `SandboxedEnvironment` (no attribute tricks, no
code from user data; never `str.format` or `eval`). A placeholder with no
variable renders empty and is reported. Strings render as themselves,
other values as JSON.

Any client may set a system prompt, and it renders inside a turn, on the
worker's event loop. The sandbox keeps a template from reaching Python, not
from taking the worker's time or memory, so the language is cut to what a
prompt needs (expressions, `if`, `for` and the filters in `FILTERS`; no
calls, macros or assignments) and every render is bounded: at most
`RENDER_SECONDS` of work and `RENDERED_MAX_CHARS` characters, checked at
each loop step, `+ * % **`, attribute and item access, filter and piece
of output.
"""
from __future__ import annotations

import contextvars
import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import ChainableUndefined, TemplateError, Undefined, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from errors import ApiError

RENDER_SECONDS = 0.25
RENDERED_MAX_CHARS = 1_000_000
# Filters whose work is about the size of their input, and that take no
# argument that could multiply it (`join`'s separator is checked instead).
FILTERS = frozenset({
    "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float", "int",
    "items", "join", "last", "length", "list", "lower", "max", "min", "reverse", "round", "sort",
    "string", "sum", "title", "tojson", "trim", "unique", "upper", "wordcount",
})
# Template nodes a prompt may use; anything else (calls, {% set %}, macros,
# blocks, includes, ...) is refused when the prompt is set.
_ALLOWED = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.For,
    nodes.Name, nodes.Const, nodes.List, nodes.Tuple, nodes.Dict, nodes.Pair, nodes.Keyword,
    nodes.Getattr, nodes.Getitem, nodes.Slice, nodes.Test, nodes.CondExpr, nodes.Filter,
    nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos, nodes.Compare, nodes.Operand, nodes.Concat,
    nodes.Add, nodes.Sub, nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod, nodes.Pow,
)
_REFUSED_NAMES = {
    nodes.Call: "calls", nodes.Assign: "{% set %}", nodes.AssignBlock: "{% set %}", nodes.Macro: "macros",
    nodes.CallBlock: "{% call %}", nodes.FilterBlock: "{% filter %}", nodes.With: "{% with %}",
    nodes.Include: "{% include %}", nodes.Import: "{% import %}", nodes.FromImport: "{% import %}",
    nodes.Extends: "{% extends %}", nodes.Block: "{% block %}", nodes.Scope: "{% autoescape %}",
    nodes.ScopedEvalContextModifier: "{% autoescape %}",
}
_POWER_MAX_BITS = 4096

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("template_deadline", default=float("inf"))


class SystemPromptError(ApiError):
    status = 422
    error = "system_prompt_error"


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise SecurityError(f"rendering took longer than {RENDER_SECONDS} s")


def _check_size(chars: int) -> None:
    if chars > RENDERED_MAX_CHARS:
        raise SecurityError(f"a value of more than {RENDERED_MAX_CHARS:,} characters")


def _chars(value: Any, seen: dict[int, int] | None = None) -> int:
    """About how many characters a value renders to, as text or JSON, counted without rendering it.

    A list that holds one list many times (`[[s] * 20] * 20`) is counted once per distinct list.
    """
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if not isinstance(value, list | tuple | dict):
        return 24
    seen = {} if seen is None else seen
    if id(value) not in seen:
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        seen[id(value)] = 2 + sum(_chars(item, seen) + 2 for item in items)
    return seen[id(value)]


def _is_text_or_list(value: Any) -> bool:
    return isinstance(value, str | list | tuple)


class _BoundedEnvironment(SandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "+" and _is_text_or_list(left):
            _check_size(_chars(left) + _chars(right))
        elif operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if _is_text_or_list(sequence) and isinstance(times, int):
                    _check_size(_chars(sequence) * times)
        elif operator == "%" and isinstance(left, str):
            raise SecurityError("% formatting of text is not available; use ~ to join text")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and left.bit_length() * right > _POWER_MAX_BITS:
                raise SecurityError(f"a power of more than {_POWER_MAX_BITS} bits")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)


def _finalize(value: Any) -> Any:
    if isinstance(value, str | Undefined):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _timed(function: Callable) -> Callable:
    @functools.wraps(function)  # keeps Jinja's pass_* marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        return function(*args, **kwargs)

    return checked


def _loop(items: Any) -> Iterator[Any]:
    """Every `for` loop's items, checking the time at each step."""
    for item in items:
        _check_time()
        yield item


def _concat(parts: Iterable[Any]) -> str:
    """`a ~ b ~ c`, refused before it is built when it would be too long."""
    texts, chars = [], 0
    for part in parts:
        chars += _chars(part)
        _check_size(chars)
        texts.append(str(part))
    return "".join(texts)


# The filters below take an argument that could multiply their work or their
# output: each is checked before the filter runs. The signatures are Jinja's.

def _limit_join(join: Callable) -> Callable:
    @functools.wraps(join)
    def checked(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
        value, seen = list(value), {}
        _check_size(sum(_chars(item, seen) for item in value) + len(str(d)) * len(value))
        return join(eval_ctx, value, d, attribute)

    return checked


def _limit_sum(do_sum: Callable) -> Callable:
    @functools.wraps(do_sum)
    def checked(environment: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
        if not isinstance(start, int | float):  # summing lists or text copies them over and over
            raise SecurityError("sum adds numbers only")
        return do_sum(environment, iterable, attribute, start)

    return checked


def _limit_tojson(tojson: Callable) -> Callable:
    @functools.wraps(tojson)
    def checked(eval_ctx: Any, value: Any, indent: int | None = None) -> Any:
        if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 8):
            raise SecurityError("tojson's indent is at most 8")
        _check_size(_chars(value))
        return tojson(eval_ctx, value, indent)

    return checked


def _limit_trim(trim: Callable) -> Callable:
    @functools.wraps(trim)
    def checked(value: Any, chars: str | None = None) -> str:
        if chars is not None and len(str(chars)) > 100:
            raise SecurityError("trim takes at most 100 characters to remove")
        return trim(value, chars)

    return checked


def _unlimited(function: Callable) -> Callable:
    return function


_LIMITS = {"join": _limit_join, "sum": _limit_sum, "tojson": _limit_tojson, "trim": _limit_trim}


@functools.cache
def _environment() -> _BoundedEnvironment:
    environment = _BoundedEnvironment(undefined=ChainableUndefined, finalize=_finalize, autoescape=False, keep_trailing_newline=True)
    builtin = environment.filters
    environment.filters = {name: _timed(_LIMITS.get(name, _unlimited)(builtin[name])) for name in FILTERS}
    environment.filters["parley_loop"] = _loop
    environment.filters["parley_concat"] = _concat
    environment.globals.clear()  # range, dict, lipsum, cycler, joiner, namespace: nothing to call
    return environment


def _bounded(tree: nodes.Template) -> nodes.Template:
    """Refuse what a prompt may not use; route loops and `~` through their checks."""
    for node in tree.find_all(nodes.Node):
        if not isinstance(node, _ALLOWED):
            what = _REFUSED_NAMES.get(type(node), type(node).__name__)
            raise SecurityError(f"{what} is not available in a system prompt (use expressions, filters, if and for)")
        if isinstance(node, nodes.For) and node.recursive:
            raise SecurityError("recursive loops are not available in a system prompt")
        if isinstance(node, nodes.Filter) and node.name not in FILTERS:
            raise SecurityError(f"the filter {node.name!r} is not available in a system prompt")
    for loop in list(tree.find_all(nodes.For)):
        loop.iter = nodes.Filter(loop.iter, "parley_loop", [], [], None, None, lineno=loop.lineno)
    for parent in [tree, *tree.find_all(nodes.Node)]:
        for field in parent.fields:
            child = getattr(parent, field)
            if isinstance(child, nodes.Concat):
                setattr(parent, field, _as_filter(child))
            elif isinstance(child, list):  # in place: a List made from a Concat shares its list
                child[:] = [_as_filter(item) if isinstance(item, nodes.Concat) else item for item in child]
    return tree


def _as_filter(concat: nodes.Concat) -> nodes.Filter:
    return nodes.Filter(nodes.List(concat.nodes, lineno=concat.lineno), "parley_concat", [], [], None, None, lineno=concat.lineno)


@functools.lru_cache(maxsize=512)
def _compiled(source: str):
    """The template and the names it reads, compiled once per distinct prompt."""
    environment = _environment()
    tree = environment.parse(source)
    names = frozenset(meta.find_undeclared_variables(tree))
    return environment.from_string(_bounded(tree)), names


def check_template(source: str) -> None:
    """400 when a system prompt is not a valid template (checked when it is set)."""
    try:
        _compiled(source)
    except TemplateError as exc:
        raise ApiError(f"system_prompt is not a valid template: {exc.message}") from None
    except RecursionError:
        raise ApiError("system_prompt is not a valid template: it nests too deeply") from None


def render_system_prompt(source: str | None, variables: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The prompt with its placeholders filled, and the names that had no variable."""
    if not source or ("{{" not in source and "{%" not in source):
        return source, []
    token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        template, names = _compiled(source)
        pieces, chars = [], 0
        for piece in template.generate(dict(variables)):
            chars += len(piece)
            _check_size(chars)
            _check_time()
            pieces.append(piece)
    except (TemplateError, ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as exc:
        raise SystemPromptError(f"the system prompt could not be rendered: {exc.__class__.__name__}: {exc}") from None
    finally:
        _deadline.reset(token)
    return "".join(pieces), sorted(names - set(variables))
