"""Entity type selection (ETSI GS CIM 009 v1.8 clause 4.17): `A,B` or `A|B` (any), `A;B` (all), parentheses."""
from __future__ import annotations

import re
from typing import Callable

from .errors import BadRequestData

_TOKEN = re.compile(r"\s*([(),;|]|[^(),;|\s]+)")


class TypeSelection:
    """A parsed type selection: test an entity's expanded types, and list every type named (for an index prefilter)."""

    def __init__(self, test: Callable[[set[str]], bool], names: list[str], single: str | None = None):
        self.test = test
        self.names = names
        self.single = single  # the one type of a selection without operators (the common case): no set to build

    def matches(self, types: list[str]) -> bool:
        """True if the entity's expanded types satisfy the selection."""
        if self.single is not None:
            return self.single in types
        return self.test(set(types))


def parse_type_selection(text: str, expand: Callable[[str], str]) -> TypeSelection:
    """Parse a type selection; names are expanded with `expand`."""
    tokens = _TOKEN.findall(text)
    if not tokens or "".join(tokens) != re.sub(r"\s+", "", text):
        raise BadRequestData(f"invalid type selection {text!r}")
    names: list[str] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def parse_or() -> Callable[[set[str]], bool]:
        parts = [parse_and()]
        while peek() in (",", "|"):
            take()
            parts.append(parse_and())
        return parts[0] if len(parts) == 1 else (lambda types: any(p(types) for p in parts))

    def parse_and() -> Callable[[set[str]], bool]:
        parts = [parse_atom()]
        while peek() == ";":
            take()
            parts.append(parse_atom())
        return parts[0] if len(parts) == 1 else (lambda types: all(p(types) for p in parts))

    def parse_atom() -> Callable[[set[str]], bool]:
        token = peek()
        if token is None:
            raise BadRequestData(f"type selection {text!r} ends early")
        if token == "(":
            take()
            inner = parse_or()
            if peek() != ")":
                raise BadRequestData(f"type selection {text!r} has an unclosed parenthesis")
            take()
            return inner
        if token in (")", ",", ";", "|"):
            raise BadRequestData(f"type selection {text!r}: unexpected {token!r}")
        take()
        if re.search(r"[<>\"'=]", token):
            raise BadRequestData(f"invalid entity type name {token!r}")
        iri = expand(token)
        names.append(iri)
        return lambda types: iri in types

    test = parse_or()
    if pos != len(tokens):
        raise BadRequestData(f"type selection {text!r}: unexpected {tokens[pos]!r}")
    return TypeSelection(test, names, names[0] if len(tokens) == 1 else None)


def rename_type_names(text: str, rename: Callable[[str], str]) -> str:
    """A type selection with every type name replaced by rename(name) (operators kept, whitespace dropped)."""
    return "".join(token if token in "(),;|" else rename(token) for token in _TOKEN.findall(text))
