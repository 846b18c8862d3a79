"""The small JSON path subset profiles use: $.a.b[0], $['odd key'], or a bare top-level key."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_STEP = re.compile(r"""\.?([A-Za-z0-9_@:-]+)|\[(\d+)\]|\[['"]([^'"]+)['"]\]""")
MISSING = object()


@lru_cache(maxsize=2048)
def parse_path(path: str) -> tuple[str | int, ...]:
    """Split a path into keys and indexes; raises ValueError on bad syntax."""
    text = path[1:] if path.startswith("$") else path
    steps, pos = [], 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad JSON path {path!r} at {pos}")
        key, index, quoted = m.groups()
        steps.append(int(index) if index is not None else (quoted if quoted is not None else key))
        pos = m.end()
    return tuple(steps)


def resolve(document: Any, path: str) -> Any:
    """The value at path in document, or MISSING."""
    node = document
    for step in parse_path(path):
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                return MISSING
            node = node[step]
        elif isinstance(node, dict) and step in node:
            node = node[step]
        else:
            return MISSING
    return node
