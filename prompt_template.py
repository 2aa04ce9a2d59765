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
calls, macros or assignments) and every render is bounded:
- time: at most `RENDER_SECONDS`, checked at each loop step, operator,
  comparison, test, attribute or item lookup, filter and piece of output;
- size: every value an operator, filter, literal list or the output is
  given is at most `RENDERED_MAX_CHARS` characters as it would render,
  counted before it is used, so no step makes more than a few times that;
- numbers: arithmetic takes integers of at most `INTEGER_MAX_BITS` bits;
- items: filters that sort, compare or collect items take at most
  `FILTER_MAX_ITEMS` of them.
Jinja's optimizer is off (its constant folding costs the cube of a filter
chain's length), and what Jinja still evaluates while compiling is under
the same bounds.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import ChainableUndefined, TemplateError, Undefined, nodes
from jinja2.exceptions import SecurityError
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext
from jinja2.sandbox import SandboxedEnvironment

from errors import ApiError

RENDER_SECONDS = 0.25
RENDERED_MAX_CHARS = 400_000
INTEGER_MAX_BITS = 65_536
POWER_MAX_BITS = 4096
# Parsing is paid once per prompt (and once per worker); generating and
# compiling its code grows with this.
TEMPLATE_MAX_ELEMENTS = 5000
# The lexer's tokens (whitespace included) are counted first, at a sixth of
# the parser's cost, so that a prompt far over the limit is refused sooner:
# an element is rarely more than four tokens (`{{ name }}` is five for two).
TEMPLATE_MAX_TOKENS = 10 * TEMPLATE_MAX_ELEMENTS
# Sorting or collecting the characters of a 400,000-character text makes an
# object of each (about 100 MB and a second for `sort`); no prompt needs it.
FILTER_MAX_ITEMS = 20_000
_ITEM_FILTERS = frozenset({"dictsort", "join", "list", "max", "min", "reverse", "sort", "sum", "unique"})
# Filters whose work and output are about the size of their input; the few
# arguments that could multiply them are checked (`_LIMITS`).
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
# What a prompt may not even be parsed into (a number of 5,000 digits, too many parentheses).
_UNPARSABLE = (TemplateError, RecursionError, SyntaxError, ValueError, OverflowError, MemoryError)

# All the values one render makes (texts joined, filters' results, slices,
# lists and texts added or repeated), in characters: many values each under
# the limit are bounded together.
RENDER_MADE_MAX_CHARS = 10 * RENDERED_MAX_CHARS

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("template_deadline", default=float("inf"))
_made: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("template_made", default=None)


class SystemPromptError(ApiError):
    status = 422
    error = "system_prompt_error"


@contextlib.contextmanager
def _bounds() -> Iterator[None]:
    """A fresh allowance of time and of values made, for one compile or one render."""
    deadline, made = _deadline.set(time.monotonic() + RENDER_SECONDS), _made.set([0])
    try:
        yield
    finally:
        _deadline.reset(deadline)
        _made.reset(made)


def _render_error(exc: Exception) -> SystemPromptError:
    said = re.sub(r"\bjinja2\.\w+\.", "", str(exc))  # "'jinja2.runtime.LoopContext object' has no attribute ..."
    return SystemPromptError(f"the system prompt could not be rendered: {exc.__class__.__name__}: {said}")


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise SecurityError(f"rendering took longer than {RENDER_SECONDS} s")


def _check_size(chars: int) -> None:
    if chars > RENDERED_MAX_CHARS:
        raise SecurityError(f"a value of more than {RENDERED_MAX_CHARS:,} characters")


def _checked(value: Any) -> Any:
    """A value about to be used: within the time and the size."""
    _check_time()
    _check_size(_chars(value))
    return value


def _made_value(value: Any) -> Any:
    """A value the render just made: within the time and the size, and counted against all it makes."""
    _check_time()
    chars = _chars(value)
    _check_size(chars)
    made = _made.get()
    if made is not None:
        made[0] += chars
        if made[0] > RENDER_MADE_MAX_CHARS:
            raise SecurityError(f"the values made while rendering came to more than {RENDER_MADE_MAX_CHARS:,} characters")
    return value


def _text(value: Any) -> str:
    """A value as text where Jinja would use str(): a list or a dict as JSON, as the output shows it."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, default=lambda _: None)
    return str(_plain(value))


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


def _plain(value: Any) -> Any:
    """A value as a template may see it: data, or None for one of Jinja's own objects (`loop`, `self`)."""
    if isinstance(value, str | int | float | list | tuple | dict | Undefined) or value is None:
        return value
    return None


def _check_integers(*values: Any) -> None:
    for value in values:
        if isinstance(value, int) and value.bit_length() > INTEGER_MAX_BITS:
            raise SecurityError(f"an integer of more than {INTEGER_MAX_BITS:,} bits")


class _BoundedEnvironment(SandboxedEnvironment):
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        _check_integers(left, right)
        if operator == "+" and isinstance(left, str | list | tuple):
            _check_size(_chars(left) + _chars(right))
        elif operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(times, int):
                    _check_size(_chars(sequence) * times)
        elif operator == "%" and isinstance(left, str):
            raise SecurityError("% formatting of text is not available; use ~ to join text")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and left.bit_length() * right > POWER_MAX_BITS:
                raise SecurityError(f"a power of more than {POWER_MAX_BITS} bits")
        result = super().call_binop(context, operator, left, right)
        return _made_value(result) if isinstance(result, str | list | tuple) else result

    def getattr(self, obj: Any, attribute: str) -> Any:
        """`plan.tier` reads data; a method (`name.upper`, `plan.items`) is nothing, as calls are refused."""
        _check_time()
        value = super().getattr(obj, attribute)
        if callable(value) and not isinstance(value, Undefined):
            return self.getitem(obj, attribute) if isinstance(obj, dict) else self.undefined(obj=obj, name=attribute)
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        value = super().getitem(obj, argument)
        if callable(value) and not isinstance(value, Undefined):
            return self.undefined(obj=obj, name=str(argument))
        return value


def _finalize(value: Any) -> Any:
    if isinstance(value, str | Undefined):
        return value
    _checked(value)
    return json.dumps(value, ensure_ascii=False, default=lambda _: None)  # a Jinja object renders as null


def _timed(name: str, function: Callable) -> Callable:
    """A filter that first checks the time and the size of the value it is given."""
    data = 1 if hasattr(function, "jinja_pass_arg") else 0  # after the context or environment Jinja passes

    @functools.wraps(function)  # keeps Jinja's pass_* marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        value = _checked(_plain(args[data]))
        if name in _TEXT_FILTERS and isinstance(value, list | tuple | dict):
            value = _text(value)
        if name in _ITEM_FILTERS and isinstance(value, str | list | tuple | dict) and len(value) > FILTER_MAX_ITEMS:
            raise SecurityError(f"{name} takes at most {FILTER_MAX_ITEMS:,} items")
        if name == "unique":  # its set may meet integers that share a hash: each step is timed
            value = _loop(value)
        result = function(*args[:data], value, *args[data + 1:], **kwargs)
        if isinstance(result, Iterator) and not isinstance(result, LoopContext):  # items, unique, reverse
            result = list(result)  # a list, not a generator's name
        return _made_value(_plain(result))

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
        _check_time()
        chars += _chars(part)
        _check_size(chars)
        texts.append(_text(part))
    return _made_value("".join(texts))


# The filters below take an argument that could multiply their work or their
# output: each is checked before the filter runs. The signatures are Jinja's.

def _limit_join(join: Callable) -> Callable:
    @functools.wraps(join)
    def checked(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
        value, seen = list(value), {}
        if attribute is not None:
            value = list(map(make_attrgetter(eval_ctx.environment, attribute), value))
        _check_size(sum(_chars(item, seen) for item in value) + len(str(d)) * len(value))
        return join(eval_ctx, [_text(_plain(item)) for item in value], d)

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
        if indent is not None:  # each level of a deep value would repeat it on every line
            raise SecurityError("tojson takes no indent in a system prompt")
        return tojson(eval_ctx, value)

    return checked


def _limit_int(do_int: Callable) -> Callable:
    @functools.wraps(do_int)
    def checked(value: Any, default: int = 0, base: int = 10) -> int:
        number = do_int(value, default, base)  # bases 2, 4, 8, 16, 32 skip Python's digit limit
        _check_integers(number)
        return number

    return checked


def _limit_trim(trim: Callable) -> Callable:
    @functools.wraps(trim)
    def checked(value: Any, chars: str | None = None) -> str:
        if chars is not None and len(str(chars)) > 100:
            raise SecurityError("trim takes at most 100 characters to remove")
        return trim(value, chars)

    return checked


def _limit_round(do_round: Callable) -> Callable:
    @functools.wraps(do_round)
    def checked(value: Any, precision: Any = 0, method: str = "common") -> Any:
        if not (isinstance(precision, int) and -100 <= precision <= 100):
            raise SecurityError("round's precision is between -100 and 100")
        return do_round(value, precision, method)

    return checked


def _unlimited(function: Callable) -> Callable:
    return function


# Filters that make text of their value: a list or a dict is given to them as its JSON.
_TEXT_FILTERS = frozenset({"capitalize", "e", "escape", "lower", "string", "title", "trim", "upper", "wordcount"})

_LIMITS = {
    "int": _limit_int, "join": _limit_join, "round": _limit_round, "sum": _limit_sum, "tojson": _limit_tojson, "trim": _limit_trim,
}


@functools.cache
def _environment() -> _BoundedEnvironment:
    environment = _BoundedEnvironment(
        undefined=ChainableUndefined, finalize=_finalize, autoescape=False, keep_trailing_newline=True, optimized=False
    )
    builtin = environment.filters
    environment.filters = {name: _timed(name, _LIMITS.get(name, _unlimited)(builtin[name])) for name in FILTERS}
    environment.filters["parley_loop"] = _loop
    environment.filters["parley_concat"] = _concat
    environment.filters["parley_checked"] = _checked
    environment.filters["parley_made"] = _made_value
    environment.globals.clear()  # range, dict, lipsum, cycler, joiner, namespace: nothing to call
    return environment


def _bounded(tree: nodes.Template) -> nodes.Template:
    """Refuse what a prompt may not use; route loops, `~`, literals, comparisons and tests through their checks."""
    elements = [tree, *tree.find_all(nodes.Node)]
    if len(elements) > TEMPLATE_MAX_ELEMENTS:
        raise SecurityError(f"a system prompt has at most {TEMPLATE_MAX_ELEMENTS:,} template elements; this one has {len(elements):,}")
    for node in elements:
        if not isinstance(node, _ALLOWED):
            what = _REFUSED_NAMES.get(type(node), type(node).__name__)
            raise SecurityError(f"{what} is not available in a system prompt (use expressions, filters, if and for)")
        if isinstance(node, nodes.For) and node.recursive:
            raise SecurityError("recursive loops are not available in a system prompt")
        if isinstance(node, nodes.Filter) and node.name not in FILTERS:
            raise SecurityError(f"the filter {node.name!r} is not available in a system prompt")
        if isinstance(node, nodes.Const) and isinstance(node.value, float) and not math.isfinite(node.value):
            raise SecurityError("a number too large for a float (such as 1e400)")
        if isinstance(node, nodes.Mod) and isinstance(node.left, nodes.Const) and isinstance(node.left.value, str):
            raise SecurityError("% formatting of text is not available; use ~ to join text")
    for parent in elements:
        for field in parent.fields:
            child = getattr(parent, field)
            if isinstance(child, nodes.Node):
                setattr(parent, field, _through_check(child))
            elif isinstance(child, list):  # in place: a List made from a Concat shares its list
                child[:] = [_through_check(item) if isinstance(item, nodes.Node) else item for item in child]
    for loop in list(tree.find_all(nodes.For)):
        loop.iter = _filtered(loop.iter, "parley_loop")
    return tree


def _through_check(node: nodes.Node) -> nodes.Node:
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):  # compiled as a plain subscript
        return _filtered(node, "parley_made")
    if isinstance(node, nodes.Concat):
        return _filtered(nodes.List(node.nodes, lineno=node.lineno), "parley_concat")
    if isinstance(node, nodes.List | nodes.Dict | nodes.Compare | nodes.Test) or (
        isinstance(node, nodes.Tuple) and node.ctx == "load"
    ):
        return _filtered(node, "parley_checked")
    return node


def _filtered(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


@functools.lru_cache(maxsize=512)
def _compiled(source: str):
    """The template and the names it reads, compiled once per distinct prompt.

    Jinja evaluates filters on constants while it compiles (`{{ 1|round }}`):
    that is timed too, and what runs out of time is left to the render.
    """
    environment = _environment()
    with _bounds():
        for count, _token in enumerate(environment.lex(source), 1):
            if count > TEMPLATE_MAX_TOKENS:
                raise SecurityError(f"a system prompt has at most {TEMPLATE_MAX_ELEMENTS:,} template elements")
        tree = _bounded(environment.parse(source))
        return environment.from_string(tree), frozenset(_names_read(tree))


def _names_read(node: nodes.Node, bound: frozenset[str] = frozenset()) -> Iterator[str]:
    """The variables a template reads (what `jinja2.meta.find_undeclared_variables` finds,
    without the optimizer it runs). A loop binds its targets, and `loop`, in its body."""
    if isinstance(node, nodes.Name):
        if node.ctx == "load" and node.name not in bound:
            yield node.name
        return
    if isinstance(node, nodes.For):
        named = [node.target, *node.target.find_all(nodes.Name)]  # `item`, or the names of `(k, v)`
        targets = bound | {name.name for name in named if isinstance(name, nodes.Name)}
        yield from _names_read(node.iter, bound)
        if node.test is not None:
            yield from _names_read(node.test, targets)
        for child in node.body:
            yield from _names_read(child, targets | {"loop"})
        for child in node.else_:
            yield from _names_read(child, bound)
        return
    for child in node.iter_child_nodes():
        yield from _names_read(child, bound)


def check_template(source: str) -> None:
    """400 when a system prompt is not a valid template (checked when it is set)."""
    try:
        _compiled(source)
    except _UNPARSABLE as exc:
        reason = exc.message if isinstance(exc, TemplateError) else f"{exc.__class__.__name__} while reading it"
        if isinstance(exc, ValueError) and "digits" in str(exc):  # Python's limit on an integer literal
            reason = f"a number of more than {sys.get_int_max_str_digits():,} digits"
        raise ApiError(f"system_prompt is not a valid template: {reason}") from None


def render_system_prompt(source: str | None, variables: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The prompt with its placeholders filled, and the names that had no variable."""
    if not source or ("{{" not in source and "{%" not in source):
        return source, []
    try:
        template, names = _compiled(source)
    except _UNPARSABLE as exc:  # a prompt stored before these rules
        raise _render_error(exc) from None
    pieces, chars = [], 0
    try:
        with _bounds():
            for piece in template.generate(dict(variables)):
                chars += len(piece)
                _check_size(chars)
                _check_time()
                pieces.append(piece)
    except Exception as exc:  # the template is the client's code: whatever it raises is its error
        raise _render_error(exc) from None
    return _unicode("".join(pieces)), sorted(names - set(variables))


def _unicode(rendered: str) -> str:
    """The text, with a pair of surrogates written as two escapes (`"\ud83d\ude00"`) made the character they stand for."""
    try:
        rendered.encode("utf-8")
        return rendered
    except UnicodeEncodeError:
        pass
    try:
        return rendered.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:  # a lone one ("\ud800"): no model or log could take the text
        raise SystemPromptError("the system prompt renders a lone surrogate, which is not valid Unicode") from None
