"""Request projections shared by the query API and subscriptions: pick / omit (clause 4.21) and datasetId (4.5.5)."""
from __future__ import annotations

import re
from typing import Any

from .errors import BadRequestData, OperationNotSupported
from .model import check_name, check_uri


def check_dataset_ids(items: Any) -> list[str]:
    """A datasetId selection (4.5.5): a non-empty list of dataset URIs, "@none" naming the default instance."""
    if not isinstance(items, list) or not items:
        raise BadRequestData("datasetId must be a non-empty list of dataset URIs or @none")
    return [item if item == "@none" else check_uri(item, "datasetId") for item in items]


_PROJECTION_TOKEN = re.compile(r"[{},]|[^{},]+")


def projection(value: Any, what: str) -> list[str] | None:
    """The names of a pick/omit expression (clause 4.21; a string, or a Query body's array of strings).

    Malformed expressions are BadRequestData; a well-formed linked-entity selection name{...} needs join,
    which is not implemented, so it is OperationNotSupported.
    """
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise BadRequestData(f"{what} must be a string or a non-empty array of strings")
    tokens = _PROJECTION_TOKEN.findall(value)
    items, end = _projection_items(tokens, 0, what, value)
    if end != len(tokens):
        raise BadRequestData(f"invalid {what} {value!r}: unexpected {tokens[end]!r}")
    if any(children for _, children in items):
        raise OperationNotSupported(f"{what} {value!r} selects members of linked entities (name{{...}}), "
                                    "which needs join: not supported")
    return [name for name, _ in items]


def _projection_items(tokens: list[str], pos: int, what: str, text: str) -> tuple[list[tuple[str, list]], int]:
    """Parse a comma-separated list of name or name{list} from tokens[pos]; return (items, next position)."""
    items: list[tuple[str, list]] = []
    while True:
        token = tokens[pos] if pos < len(tokens) else None
        if token is None or token in ("{", "}", ","):
            raise BadRequestData(f"invalid {what} {text!r}: a name is missing"
                                 + (f" before {token!r}" if token is not None else " at the end"))
        name = check_name(token.strip(), f"{what} name")
        pos += 1
        children: list = []
        if pos < len(tokens) and tokens[pos] == "{":
            children, pos = _projection_items(tokens, pos + 1, what, text)
            if pos >= len(tokens) or tokens[pos] != "}":
                raise BadRequestData(f"invalid {what} {text!r}: '{{' after {name!r} is not closed")
            pos += 1
        items.append((name, children))
        if pos < len(tokens) and tokens[pos] == ",":
            pos += 1
            continue
        return items, pos
