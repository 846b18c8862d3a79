"""JSON-LD @context handling: resolve a request's @context into a term map that expands short names and compacts IRIs.

NGSI-LD only needs term-level JSON-LD (attribute names, entity types, vocab values), not whole-document
expansion, so this module implements the context-processing rules that matter (terms, prefixes / compact
IRIs, expanded term definitions, @vocab, nested and remote contexts) and caches every active context.
Full JSON-LD processors (pyld) cost milliseconds per document, which the ingest hot path cannot pay.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import httpx
import orjson

from .errors import BadRequestData, LdContextNotAvailable

CORE_CONTEXT_URL = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"
CORE_CONTEXT_URL_RE = re.compile(r"^https?://uri\.etsi\.org/ngsi-ld/v1/ngsi-ld-core-context(?:-v1\.[3-9])?\.jsonld$")
NGSI_LD = "https://uri.etsi.org/ngsi-ld/"
DEFAULT_VOCAB = "https://uri.etsi.org/ngsi-ld/default-context/"
JSONLD_CONTEXT_REL = "http://www.w3.org/ns/json-ld#context"
_MAX_DEPTH = 8


def _load_core_document() -> dict:
    data = resources.files(__package__).joinpath("data/ngsi-ld-core-context-v1.8.jsonld").read_bytes()
    return orjson.loads(data)["@context"]


CORE_CONTEXT: dict = _load_core_document()


def link_header(url: str) -> str:
    """The JSON-LD Link header (RFC 8288) pointing at an @context URL."""
    return f'<{url}>; rel="{JSONLD_CONTEXT_REL}"; type="application/ld+json"'


def is_core_context_url(url: str) -> bool:
    """True when url names one of the NGSI-LD core contexts (v1.3 to v1.9, or unversioned), served offline."""
    return bool(CORE_CONTEXT_URL_RE.match(url))


@dataclass(frozen=True, slots=True)
class TermDefinition:
    """One resolved term: its absolute IRI and its @type coercion (@vocab, @id, @json, or None)."""

    iri: str
    coerce: str | None = None


def _is_absolute_iri(value: str) -> bool:
    head, sep, _ = value.partition(":")
    return bool(sep) and bool(head) and head[0].isalpha() and all(c.isalnum() or c in "+-." for c in head)


class TermMap:
    """An active context: expands short names to IRIs and compacts IRIs back to the shortest term."""

    def __init__(self, definitions: dict[str, TermDefinition], vocab: str | None, key: str):
        self.definitions = definitions
        self.vocab = vocab
        self.key = key
        self._expand_cache: dict[str, str] = {}
        self._compact_cache: dict[str, str] = {}
        self._reverse: dict[str, str] | None = None
        self._prefixes: list[tuple[str, str]] | None = None

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TermMap) and other.key == self.key

    def expand(self, term: str) -> str:
        """Expand a term, compact IRI or absolute IRI to an absolute IRI."""
        cached = self._expand_cache.get(term)
        if cached is not None:
            return cached
        result = self._expand(term)
        if len(self._expand_cache) < 100_000:
            self._expand_cache[term] = result
        return result

    def _expand(self, term: str) -> str:
        definition = self.definitions.get(term)
        if definition is not None:
            return definition.iri
        prefix, sep, suffix = term.partition(":")
        if sep:
            if suffix.startswith("//"):
                return term
            prefix_def = self.definitions.get(prefix)
            if prefix_def is not None:
                return prefix_def.iri + suffix
            return term
        if self.vocab is not None:
            return self.vocab + term
        return term

    def coercion(self, term: str) -> str | None:
        """The @type coercion of a defined term (e.g. '@vocab'), if any."""
        definition = self.definitions.get(term)
        return definition.coerce if definition is not None else None

    def compact(self, iri: str) -> str:
        """Compact an absolute IRI to the shortest matching term, vocab-relative name or compact IRI."""
        cached = self._compact_cache.get(iri)
        if cached is not None:
            return cached
        result = self._compact(iri)
        if len(self._compact_cache) < 100_000:
            self._compact_cache[iri] = result
        return result

    def _compact(self, iri: str) -> str:
        if self._reverse is None:
            reverse: dict[str, str] = {}
            prefixes: list[tuple[str, str]] = []
            for term, definition in self.definitions.items():
                if term.startswith("@") or definition.iri.startswith("@"):
                    continue
                best = reverse.get(definition.iri)
                if best is None or (len(term), term) < (len(best), best):
                    reverse[definition.iri] = term
                if ":" not in term and definition.iri[-1:] in ("/", "#", ":"):
                    prefixes.append((term, definition.iri))
            self._reverse = reverse
            self._prefixes = prefixes
        term = self._reverse.get(iri)
        if term is not None:
            return term
        if self.vocab and iri.startswith(self.vocab):
            rest = iri[len(self.vocab):]
            if rest and ":" not in rest and rest not in self.definitions:
                return rest
        best: str | None = None
        for prefix, prefix_iri in self._prefixes or ():
            if iri.startswith(prefix_iri) and len(iri) > len(prefix_iri):
                candidate = prefix + ":" + iri[len(prefix_iri):]
                if best is None or (len(candidate), candidate) < (len(best), best):
                    best = candidate
        return best if best is not None else iri


class ContextResolver:
    """Turns @context values (URLs, objects, arrays) into cached TermMaps; fetches remote contexts with a timeout."""

    def __init__(self, timeout: float = 5.0, cache_ttl: float = 3600.0, max_cached: int = 1000):
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.max_cached = max_cached
        self._documents: dict[str, tuple[float, Any]] = {}
        self._maps: dict[str, TermMap] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._client: httpx.AsyncClient | None = None
        self.core = self._build([], "core")

    async def close(self) -> None:
        """Close the HTTP client used for remote contexts."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def resolve(self, context: Any) -> TermMap:
        """The TermMap for a request @context (None means the core context alone)."""
        if context is None:
            return self.core
        key = context if isinstance(context, str) else orjson.dumps(context, option=orjson.OPT_SORT_KEYS).decode()
        cached = self._maps.get(key)
        if cached is not None:
            return cached
        if isinstance(context, str) and is_core_context_url(context):
            self._maps[key] = self.core
            return self.core
        layers: list[dict] = []
        await self._collect(context, layers, 0)
        term_map = self._build(layers, key)
        if len(self._maps) >= self.max_cached:
            self._maps.pop(next(iter(self._maps)))
        self._maps[key] = term_map
        return term_map

    async def _collect(self, context: Any, layers: list[dict], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise LdContextNotAvailable("@context nesting is too deep (remote contexts referring to each other?)")
        if context is None:
            return
        if isinstance(context, list):
            for item in context:
                await self._collect(item, layers, depth + 1)
        elif isinstance(context, str):
            if is_core_context_url(context):
                return
            if not _is_absolute_iri(context) or not context.startswith(("http://", "https://")):
                raise BadRequestData(f"@context entry {context!r} is not an http(s) URL")
            document = await self._fetch(context)
            await self._collect(document, layers, depth + 1)
        elif isinstance(context, dict):
            nested = {k: v for k, v in context.items()}
            if "@import" in nested:
                await self._collect(nested.pop("@import"), layers, depth + 1)
            layers.append(nested)
        else:
            raise BadRequestData("@context must be a URL, an object or an array of them")

    async def _fetch(self, url: str) -> Any:
        now = time.monotonic()
        cached = self._documents.get(url)
        if cached is not None and now - cached[0] < self.cache_ttl:
            return cached[1]
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            cached = self._documents.get(url)
            if cached is not None and time.monotonic() - cached[0] < self.cache_ttl:
                return cached[1]
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=True)
            try:
                response = await self._client.get(url, headers={"Accept": "application/ld+json, application/json"})
                response.raise_for_status()
                body = orjson.loads(response.content)
            except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
                raise LdContextNotAvailable(f"@context {url} could not be retrieved: {exc.__class__.__name__}: {exc}") from exc
            if not isinstance(body, dict) or "@context" not in body:
                raise LdContextNotAvailable(f"@context {url} is not a JSON-LD context document (no @context member)")
            if len(self._documents) >= self.max_cached:
                self._documents.pop(next(iter(self._documents)))
            self._documents[url] = (time.monotonic(), body["@context"])
            return body["@context"]

    def _build(self, layers: list[dict], key: str) -> TermMap:
        raw: dict[str, Any] = {}
        vocab: Any = CORE_CONTEXT.get("@vocab")
        protected = {t for t in CORE_CONTEXT if not t.startswith("@")}
        for term, value in CORE_CONTEXT.items():
            if not term.startswith("@"):
                raw[term] = value
        for layer in layers:
            for term, value in layer.items():
                if term == "@vocab":
                    vocab = value
                elif term.startswith("@"):
                    continue
                elif term in protected:
                    continue  # the core @context is @protected: its terms keep their meaning
                elif value is None:
                    raw.pop(term, None)
                else:
                    raw[term] = value
        definitions: dict[str, TermDefinition] = {}

        def resolve_iri(value: str, seen: frozenset[str]) -> str:
            if value.startswith("@"):
                return value
            prefix, sep, suffix = value.partition(":")
            if sep:
                if suffix.startswith("//") or prefix not in raw or prefix in seen:
                    return value
                return resolve_term(prefix, seen | {prefix}) + suffix
            if value in raw and value not in seen:
                return resolve_term(value, seen | {value})
            return (vocab or "") + value if vocab else value

        def resolve_term(term: str, seen: frozenset[str]) -> str:
            done = definitions.get(term)
            if done is not None:
                return done.iri
            value = raw[term]
            coerce = None
            if isinstance(value, dict):
                coerce = value.get("@type")
                target = value.get("@id", term)
                if value.get("@reverse"):
                    target = term
            else:
                target = value
            if not isinstance(target, str):
                raise BadRequestData(f"@context term {term!r} has an invalid definition")
            iri = resolve_iri(target, seen) if target != term or ":" in term else ((vocab or "") + term)
            definitions[term] = TermDefinition(iri, coerce if isinstance(coerce, str) else None)
            return iri

        for term in raw:
            resolve_term(term, frozenset({term}))
        if isinstance(vocab, str) and not _is_absolute_iri(vocab):
            vocab = resolve_iri(vocab, frozenset())
        return TermMap(definitions, vocab if isinstance(vocab, str) else None, key)
