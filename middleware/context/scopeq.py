"""The NGSI-LD scope query language (clause 4.19): scopeQ=/Madrid/#;/Spain,(/Madrid/+/Gardens)

A scope is a path of segments (/Madrid/Gardens). In a query, `+` stands for exactly one segment, a final `#`
for any number of further segments (none included; `/#` matches every scope), `;` is AND, `,` is OR (AND
binds tighter) and parentheses group. An entity matches a term when one of its scopes does; an entity
without a scope matches nothing.
"""
from __future__ import annotations

import re
from typing import Callable

from .errors import BadRequestData

ScopeTest = Callable[[list[str]], bool]
_SEGMENT = re.compile(r"[^/;,()#+\s]+")


def parse_scopeq(text: str) -> Callable[[dict], bool]:
    """Compile a scopeQ into a predicate over stored entities; BadRequestData on a malformed query."""
    parser = _Parser(text)
    test = parser.parse_or()
    if parser.pos != len(text):
        raise BadRequestData(f"invalid scopeQ {text!r} at position {parser.pos}")
    return lambda doc: test(doc.get("scope") or ())


def scope_matches(pattern: list[str], scope: str) -> bool:
    """Whether one scope (/A/B) matches one pattern given as segments (+ one segment, final # any rest)."""
    segments = scope.strip("/").split("/")
    for index, part in enumerate(pattern):
        if part == "#":
            return True
        if index >= len(segments) or part != "+" and part != segments[index]:
            return False
    return len(segments) == len(pattern)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self) -> BadRequestData:
        return BadRequestData(f"invalid scopeQ {self.text!r} at position {self.pos}")

    def parse_or(self) -> ScopeTest:
        tests = [self.parse_and()]
        while self.text.startswith(",", self.pos):
            self.pos += 1
            tests.append(self.parse_and())
        return tests[0] if len(tests) == 1 else lambda scopes: any(t(scopes) for t in tests)

    def parse_and(self) -> ScopeTest:
        tests = [self.parse_primary()]
        while self.text.startswith(";", self.pos):
            self.pos += 1
            tests.append(self.parse_primary())
        return tests[0] if len(tests) == 1 else lambda scopes: all(t(scopes) for t in tests)

    def parse_primary(self) -> ScopeTest:
        if self.text.startswith("(", self.pos):
            self.pos += 1
            test = self.parse_or()
            if not self.text.startswith(")", self.pos):
                raise self.fail()
            self.pos += 1
            return test
        return self.parse_scope()

    def parse_scope(self) -> ScopeTest:
        pattern: list[str] = []
        while self.text.startswith("/", self.pos):
            self.pos += 1
            if pattern and pattern[-1] == "#":
                raise self.fail()  # '#' only at the end
            if self.text.startswith(("#", "+"), self.pos):
                pattern.append(self.text[self.pos])
                self.pos += 1
                continue
            match = _SEGMENT.match(self.text, self.pos)
            if match is None:
                raise self.fail()
            pattern.append(match.group())
            self.pos = match.end()
        if not pattern:
            raise self.fail()
        return lambda scopes: any(scope_matches(pattern, scope) for scope in scopes)
