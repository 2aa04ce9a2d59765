"""The system prompt as a template: `{{ name }}` placeholders filled from the
conversation's variables at each turn.

Templates run in Jinja2's `SandboxedEnvironment` (no attribute tricks, no
code from user data; never `str.format` or `eval`). A placeholder with no
variable renders empty and is reported. Strings render as themselves,
other values as JSON.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from jinja2 import ChainableUndefined, TemplateError, Undefined, meta
from jinja2.sandbox import SandboxedEnvironment

from errors import ApiError


class SystemPromptError(ApiError):
    status = 422
    error = "system_prompt_error"


def _finalize(value: Any) -> Any:
    if isinstance(value, str | Undefined):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


@functools.cache
def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=ChainableUndefined, finalize=_finalize, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=512)
def _compiled(source: str):
    """The template and the names it reads, compiled once per distinct prompt."""
    environment = _environment()
    return environment.from_string(source), frozenset(meta.find_undeclared_variables(environment.parse(source)))


def check_template(source: str) -> None:
    """400 when a system prompt is not a valid template (checked when it is set)."""
    try:
        _compiled(source)
    except TemplateError as exc:
        raise ApiError(f"system_prompt is not a valid template: {exc.message}") from None


def render_system_prompt(source: str | None, variables: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The prompt with its placeholders filled, and the names that had no variable."""
    if not source or ("{{" not in source and "{%" not in source):
        return source, []
    try:
        template, names = _compiled(source)
        text = template.render(dict(variables))
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
        raise SystemPromptError(f"the system prompt could not be rendered: {exc.__class__.__name__}: {exc}") from None
    return text, sorted(names - set(variables))
