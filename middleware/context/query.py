"""NGSI-LD Query Language (``q`` parameter), ETSI GS CIM 009 v1.8 clause 4.9.

Parser choice
-------------
A small hand-written recursive-descent parser, not lark.  The q language is
not context-free at the lexical level: what a token is depends on where it
stands (``urn:a:b`` is a URI after ``==`` but would be nonsense elsewhere,
``2020-01-01`` is a date and not a subtraction, a RegExp after ``~=`` runs
raw up to the next *unnested* ``;``/``|``/``)``).  A lexer-driven LALR
grammar would need a pile of contextual-lexer workarounds for that, while a
recursive-descent parser reads each value with the rule that applies at that
point and reports the exact position of the offending character.  Parses are
cached (``functools.lru_cache`` keyed on ``(text, expand)``) and compiled once
into nested Python closures, so :meth:`Query.matches` does no parsing work.

Grammar accepted (clause 4.9 ABNF, with the notes below)::

    Query          = Or
    Or             = And *( "|" And )            ; orOp
    And            = Primary *( ";" Primary )    ; andOp binds tighter (4.9)
    Primary        = "(" Or ")" / QueryTerm
    QueryTerm      = Attribute [ Operator Value ]
    Attribute      = AttrName *( "." AttrName ) *( "[" Key *( "." Key ) "]" )
    Operator       = "==" / "!=" / ">=" / ">" / "<=" / "<" / "~=" / "!~="
    after == / !=  : Value / ValueList / Range / URI
    after > >= < <=: ComparableValue (Number / quotedStr / dateTime / date / time)
    after ~= / !~= : RegExp (raw text)

Decisions taken from the spec text (clause numbers refer to GS CIM 009):

* Precedence (4.9): ``;`` (AND) takes precedence over ``|`` (OR); a
  parenthesised association is always evaluated first.  The ABNF only allows
  one level of parentheses, but EXAMPLE 6 nests them, so nesting is allowed.
* No whitespace anywhere outside quoted strings (the ABNF has none).
* AttrName = unicodeLetter *(unicodeLetter / unicodeNumber / "_"); a
  ``prefix:name`` compact form (4.6.2) is also accepted.  The first name is an
  Attribute, each further dotted name a sub-Attribute (4.9), all expanded with
  ``expand``.  The trailing members ``observedAt``, ``unitCode``,
  ``datasetId``, ``createdAt`` and ``modifiedAt`` (EXAMPLE 8) address the
  member of that name of the instance / sub-attribute, must be last in the
  dotted path, and are not expanded.
* ``[k1.k2]`` (4.9 trailing path, EXAMPLE 9/10) enters the seed target value
  as an ECMA-262 member expression; the older ``[k1][k2]`` form is accepted
  as the same thing.  Keys are JSON member names and are not expanded; inside
  brackets ``-`` is also allowed (language tags such as ``zh-Hant``).  A key
  that does not resolve makes the target element non-existent.  On a
  LanguageProperty a single key selects the language, ``[*]`` any language.
* A bare Attribute matches entities that define the target element (4.9).
* Multi-instance attributes (datasetId): the target value is *any* instance's
  value, so a term matches if it holds for at least one instance - for every
  operator, ``!=`` included.
* ``==`` (4.9 Equal): the value equals the target, or is included in the
  target when the target is an array; a ValueList matches if any list value
  does; a Range matches if the target lies within both (inclusive) bounds.
  LanguageProperty: any value of the languageMap (arrays flattened).
* ``!=`` (4.9 Unequal): the entity must contain the target element and
  ``==`` must not hold (no element of an array target equals, no list value
  equals, not inside the range).  Different data types count as unequal, so
  ``!=`` matches on a type mismatch.
* ``> >= < <=``: the target must be a single value of the same data type;
  arrays and other types do not match (4.9 "for single values").  ``>=`` is
  ``>`` or ``==`` and ``<=`` is ``<`` or ``==``.  LanguageProperty: any value.
* Relationship / ListRelationship targets: any operator other than ``==`` /
  ``!=`` does not match (4.9).  ListRelationship ``objectList`` entries may be
  plain URIs or ``{"object": uri}`` dicts.
* ``~=`` / ``!~=``: the target must be a string, otherwise no match for both
  (4.9).  RegExp is taken raw up to the next ``;``, ``|`` or ``)`` that is not
  inside a group, a bracket expression or escaped with ``\\``; write
  alternation inside a group, e.g. ``name~=(a|b)``.  Matching is unanchored
  search (IEEE 1003.2 regexec semantics; use ``^``/``$`` to anchor) with
  Python's ``re`` engine.  On a LanguageProperty ``~=`` matches if any value
  matches and ``!~=`` if none does.
* Data types: Numbers compare as numbers (booleans are not numbers), quoted
  strings as strings (code point order), ``true``/``false`` only with JSON
  booleans, dateTime/date/time (4.6.3 formats, ``Z`` mandatory in the query)
  temporally against target strings that parse as the same kind.  Unquoted
  URIs compare as strings.  A mismatch is "no match", never an error.
* VocabProperty: a string/URI value is compared both raw and ``expand``-ed.
* An unquoted bare word after ``==``/``!=`` (EXAMPLE 12, ``gender==Male``) is
  accepted and treated as a string.  ValueList items may also be unquoted
  URIs; a URI therefore ends at ``,``.
* ``id``, ``type``, ``createdAt``, ``modifiedAt`` of the entity are not q
  targets: 4.9 says the first name shall refer to a Property or Relationship.

Not supported: the linked-entity form ``attr{...}`` (needs other entities;
raises OperationNotSupported), the ``expandValues`` / ``jsonKeys`` request
parameters (handled, if at all, by the caller), the Unicode Collation
Algorithm for strings (only a "should").
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from datetime import date, datetime, time, timezone
from typing import Any, Callable

from middleware.context.errors import BadRequestData, OperationNotSupported

__all__ = ["Query", "parse_q"]

_NGSI_LD_CORE = "https://uri.etsi.org/ngsi-ld/"
_SPECIAL_MEMBERS = frozenset({"observedAt", "unitCode", "datasetId", "createdAt", "modifiedAt"})

# ---------------------------------------------------------------------------
# value kinds
# ---------------------------------------------------------------------------
_NUM, _STR, _BOOL, _DATETIME, _DATE, _TIME = range(6)
_KIND_NAMES = {_NUM: "number", _STR: "string", _BOOL: "boolean", _DATETIME: "dateTime",
               _DATE: "date", _TIME: "time"}
_MISS = object()

# target kinds produced by path resolution
_PLAIN, _REL, _VOCAB, _LANG = range(4)

# ---------------------------------------------------------------------------
# lexical patterns (4.9, 4.6.3, RFC 8259)
# ---------------------------------------------------------------------------
_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_DATETIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:[.,][0-9]{1,6})?Z")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIME_RE = re.compile(r"[0-9]{2}:[0-9]{2}:[0-9]{2}(?:[.,][0-9]{1,6})?Z")
_STRING_RE = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_TARGET_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_TARGET_TIME_RE = re.compile(r"[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?\Z")

_OPERATORS = ("!~=", "==", "!=", ">=", "<=", "~=", ">", "<")
_VALUE_END = frozenset(";|),")


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_term_char(c: str) -> bool:
    return c == "_" or unicodedata.category(c)[0] in ("L", "N")


# ---------------------------------------------------------------------------
# target value coercion (target data type must equal the query value data type)
# ---------------------------------------------------------------------------
def _as_num(t: Any) -> Any:
    tt = type(t)
    return t if tt is int or tt is float else _MISS


def _as_str(t: Any) -> Any:
    return t if type(t) is str else _MISS


def _as_bool(t: Any) -> Any:
    return t if type(t) is bool else _MISS


def _as_datetime(t: Any) -> Any:
    if type(t) is not str or "T" not in t:
        return _MISS
    try:
        d = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith("Z") else t)
    except ValueError:
        return _MISS
    return d if d.tzinfo is not None else d.replace(tzinfo=timezone.utc)


def _as_date(t: Any) -> Any:
    if type(t) is not str or not _TARGET_DATE_RE.match(t):
        return _MISS
    try:
        return date.fromisoformat(t)
    except ValueError:
        return _MISS


def _norm_time(t: time) -> time:
    """A naive time expressed in UTC."""
    off = t.utcoffset()
    if off is None:
        return t
    return (datetime.combine(date(2000, 1, 1), t.replace(tzinfo=None)) - off).time()


def _as_time(t: Any) -> Any:
    if type(t) is not str or not _TARGET_TIME_RE.match(t):
        return _MISS
    try:
        return _norm_time(time.fromisoformat(t))
    except ValueError:
        return _MISS


_COERCE = {_NUM: _as_num, _STR: _as_str, _BOOL: _as_bool, _DATETIME: _as_datetime,
           _DATE: _as_date, _TIME: _as_time}


# ---------------------------------------------------------------------------
# AST
# ---------------------------------------------------------------------------
class _Scalar:
    """A literal of the query: kind + Python value (+ vocab variants for strings)."""

    __slots__ = ("kind", "value", "vocab")

    def __init__(self, kind: int, value: Any):
        self.kind = kind
        self.value = value
        self.vocab: frozenset | None = None


class _Path:
    __slots__ = ("attr", "steps", "member", "keys")

    def __init__(self, attr: str, steps: list[str], member: str | None, keys: list[str]):
        self.attr = attr          # expanded top-level attribute name
        self.steps = steps        # expanded sub-attribute names
        self.member = member      # special trailing member (observedAt ...) or None
        self.keys = keys          # trailing compound-value / language path


class _Term:
    __slots__ = ("path", "op", "value")

    def __init__(self, path: _Path, op: str | None, value: Any):
        self.path = path
        self.op = op
        self.value = value        # _Scalar | ("list", [..]) | ("range", lo, hi) | re.Pattern | None


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str, expand: Callable[[str], str]):
        self.text = text
        self.n = len(text)
        self.pos = 0
        self.expand = expand
        self.attrs: set[str] = set()

    # -- errors -------------------------------------------------------------
    def error(self, msg: str, pos: int | None = None) -> BadRequestData:
        p = self.pos if pos is None else pos
        if p >= self.n:
            where = "at end of input"
        else:
            ch = self.text[p]
            shown = "whitespace" if ch.isspace() else repr(ch)
            where = f"at position {p} ({shown})"
        return BadRequestData(f"Invalid q: {msg} {where} in {self.text!r}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.n else ""

    # -- structure ----------------------------------------------------------
    def parse(self):
        if not self.text:
            raise BadRequestData("Invalid q: empty query")
        node = self.parse_or()
        if self.pos < self.n:
            if self.peek() == ")":
                raise self.error("unbalanced ')'")
            raise self.error("expected ';', '|' or end of query")
        return node

    def parse_or(self):
        items = [self.parse_and()]
        while self.peek() == "|":
            self.pos += 1
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else ("or", items)

    def parse_and(self):
        items = [self.parse_primary()]
        while self.peek() == ";":
            self.pos += 1
            items.append(self.parse_primary())
        return items[0] if len(items) == 1 else ("and", items)

    def parse_primary(self):
        if self.peek() == "(":
            open_pos = self.pos
            self.pos += 1
            node = self.parse_or()
            if self.peek() != ")":
                raise self.error(f"missing ')' to close the '(' opened at position {open_pos};")
            self.pos += 1
            return node
        return self.parse_term()

    # -- terms --------------------------------------------------------------
    def parse_name(self, what: str) -> str:
        start = self.pos
        if self.pos >= self.n or not _is_letter(self.text[self.pos]):
            raise self.error(f"expected {what} (a name starting with a letter)")
        self.pos += 1
        while self.pos < self.n and _is_term_char(self.text[self.pos]):
            self.pos += 1
        # prefix:name compact form (4.6.2)
        if (self.peek() == ":" and self.pos + 1 < self.n and _is_letter(self.text[self.pos + 1])):
            self.pos += 2
            while self.pos < self.n and _is_term_char(self.text[self.pos]):
                self.pos += 1
        return self.text[start:self.pos]

    def parse_key(self) -> str:
        start = self.pos
        if self.peek() == "*":
            self.pos += 1
            return "*"
        while self.pos < self.n and (_is_term_char(self.text[self.pos]) or self.text[self.pos] == "-"):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a member name inside '[...]'")
        return self.text[start:self.pos]

    def parse_attribute(self) -> _Path:
        first = self.parse_name("an attribute name")
        attr = self.expand(first)
        self.attrs.add(attr)
        steps: list[str] = []
        member = None
        while self.peek() == ".":
            dot = self.pos
            self.pos += 1
            name = self.parse_name("a sub-attribute name after '.'")
            if member is not None:
                raise self.error(f"'{member}' must be the last name of an attribute path", dot)
            exp = self.expand(name)
            if name in _SPECIAL_MEMBERS:
                member = name
            elif exp.startswith(_NGSI_LD_CORE) and exp[len(_NGSI_LD_CORE):] in _SPECIAL_MEMBERS:
                member = exp[len(_NGSI_LD_CORE):]
            else:
                steps.append(exp)
        if self.peek() == "{":
            raise OperationNotSupported(
                f"q: linked-entity paths ('{{' at position {self.pos}) are not supported")
        keys: list[str] = []
        while self.peek() == "[":
            self.pos += 1
            keys.append(self.parse_key())
            while self.peek() == ".":
                self.pos += 1
                keys.append(self.parse_key())
            if self.peek() != "]":
                raise self.error("expected ']'")
            self.pos += 1
        if keys and member is not None:
            raise self.error(f"'[...]' cannot follow '{member}'")
        if "*" in keys and keys != ["*"]:
            raise self.error("'[*]' must be the only trailing key")
        return _Path(attr, steps, member, keys)

    def parse_term(self) -> _Term:
        path = self.parse_attribute()
        c = self.peek()
        if c == "" or c in ";|)":
            return _Term(path, None, None)
        for op in _OPERATORS:
            if self.text.startswith(op, self.pos):
                break
        else:
            raise self.error("expected an operator (== != > >= < <= ~= !~=), ';', '|' or ')'")
        self.pos += len(op)
        if op in ("~=", "!~="):
            return _Term(path, op, self.parse_regex())
        if op in ("==", "!="):
            return _Term(path, op, self.parse_equality_value())
        value = self.parse_comparable(required=True)
        if self.peek() in (".", ","):
            raise self.error(f"ranges and lists are only allowed with == and !=, not {op}")
        self.expect_value_end()
        return _Term(path, op, value)

    # -- values -------------------------------------------------------------
    def expect_value_end(self) -> None:
        c = self.peek()
        if c and c not in ";|)":
            raise self.error("unexpected character after value")

    def parse_comparable(self, required: bool) -> _Scalar | None:
        """Number / quotedStr / dateTime / date / time, or None if none starts here."""
        t, p = self.text, self.pos
        if p >= self.n:
            if required:
                raise self.error("expected a value")
            return None
        if t[p] == '"':
            m = _STRING_RE.match(t, p)
            if not m:
                raise self.error("unterminated or invalid quoted string")
            self.pos = m.end()
            return _Scalar(_STR, json.loads(m.group()))
        for rx, kind in ((_DATETIME_RE, _DATETIME), (_DATE_RE, _DATE), (_TIME_RE, _TIME)):
            m = rx.match(t, p)
            if m:
                s = m.group()
                try:
                    if kind == _DATETIME:
                        v = datetime.fromisoformat(s[:-1].replace(",", ".") + "+00:00")
                    elif kind == _DATE:
                        v = date.fromisoformat(s)
                    else:
                        v = _norm_time(time.fromisoformat(s[:-1].replace(",", ".") + "+00:00"))
                except ValueError:
                    raise self.error(f"invalid {_KIND_NAMES[kind]} {s!r}") from None
                self.pos = m.end()
                self._reject_partial_temporal()
                return _Scalar(kind, v)
        m = _NUMBER_RE.match(t, p)
        if m:
            s = m.group()
            self.pos = m.end()
            if self.peek() in ("-", ":", "T") or (self.peek().isdigit()):
                raise self.error("malformed number, dateTime (YYYY-MM-DDThh:mm:ssZ), "
                                 "date (YYYY-MM-DD) or time (hh:mm:ssZ)", p)
            v = float(s) if any(c in s for c in ".eE") else int(s)
            return _Scalar(_NUM, v)
        if required:
            if t.startswith(("true", "false"), p):
                raise self.error("booleans are only allowed with == and !=")
            raise self.error("expected a number, quoted string, dateTime, date or time")
        return None

    def _reject_partial_temporal(self) -> None:
        c = self.peek()
        if c and (c.isdigit() or c in "T:+-Z"):
            raise self.error("malformed dateTime (YYYY-MM-DDThh:mm:ss[.ffffff]Z), date or time (hh:mm:ssZ)")

    def parse_value_item(self) -> _Scalar:
        """Value (ComparableValue / true / false), an unquoted URI or a bare word."""
        t, p = self.text, self.pos
        for word, val in (("true", True), ("false", False)):
            if t.startswith(word, p):
                end = p + len(word)
                if end >= self.n or t[end] in _VALUE_END or t.startswith("..", end):
                    self.pos = end
                    return _Scalar(_BOOL, val)
        sc = self.parse_comparable(required=False)
        if sc is not None:
            return sc
        m = _SCHEME_RE.match(t, p)
        if m:
            return _Scalar(_STR, self.scan_uri())
        if p < self.n and _is_letter(t[p]):
            return _Scalar(_STR, self.parse_name("a value"))
        raise self.error("expected a value (number, quoted string, dateTime, date, time, true, false or URI)")

    def scan_uri(self) -> str:
        start, depth, t = self.pos, 0, self.text
        while self.pos < self.n:
            c = t[self.pos]
            if c in ";|,":
                break
            if c.isspace() or c == '"':
                raise self.error("invalid character in URI")
            if c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    break
                depth -= 1
            self.pos += 1
        return t[start:self.pos]

    def parse_equality_value(self):
        first_pos = self.pos
        first = self.parse_value_item()
        if self.text.startswith("..", self.pos):
            if first.kind == _BOOL:
                raise self.error("range bounds must be numbers, strings, dateTimes, dates or times")
            self.pos += 2
            second = self.parse_comparable(required=True)
            if second.kind != first.kind:
                raise self.error(f"range bounds have different types "
                                 f"({_KIND_NAMES[first.kind]} and {_KIND_NAMES[second.kind]})", first_pos)
            self.expect_value_end()
            return ("range", first, second)
        if self.peek() == ",":
            items = [first]
            while self.peek() == ",":
                self.pos += 1
                items.append(self.parse_value_item())
            if self.text.startswith("..", self.pos):
                raise self.error("a value list cannot contain a range")
            self.expect_value_end()
            return ("list", items)
        self.expect_value_end()
        return first

    def parse_regex(self):
        start, t, depth = self.pos, self.text, 0
        i = start
        while i < self.n:
            c = t[i]
            if c == "\\":
                i += 2
                continue
            if c == "[":
                j = i + 1
                if j < self.n and t[j] == "^":
                    j += 1
                if j < self.n and t[j] == "]":
                    j += 1
                while j < self.n and t[j] != "]":
                    j += 2 if t[j] == "\\" else 1
                if j >= self.n:
                    raise self.error("unterminated '[' in regular expression", i)
                i = j + 1
                continue
            if c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and c in ";|":
                break
            i += 1
        i = min(i, self.n)
        pattern = t[start:i]
        if not pattern:
            raise self.error("empty regular expression")
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise self.error(f"invalid regular expression {pattern!r} ({exc})", start) from None
        self.pos = i
        return rx


# ---------------------------------------------------------------------------
# compilation to closures
# ---------------------------------------------------------------------------
def _flatten_lang(lmap: Any) -> list:
    out: list = []
    if type(lmap) is dict:
        for v in lmap.values():
            if type(v) is list:
                out.extend(v)
            else:
                out.append(v)
    return out


def _element_target(node: Any):
    """(value, kind) of an attribute instance, or None."""
    if type(node) is not dict:
        return None
    typ = node.get("type")
    if typ == "Property" or typ == "GeoProperty":
        return (node["value"], _PLAIN) if "value" in node else None
    if typ == "Relationship":
        return (node["object"], _REL) if "object" in node else None
    if typ == "ListRelationship":
        ol = node.get("objectList")
        if type(ol) is not list:
            return None
        return ([o.get("object") if type(o) is dict else o for o in ol], _REL)
    if typ == "LanguageProperty":
        return (node["languageMap"], _LANG) if "languageMap" in node else None
    if typ == "ListProperty":
        return (node["valueList"], _PLAIN) if "valueList" in node else None
    if typ == "JsonProperty":
        return (node["json"], _PLAIN) if "json" in node else None
    if typ == "VocabProperty":
        return (node["vocab"], _VOCAB) if "vocab" in node else None
    # untyped: infer from the member present
    for key, kind in (("value", _PLAIN), ("object", _REL), ("languageMap", _LANG),
                      ("valueList", _PLAIN), ("json", _PLAIN), ("vocab", _VOCAB)):
        if key in node:
            return (node[key], kind)
    return None


def _compile_path(path: _Path) -> Callable[[dict], list]:
    """A function entity -> list of (target value, target kind), one per matching instance."""
    attr, steps, member, keys = path.attr, tuple(path.steps), path.member, tuple(path.keys)
    lang_key = keys[0] if len(keys) == 1 else None

    def finish(node: Any, out: list) -> None:
        if member is not None:
            if type(node) is dict and member in node:
                out.append((node[member], _PLAIN))
            return
        tgt = _element_target(node)
        if tgt is None:
            return
        if not keys:
            if tgt[1] == _LANG:
                out.append((_flatten_lang(tgt[0]), _LANG))
            else:
                out.append(tgt)
            return
        val, kind = tgt
        if kind == _LANG:
            if lang_key is None or type(val) is not dict:
                return
            if lang_key == "*":
                out.append((_flatten_lang(val), _LANG))
            elif lang_key in val:
                v = val[lang_key]
                out.append((v if type(v) is list else [v], _LANG))
            return
        if kind != _PLAIN or lang_key == "*":
            return
        for k in keys:
            if type(val) is not dict or k not in val:
                return
            val = val[k]
        out.append((val, _PLAIN))

    def walk(node: Any, i: int, out: list) -> None:
        if i == len(steps):
            finish(node, out)
            return
        if type(node) is not dict:
            return
        sub = node.get(steps[i])
        if sub is None:
            return
        if type(sub) is list:
            for s in sub:
                walk(s, i + 1, out)
        else:
            walk(sub, i + 1, out)

    if not steps and member is None and not keys:
        def resolve(entity: dict) -> list:
            insts = entity.get("attrs", {}).get(attr)
            if not insts:
                return []
            if type(insts) is dict:
                insts = (insts,)
            out = []
            for inst in insts:
                tgt = _element_target(inst)
                if tgt is not None:
                    out.append((_flatten_lang(tgt[0]), _LANG) if tgt[1] == _LANG else tgt)
            return out
        return resolve

    def resolve(entity: dict) -> list:
        insts = entity.get("attrs", {}).get(attr)
        if not insts:
            return []
        if type(insts) is dict:
            insts = (insts,)
        out: list = []
        for inst in insts:
            walk(inst, 0, out)
        return out

    return resolve


def _scalar_eq(sc: _Scalar, vocab: bool) -> Callable[[Any], bool]:
    coerce, qv = _COERCE[sc.kind], sc.value
    if vocab and sc.vocab is not None:
        variants = sc.vocab
        return lambda t: type(t) is str and t in variants
    if sc.kind == _NUM:
        return lambda t: (type(t) is int or type(t) is float) and t == qv
    if sc.kind == _STR:
        return lambda t: type(t) is str and t == qv
    if sc.kind == _BOOL:
        return lambda t: t is qv

    def eq(t: Any) -> bool:
        c = coerce(t)
        return c is not _MISS and c == qv
    return eq


_ORDER = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
          "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def _scalar_order(sc: _Scalar, op: str) -> Callable[[Any], bool]:
    coerce, qv, cmp = _COERCE[sc.kind], sc.value, _ORDER[op]

    def order(t: Any) -> bool:
        c = coerce(t)
        return c is not _MISS and cmp(c, qv)
    return order


def _equality_pred(value: Any, vocab: bool) -> Callable[[Any], bool]:
    """Scalar predicate for == (single value, list or range)."""
    if isinstance(value, _Scalar):
        return _scalar_eq(value, vocab)
    if value[0] == "list":
        preds = tuple(_equality_pred(v, vocab) for v in value[1])
        return lambda t: any(p(t) for p in preds)
    lo, hi = _scalar_order(value[1], ">="), _scalar_order(value[2], "<=")
    return lambda t: lo(t) and hi(t)


def _compile_test(term: _Term) -> Callable[[Any, int], bool]:
    op, value = term.op, term.value
    if op in ("==", "!="):
        plain = _equality_pred(value, False)
        voc = _equality_pred(value, True)

        def eq(v: Any, k: int) -> bool:
            p = voc if k == _VOCAB else plain
            if type(v) is list:
                for e in v:
                    if p(e):
                        return True
                return False
            return p(v)
        if op == "==":
            return eq
        return lambda v, k: not eq(v, k)
    if op in _ORDER:
        pred = _scalar_order(value, op)

        def order(v: Any, k: int) -> bool:
            if k == _REL:
                return False
            if k == _LANG:
                return any(pred(e) for e in v)
            if type(v) is list:
                return False
            return pred(v)
        return order
    search = value.search
    if op == "~=":
        def rmatch(v: Any, k: int) -> bool:
            if k == _REL:
                return False
            if k == _LANG:
                return any(type(e) is str and search(e) is not None for e in v)
            return type(v) is str and search(v) is not None
        return rmatch

    def nrmatch(v: Any, k: int) -> bool:
        if k == _REL:
            return False
        if k == _LANG:
            strs = [e for e in v if type(e) is str]
            return bool(strs) and all(search(e) is None for e in strs)
        return type(v) is str and search(v) is None
    return nrmatch


def _add_vocab_variants(value: Any, expand: Callable[[str], str]) -> None:
    if isinstance(value, _Scalar):
        if value.kind == _STR:
            try:
                exp = expand(value.value)
            except Exception:  # a string that is no term: compare raw only
                exp = value.value
            value.vocab = frozenset((value.value, exp)) if isinstance(exp, str) else frozenset((value.value,))
    elif isinstance(value, tuple) and value[0] == "list":
        for v in value[1]:
            _add_vocab_variants(v, expand)


def _compile(node: Any, expand: Callable[[str], str]) -> Callable[[dict], bool]:
    if isinstance(node, _Term):
        resolve = _compile_path(node.path)
        if node.op is None:
            return lambda e: bool(resolve(e))
        if node.op in ("==", "!="):
            _add_vocab_variants(node.value, expand)
        test = _compile_test(node)

        def term(entity: dict) -> bool:
            for v, k in resolve(entity):
                if test(v, k):
                    return True
            return False
        return term
    kind, items = node
    fns = tuple(_compile(i, expand) for i in items)
    if kind == "and":
        if len(fns) == 2:
            a, b = fns
            return lambda e: a(e) and b(e)
        return lambda e: all(f(e) for f in fns)
    if len(fns) == 2:
        a, b = fns
        return lambda e: a(e) or b(e)
    return lambda e: any(f(e) for f in fns)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
class Query:
    """A parsed and compiled NGSI-LD q expression."""

    __slots__ = ("text", "_fn", "_attrs")

    def __init__(self, text: str, fn: Callable[[dict], bool], attrs: frozenset[str]):
        self.text = text
        self._fn = fn
        self._attrs = attrs

    def matches(self, entity: dict) -> bool:
        """True if the entity (internal expanded form) satisfies the query."""
        return self._fn(entity)

    def attribute_names(self) -> set[str]:
        """Expanded names of the top-level attributes the query refers to."""
        return set(self._attrs)

    def __repr__(self) -> str:
        return f"Query({self.text!r})"


def _parse(text: str, expand: Callable[[str], str]) -> Query:
    if not isinstance(text, str):
        raise BadRequestData("Invalid q: the query must be a string")
    parser = _Parser(text, expand)
    ast = parser.parse()
    return Query(text, _compile(ast, expand), frozenset(parser.attrs))


_parse_cached = functools.lru_cache(maxsize=1024)(_parse)


def parse_q(text: str, expand: Callable[[str], str]) -> Query:
    """Parse q text; `expand` maps a short attribute/sub-attribute name to its expanded IRI (may return the input unchanged if already an IRI)."""
    try:
        hash((text, expand))
    except TypeError:  # unhashable expand (or text): parse without the cache
        return _parse(text, expand)
    return _parse_cached(text, expand)
