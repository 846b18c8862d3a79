"""The temporal API's history read back from InfluxDB 1.x: the same `history(tenant, HistoryQuery)` the stores offer.

The forwarder (with the instances option, on when CITYBRIDGE_TEMPORAL_SOURCE=influxdb) writes every history row in
full to the measurement `citybridge_instances`: tags tenant, entity_id, attr (expanded IRI), dataset_id; one string
field `row` = {"seq", "type", "kind", "observed", "created", "modified", "deleted", "instance"}; time = observed.
This module reads it with InfluxQL (one statement per chunk of entity ids, GROUP BY entity/attr/dataset with
LIMIT for the per-attribute cap), rebuilds the `HistoryRow`s and orders and caps them as the stores do, so the
temporal API renders identical answers from either source.
"""
from __future__ import annotations

import orjson

from ..store.base import HistoryQuery, HistoryRow
from .influx import InfluxV1
from .lineprotocol import DIVISORS, INSTANCE_MEASUREMENT
from .timerange import TIME_FIELDS

_CHUNK = 100  # entity ids per InfluxQL statement


def quote(text: str) -> str:
    """An InfluxQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _any_of(tag: str, values) -> str:
    return "(" + " OR ".join(f'"{tag}" = {quote(v)}' for v in values) + ")"


class InfluxHistory:
    """History rows of a tenant read from InfluxDB 1.x (the citybridge_instances measurement)."""

    def __init__(self, client: InfluxV1):
        self.client = client
        self.unit = DIVISORS[client.precision]  # µs per stored time step (times were cut to it when written)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.client.close()

    def statements(self, tenant: str, query: HistoryQuery) -> list[str]:
        """The InfluxQL SELECTs of a query (several when there are many entity ids)."""
        observed = query.timeproperty == "observedAt"
        clauses = [f'"tenant" = {quote(tenant)}']
        if query.attrs is not None:
            clauses.append(_any_of("attr", sorted(query.attrs)))
        if observed and query.start is not None:
            clauses.append(f"time >= {query.start // self.unit * self.unit * 1000}")  # ns; a time cut down still in
        if observed and query.end is not None:
            clauses.append(f"time < {query.end * 1000}")
        tail = ' GROUP BY "entity_id", "attr", "dataset_id" ORDER BY time ' + ("DESC" if query.newest_first else "ASC")
        if observed and query.per_attr is not None:
            # one point more per series when times were cut: at most one may lie just before start
            tail += f" LIMIT {query.per_attr + (1 if self.unit > 1 else 0)}"
        out = []
        for begin in range(0, len(query.entity_ids), _CHUNK):
            ids = query.entity_ids[begin:begin + _CHUNK]
            where = " AND ".join([clauses[0], _any_of("entity_id", ids), *clauses[1:]])
            out.append(f'SELECT "row" FROM "{INSTANCE_MEASUREMENT}" WHERE {where}{tail}')
        return out

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
        """History rows matching the query, grouped by entity and attribute, in time order (newest first if asked)."""
        if not query.entity_ids or (query.attrs is not None and not query.attrs):
            return []
        results = await self.client.query(";".join(self.statements(tenant, query)))
        column = TIME_FIELDS[query.timeproperty]
        groups: dict[tuple[str, str], list[HistoryRow]] = {}
        for result in results:
            for series in result.get("series", []):
                tags = series.get("tags", {})
                entity_id, attr, dataset_id = tags["entity_id"], tags["attr"], tags.get("dataset_id", "")
                at = series["columns"].index("row")
                for values in series["values"]:
                    row = _row(entity_id, attr, dataset_id, orjson.loads(values[at]))
                    moment = getattr(row, column)
                    if (query.start is None or moment >= query.start) and (query.end is None or moment < query.end):
                        groups.setdefault((entity_id, attr), []).append(row)
        out: list[HistoryRow] = []
        for key in sorted(groups):
            rows = sorted(groups[key], key=lambda r: (getattr(r, column), r.seq), reverse=query.newest_first)
            out.extend(rows if query.per_attr is None else rows[:query.per_attr])
        return out


def _row(entity_id: str, attr: str, dataset_id: str, full: dict) -> HistoryRow:
    return HistoryRow(entity_id, full["type"], attr, dataset_id, full["kind"], full["observed"], full["created"],
                      full["modified"], full["deleted"], orjson.dumps(full["instance"]), full["seq"])


def reader_from_settings(settings, store):
    """What the temporal API reads history from: the store, or InfluxHistory when temporal_source is influxdb."""
    if settings.temporal_source != "influxdb":
        return store
    if not settings.influx_url:
        raise ValueError("CITYBRIDGE_TEMPORAL_SOURCE=influxdb needs CITYBRIDGE_INFLUX_URL (an InfluxDB 1.x)")
    from .influx import influx_version
    if influx_version(settings) != "1":
        raise ValueError("CITYBRIDGE_TEMPORAL_SOURCE=influxdb reads InfluxDB 1.x (InfluxQL /query); "
                         "with InfluxDB 2.x/3.x keep the temporal source 'store'")
    return InfluxHistory(InfluxV1(settings.influx_url, settings.influx_database,
                                  retention_policy=settings.influx_retention_policy,
                                  username=settings.influx_username, password=settings.influx_password,
                                  precision=settings.influx_precision))
