"""Session variables: a conversation's named JSON values, read and set by
the client app (the system prompt's placeholders use them: prompt_template.py).
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from auth import Caller
from conversations import visible_conversation
from database_utils import Conversation, add_audit
from errors import ApiError, Conflict, NotFound, PayloadTooLarge
from schemas import MAX_JSON_DEPTH, VARIABLE_NAME_PATTERN, holds_nul, too_deep
from states import Role, Status

_NAME = re.compile(VARIABLE_NAME_PATTERN)


def get_variables(session: Session, viewer: Caller, conversation_id: uuid.UUID) -> Conversation:
    conversation = visible_conversation(session, viewer, conversation_id)
    if viewer.role == Role.STAFF:
        add_audit(session, viewer, "read_variables", conversation_id)
    return conversation


def get_variable(session: Session, viewer: Caller, conversation_id: uuid.UUID, name: str) -> Any:
    variables = get_variables(session, viewer, conversation_id).variables
    if name not in variables:
        raise NotFound(f"conversation {conversation_id} has no variable {name}")
    return variables[name]


def set_variables(
    session: Session, settings: Mapping[str, Any], viewer: Caller, conversation_id: uuid.UUID, values: Mapping[str, Any]
) -> dict[str, Any]:
    """Set several variables in one transaction (all or none); the caller commits."""
    for name, value in values.items():
        _check(settings, name, value)
    conversation = _writable(session, viewer, conversation_id)
    variables = {**conversation.variables, **values}
    if len(variables) > settings["VARIABLES_MAX_COUNT"]:
        session.rollback()
        raise PayloadTooLarge(f"a conversation has at most VARIABLES_MAX_COUNT={settings['VARIABLES_MAX_COUNT']} variables")
    conversation.variables = variables
    flag_modified(conversation, "variables")
    return variables


def delete_variable(session: Session, viewer: Caller, conversation_id: uuid.UUID, name: str) -> None:
    conversation = _writable(session, viewer, conversation_id)
    if name not in conversation.variables:
        session.rollback()
        raise NotFound(f"conversation {conversation_id} has no variable {name}")
    conversation.variables = {key: value for key, value in conversation.variables.items() if key != name}


def _writable(session: Session, viewer: Caller, conversation_id: uuid.UUID) -> Conversation:
    """The conversation, locked until commit so concurrent writes do not lose each other's variables."""
    conversation = visible_conversation(session, viewer, conversation_id, lock=True)
    if conversation.status != Status.ACTIVE:
        session.rollback()
        raise Conflict(f"conversation {conversation_id} is {conversation.status}; its variables are kept as they were")
    return conversation


def _check(settings: Mapping[str, Any], name: str, value: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ApiError(f"variable name {name!r} must match {VARIABLE_NAME_PATTERN}")
    if too_deep(value):
        raise ApiError(f"variable {name} must nest at most {MAX_JSON_DEPTH} levels of arrays and objects")
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ApiError(f"variable {name}: NaN, Infinity and numbers beyond a double (1e400) cannot be stored") from None
    if holds_nul(encoded):
        raise ApiError(f"variable {name} must not contain NUL characters")
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        raise ApiError(f"variable {name} must be valid Unicode (no lone surrogates)") from None
    if size > settings["VARIABLE_MAX_BYTES"]:
        raise PayloadTooLarge(f"variable {name} is {size} bytes as JSON; the limit is VARIABLE_MAX_BYTES={settings['VARIABLE_MAX_BYTES']}")
