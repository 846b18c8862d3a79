"""Device profiles: load device-profiles/*.yaml, validate against schema.json, find a profile by topic."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import orjson
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from middleware.codecs.expressions import ExpressionError, compile_expression
from middleware.codecs.jsonpath import parse_path

PROFILE_DIR = Path(__file__).resolve().parents[2] / "device-profiles"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ProfileError(Exception):
    """A profile that cannot be used: which file, which line, why."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


@dataclass(frozen=True)
class Profile:
    """One validated device profile (see docs/device-profiles.md for every field)."""

    name: str
    entity_type: str
    codec: dict
    interval: float | None = None
    description: str = ""
    transports: dict = field(default_factory=dict)
    attributes: tuple[dict, ...] = ()
    derived: tuple[dict, ...] = ()
    static: tuple[dict, ...] = ()
    commands: tuple[dict, ...] = ()
    out_of_range: str = "reject"
    file: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def format(self) -> str:
        """The codec format: json, binary, modbus, serial or iota-json."""
        return self.codec["format"]

    @property
    def mqtt(self) -> dict | None:
        """The mqtt transport section, if any."""
        return self.transports.get("mqtt")

    @property
    def coap(self) -> dict | None:
        """The coap transport section, if any."""
        return self.transports.get("coap")

    @property
    def modbus(self) -> dict | None:
        """The modbus transport section, if any."""
        return self.transports.get("modbus")

    @property
    def serial(self) -> dict | None:
        """The serial transport section, if any."""
        return self.transports.get("serial")

    def attribute(self, name: str) -> dict | None:
        """The mapping entry (attributes, derived or static) for an NGSI-LD attribute name."""
        for entry in (*self.attributes, *self.derived, *self.static):
            if entry["name"] == name:
                return entry
        return None

    def command(self, name: str) -> dict | None:
        """The command definition by name."""
        return next((c for c in self.commands if c["name"] == name), None)

    @classmethod
    def from_dict(cls, doc: dict, name: str, file: str = "") -> "Profile":
        """Build from an already validated document."""
        return cls(name=doc.get("name", name), entity_type=doc["entity_type"], codec=doc["codec"],
                   interval=doc.get("interval"), description=doc.get("description", ""),
                   transports=doc.get("transports", {}), attributes=tuple(doc.get("attributes", ())),
                   derived=tuple(doc.get("derived", ())), static=tuple(doc.get("static", ())),
                   commands=tuple(doc.get("commands", ())), out_of_range=doc.get("out_of_range", "reject"),
                   file=file, raw=doc)


@lru_cache(maxsize=8)
def _validator(schema_path: str) -> Draft202012Validator:
    schema = orjson.loads(Path(schema_path).read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _node_at(node: yaml.Node, path: list) -> yaml.Node:
    """The deepest YAML node reachable along a JSON-Schema error path."""
    for step in path:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            nxt = node.value[step]
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
    return node


def _key_node(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((k for k, _ in node.value if k.value == key), None)
    return None


def _line_of(root: yaml.Node, error: ValidationError) -> int:
    node = _node_at(root, list(error.absolute_path))
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = next((k for k in error.instance if k not in allowed), None)
        key = _key_node(node, extra) if extra is not None else None
        if key is not None:
            node = key
    return node.start_mark.line + 1


def _reason(error: ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(top)"
    return f"{where}: {error.message}"


def _check_semantics(doc: dict) -> list[tuple[list, str]]:
    """Checks JSON Schema cannot express: expressions parse, sources exist, paths parse. Returns (path, reason)."""
    problems: list[tuple[list, str]] = []
    codec = doc["codec"]
    fields = {f["name"] for f in codec.get("fields", codec.get("registers", []))}
    for section in ("attributes", "derived", "commands"):
        for i, entry in enumerate(doc.get(section, [])):
            exprs = [("expression", entry.get("expression"))]
            enc = entry.get("encoding", {})
            exprs.append(("encoding", enc.get("expression")))
            exprs += [("encoding", f.get("expression")) for f in enc.get("fields", [])]
            for key, text in exprs:
                if text:
                    try:
                        compile_expression(text)
                    except ExpressionError as exc:
                        problems.append(([section, i, key], str(exc)))
            if section == "attributes":
                source = entry.get("source", entry["name"])
                if codec["format"] == "json":
                    try:
                        parse_path(source)
                    except ValueError as exc:
                        problems.append(([section, i, "source" if "source" in entry else "name"], str(exc)))
                elif codec["format"] in ("binary", "modbus", "serial") and source not in fields:
                    problems.append(([section, i, "source" if "source" in entry else "name"],
                                     f"source {source!r} is not a field of the codec (have: {', '.join(sorted(fields))})"))
            if section == "commands" and enc.get("format") == "modbus":
                reg = next((r for r in codec.get("registers", []) if r["name"] == enc["register"]), None)
                if reg is None or reg["kind"] not in ("holding", "coil"):
                    problems.append(([section, i, "encoding", "register"], f"{enc['register']!r} is not a holding or coil register of the codec"))
    for f_i, spec in enumerate(codec.get("fields", [])):
        if spec.get("when"):
            try:
                compile_expression(spec["when"])
            except ExpressionError as exc:
                problems.append((["codec", "fields", f_i, "when"], str(exc)))
    for t_name, key in (("mqtt", "topics"), ("coap", "paths")):
        for j, template in enumerate(doc.get("transports", {}).get(t_name, {}).get(key, [])):
            names = _PLACEHOLDER.findall(template)
            if len(names) != len(set(names)):
                problems.append((["transports", t_name, key, j], f"placeholder repeated in {template!r}"))
    return problems


def load_profile(path: Path, schema_path: Path | None = None) -> Profile:
    """Read, validate and build one profile file; raises ProfileError(file, line, reason)."""
    file = str(path)
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        raise ProfileError(file, mark.line + 1 if mark else 1, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict) or root is None:
        raise ProfileError(file, 1, "a profile is a YAML mapping")
    validator = _validator(str(schema_path or PROFILE_DIR / "schema.json"))
    errors = list(validator.iter_errors(doc))
    if errors:
        error = best_match(errors)     # descends into oneOf/anyOf to the most relevant cause
        raise ProfileError(file, _line_of(root, error), _reason(error))
    problems = _check_semantics(doc)
    if problems:
        where, reason = problems[0]
        raise ProfileError(file, _node_at(root, where).start_mark.line + 1, "/".join(map(str, where)) + f": {reason}")
    return Profile.from_dict(doc, path.stem, file)


def _template_regex(template: str) -> tuple[re.Pattern, int]:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    literal = len(_PLACEHOLDER.sub("", template))
    return re.compile("^" + "".join(parts) + "$"), literal


class ProfileLibrary:
    """Every profile of a directory, by name and by MQTT topic / CoAP path template."""

    def __init__(self, profiles: dict[str, Profile]) -> None:
        """Wrap already loaded profiles (see load)."""
        self.profiles = profiles
        routes = []
        for profile in profiles.values():
            templates = (profile.mqtt or {}).get("topics", []) + (profile.coap or {}).get("paths", [])
            for template in templates:
                regex, literal = _template_regex(template)
                routes.append((literal, regex, profile))
        routes.sort(key=lambda r: -r[0])        # the most specific template wins
        self._routes = routes

    @classmethod
    def load(cls, directory: str | Path = PROFILE_DIR) -> "ProfileLibrary":
        """Load and validate every *.yaml in directory (schema.json beside them if present); raises ProfileError."""
        directory = Path(directory)
        schema = directory / "schema.json"
        schema = schema if schema.exists() else PROFILE_DIR / "schema.json"
        profiles: dict[str, Profile] = {}
        for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
            profile = load_profile(path, schema)
            if profile.name in profiles:
                raise ProfileError(str(path), 1, f"profile name {profile.name!r} is already used by {profiles[profile.name].file}")
            profiles[profile.name] = profile
        return cls(profiles)

    def get(self, name: str | None) -> Profile | None:
        """The profile of that name, or None."""
        return self.profiles.get(name) if name else None

    def by_topic(self, topic: str) -> tuple[Profile, dict] | None:
        """The profile whose topic/path template matches, and the captured fields (e.g. device_id)."""
        for _, regex, profile in self._routes:
            m = regex.match(topic)
            if m:
                return profile, m.groupdict()
        return None

    def __iter__(self):
        """Iterate the profiles."""
        return iter(self.profiles.values())

    def __len__(self) -> int:
        """How many profiles."""
        return len(self.profiles)
