"""The temporal representation of entities (clauses 4.5.7, 4.5.9, 4.5.19): normalized, temporalValues, aggregated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..context.model import NULL_URI, VALUE_MEMBER, Renderer
from ..store.base import HistoryRow
from .aggregate import aggregate, periods
from .timerange import TIME_FIELDS, TemporalQ, iso_from_micros

INSTANCE_ID = "urn:ngsi-ld:attribute:instance:"
_PLURAL = {"value": "values", "object": "objects", "languageMap": "languageMaps", "valueList": "valueLists",
           "objectList": "objectLists", "json": "jsons", "vocab": "vocabs"}


@dataclass(slots=True)
class Aggregation:
    """aggrMethods and aggrPeriodDuration (µs, 0 = the whole range) of an aggregated query."""

    methods: list[str]
    period: int


class TemporalRenderer:
    """Renders a current entity with its history rows in the format a temporal request asks for."""

    def __init__(self, renderer: Renderer, when: TemporalQ, *, values: bool = False,
                 aggregation: Aggregation | None = None, last_n: int | None = None):
        self.renderer = renderer
        self.when = when
        self.values = values
        self.aggregation = aggregation
        self.last_n = last_n
        self._time = TIME_FIELDS[when.timeproperty]

    def entity(self, doc: dict, rows: list[HistoryRow]) -> dict:
        """One entity (id, type, scope from its current state) with the temporal evolution of its attributes."""
        head = self.renderer.entity({**doc, "attrs": {}})
        by_attr: dict[str, list[HistoryRow]] = {}
        for row in sorted(rows, key=lambda r: (getattr(r, self._time), r.seq)):
            by_attr.setdefault(row.attr, []).append(row)
        for attr, attr_rows in by_attr.items():
            head[self.renderer.terms.compact(attr)] = self._attribute(attr_rows)
        return head

    def _attribute(self, rows: list[HistoryRow]) -> Any:
        if self.aggregation is None and not self.values:
            return [self._instance(row) for row in rows]
        by_dataset: dict[str, list[HistoryRow]] = {}
        for row in rows:
            by_dataset.setdefault(row.dataset_id, []).append(row)
        rendered = []
        for dataset, dataset_rows in by_dataset.items():
            live = [r for r in dataset_rows if not r.deleted]
            kind = dataset_rows[-1].kind
            out: dict[str, Any] = {"type": kind}
            if self.aggregation is not None:
                out.update(self._aggregated(live))
            else:
                out[_PLURAL[VALUE_MEMBER[kind]]] = [[self._value(r), iso_from_micros(getattr(r, self._time))] for r in live]
            if dataset:
                out["datasetId"] = dataset
            rendered.append(out)
        return rendered[0] if len(rendered) == 1 else rendered

    def _instance(self, row: HistoryRow) -> dict:
        inst = orjson.loads(row.instance)
        if row.deleted:
            out = {"type": row.kind, VALUE_MEMBER[row.kind]: NULL_URI, "deletedAt": inst["deletedAt"]}
            if row.dataset_id:
                out["datasetId"] = row.dataset_id
        else:
            out = self.renderer.instance(inst)
        out["instanceId"] = f"{INSTANCE_ID}{row.seq}"
        return out

    def _value(self, row: HistoryRow) -> Any:
        inst = orjson.loads(row.instance)
        return self.renderer.instance(inst).get(VALUE_MEMBER[row.kind], inst[VALUE_MEMBER[row.kind]])

    def _aggregated(self, rows: list[HistoryRow]) -> dict:
        points = [(getattr(r, self._time), orjson.loads(r.instance)[VALUE_MEMBER[r.kind]]) for r in rows]
        spans = periods(points, self.aggregation.period, self.when.time_at, self.when.end)
        if self.last_n is not None:
            spans = spans[-self.last_n:]
        return {method: [[aggregate(method, values), iso_from_micros(start), iso_from_micros(end)]
                         for start, end, values in spans] for method in self.aggregation.methods}
