"""Safe expressions for profiles and IoT Agent `expression` fields: simpleeval, never eval().

Accepted: Python-style expressions as simpleeval evaluates them (arithmetic, comparisons,
`and`/`or`/`not`, `x if c else y`, `in`, indexing, `a.b` on objects, list/dict literals) and the common JEXL
subset of FIWARE IoT Agents, translated before parsing:

    a && b  → a and b        a || b  → a or b        !a → not a
    c ? x : y → (x if c else y)  (nested, right-associative)
    a ^ b   → a ** b         null/true/false → None/True/False
    x|fn    → fn(x)          x|fn(1) → fn(x, 1)   (JEXL transforms, e.g. value|round(1))
    "a" + 1 → "a1"           (+ with a string operand concatenates, as in JEXL)

Functions: abs round min max int float str len floor ceil sqrt bit bits parseInt parseFloat
toString upper lower substr pmGrade. Compiled expressions are cached.
"""
from __future__ import annotations

import ast
import math
import re
from functools import lru_cache
from typing import Any, Mapping

import simpleeval

from middleware.codecs.grades import pm_grade

__all__ = ["ExpressionError", "compile_expression", "evaluate", "translate_jexl", "FUNCTIONS"]


class ExpressionError(ValueError):
    """An expression that does not parse or cannot be evaluated."""


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, str) or isinstance(b, str):
        return _text(a) + _text(b)
    return a + b


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _bits(value: int, start: int, length: int = 1) -> int:
    return (int(value) >> start) & ((1 << length) - 1)


def _parse_int(v: Any, base: int = 10) -> int:
    return int(str(v).strip(), base)


FUNCTIONS: dict[str, Any] = {
    "abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float, "str": _text,
    "len": len, "floor": math.floor, "ceil": math.ceil, "sqrt": math.sqrt,
    "bit": lambda value, n: bool(_bits(value, n)), "bits": _bits,
    "parseInt": _parse_int, "parseFloat": lambda v: float(str(v).strip()), "toString": _text,
    "upper": lambda s: str(s).upper(), "lower": lambda s: str(s).lower(),
    "substr": lambda s, start, length=None: str(s)[start:] if length is None else str(s)[start:start + length],
    "pmGrade": pm_grade,
}
_OPERATORS = dict(simpleeval.DEFAULT_OPERATORS)
_OPERATORS[ast.Add] = _add

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<num>\d+\.\d*|\.\d+|\d+)
  | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op>&&|\|\||===|!==|==|!=|<=|>=|//|\*\*|[-+*/%<>!?:(),.\[\]{}|^&~])
""", re.VERBOSE)
_WORDS = {"null": "None", "true": "True", "false": "False", "and": "and", "or": "or", "not": "not", "in": "in"}
_OPS = {"&&": " and ", "||": " or ", "!": " not ", "===": "==", "!==": "!=", "^": "**"}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExpressionError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group()))
    return tokens


def _split_top(tokens: list, sep: str) -> list[list]:
    parts, depth, cur = [], 0, []
    for kind, tok in tokens:
        if tok in "([{" and kind == "op":
            depth += 1
        elif tok in ")]}" and kind == "op":
            depth -= 1
        if depth == 0 and kind == "op" and tok == sep:
            parts.append(cur)
            cur = []
        else:
            cur.append((kind, tok))
    parts.append(cur)
    return parts


def _translate(tokens: list) -> str:
    depth = 0
    for i, (kind, tok) in enumerate(tokens):
        if kind != "op":
            continue
        if tok in "([{":
            depth += 1
        elif tok in ")]}":
            depth -= 1
        elif tok == "?" and depth == 0:
            cond, rest = tokens[:i], tokens[i + 1:]
            nested, d = 0, 0
            for j, (k2, t2) in enumerate(rest):
                if k2 == "op" and t2 in "([{":
                    d += 1
                elif k2 == "op" and t2 in ")]}":
                    d -= 1
                elif k2 == "op" and d == 0 and t2 == "?":
                    nested += 1
                elif k2 == "op" and d == 0 and t2 == ":":
                    if nested == 0:
                        return f"(({_translate(rest[:j])}) if ({_translate(cond)}) else ({_translate(rest[j + 1:])}))"
                    nested -= 1
            raise ExpressionError("'?' without ':'")
    out: list[str] = []          # one entry per operand or operator, so a transform can wrap the last operand
    i = 0
    while i < len(tokens):
        kind, tok = tokens[i]
        if kind == "op" and tok == "{":
            close = _matching(tokens, i)
            entries = []
            for part in _split_top(tokens[i + 1:close], ","):
                if part:
                    colon = _split_top(part, ":")
                    if len(colon) < 2:
                        raise ExpressionError("an object literal entry needs 'key: value'")
                    key_len = len(colon[0])
                    entries.append(f"{_translate(part[:key_len])}: {_translate(part[key_len + 1:])}")
            out.append("{" + ", ".join(entries) + "}")
            i = close + 1
            continue
        if kind == "op" and tok in "([":
            close = _matching(tokens, i)
            inner = ", ".join(_translate(p) for p in _split_top(tokens[i + 1:close], ",") if p)
            piece = tok + inner + ("]" if tok == "[" else ")")
            if tok == "(" and out and _is_operand_end(out[-1]):
                out[-1] += piece      # call: f(...)
            elif tok == "[" and out and _is_operand_end(out[-1]):
                out[-1] += piece      # index: a[0]
            else:
                out.append(piece)
            i = close + 1
            continue
        if kind == "op" and tok == "." and out and i + 1 < len(tokens) and tokens[i + 1][0] == "name":
            out[-1] += "." + tokens[i + 1][1]
            i += 2
            continue
        if kind == "op" and tok == "|":
            if not out or i + 1 >= len(tokens) or tokens[i + 1][0] != "name":
                raise ExpressionError("a transform '|' needs a name after it")
            name, i = tokens[i + 1][1], i + 2
            args = ""
            if i < len(tokens) and tokens[i] == ("op", "("):
                close = _matching(tokens, i)
                args = "".join(", " + _translate(p) for p in _split_top(tokens[i + 1:close], ",") if p)
                i = close + 1
            out[-1] = f"{name}({out[-1]}{args})"
            continue
        if kind == "op":
            out.append(f" {_OPS.get(tok, tok)} " if tok not in "!" else _OPS["!"])
        else:
            word = _WORDS.get(tok, tok) if kind == "name" else tok
            out.append(" " + word if out and _is_operand_end(out[-1]) else word)
        i += 1
    return "".join(out).strip()


def _is_operand_end(piece: str) -> bool:
    p = piece.rstrip()
    return bool(p) and (p[-1].isalnum() or p[-1] in "_)]\"'$")


def _matching(tokens: list, start: int) -> int:
    opener = tokens[start][1]
    closer = {"(": ")", "[": "]", "{": "}"}[opener]
    depth = 0
    for j in range(start, len(tokens)):
        kind, tok = tokens[j]
        if kind == "op" and tok == opener:
            depth += 1
        elif kind == "op" and tok == closer:
            depth -= 1
            if depth == 0:
                return j
    raise ExpressionError(f"unbalanced {opener!r}")


def translate_jexl(text: str) -> str:
    """Rewrite the JEXL subset (&&, ||, !, ?:, transforms, null/true/false) into simpleeval syntax."""
    return _translate(_tokenize(text))


class _Compiled:
    """A parsed expression, evaluated against a fresh set of names each time."""

    __slots__ = ("source", "python", "tree")

    def __init__(self, source: str) -> None:
        self.source = source
        self.python = translate_jexl(source)
        try:
            self.tree = simpleeval.EvalWithCompoundTypes().parse(self.python)
        except SyntaxError as exc:
            raise ExpressionError(f"cannot parse expression {source!r}: {exc.msg}") from None

    def __call__(self, names: Mapping[str, Any]) -> Any:
        ev = simpleeval.EvalWithCompoundTypes(operators=_OPERATORS, functions=FUNCTIONS, names=dict(names))
        try:
            return ev.eval(self.python, previously_parsed=self.tree)
        except simpleeval.NameNotDefined as exc:
            raise ExpressionError(f"expression {self.source!r}: unknown name {exc.name!r}") from None
        except (simpleeval.InvalidExpression, ArithmeticError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ExpressionError(f"expression {self.source!r}: {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> _Compiled:
    """Parse (once, cached) an expression; raises ExpressionError on bad syntax."""
    return _Compiled(text)


def evaluate(text: str, names: Mapping[str, Any]) -> Any:
    """Evaluate an expression with the given names; raises ExpressionError."""
    return compile_expression(text)(names)
