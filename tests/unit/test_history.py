"""Unit: history recording, temporal ranges and durations, temporal paging, line protocol, forwarder gaps."""
from __future__ import annotations

import orjson
import pytest

from middleware.context.errors import BadRequestData
from middleware.history.influx import Forwarder
from middleware.history.lineprotocol import to_line
from middleware.history.paging import trim
from middleware.history.recorder import record, to_micros
from middleware.history.timerange import iso_from_micros, parse_duration, parse_temporal_q
from middleware.store.base import HistoryRow

T = "https://uri.etsi.org/ngsi-ld/default-context/"
NOW = "2026-01-01T12:00:00.000Z"


def inst(value, modified: str = "2026-01-01T00:00:00.000Z", **extra) -> dict:
    """A stored Property instance."""
    return {"type": "Property", "value": value, "createdAt": "2026-01-01T00:00:00.000Z", "modifiedAt": modified, **extra}


def entity(**attrs) -> dict:
    """A stored Sensor with the given attributes (expanded names)."""
    return {"id": "urn:ngsi-ld:Sensor:1", "type": [T + "Sensor"], "attrs": {T + k: v for k, v in attrs.items()}}


def test_record_writes_changed_and_new_instances_only():
    """Unchanged instances give no row; a rewritten one (even with the same value) and a new one do."""
    old = entity(a=[inst(1)], b=[inst(2)])
    new = entity(a=[inst(1, NOW)], b=[inst(2)], c=[inst(3, NOW, observedAt="2026-01-01T06:00:00Z")])
    rows = record([(old, new)], NOW)
    assert [(r.attr, r.deleted) for r in rows] == [(T + "a", False), (T + "c", False)]
    assert rows[0].observed_at == to_micros(NOW) and rows[1].observed_at == to_micros("2026-01-01T06:00:00Z")
    assert rows[0].entity_type == T + "Sensor" and orjson.loads(rows[1].instance)["value"] == 3


def test_record_marks_deleted_instances_and_entities():
    """A removed instance (by datasetId) and every instance of a deleted entity get a deletion row at now."""
    old = entity(a=[inst(1), inst(5, datasetId="urn:d")])
    rows = record([(old, entity(a=[inst(1)]))], NOW)
    assert [(r.dataset_id, r.deleted) for r in rows] == [("urn:d", True)]
    assert orjson.loads(rows[0].instance) == {"type": "Property", "value": "urn:ngsi-ld:null", "deletedAt": NOW,
                                              "datasetId": "urn:d"}
    assert len(record([(old, None)], NOW)) == 2


def test_temporal_q_ranges():
    """before/after/between map to [start, end) in µs; bad combinations are BadRequestData."""
    at = to_micros("2026-01-01T00:00:00Z")
    assert parse_temporal_q("before", "2026-01-01T00:00:00Z", None, None).end == at
    assert parse_temporal_q("after", "2026-01-01T00:00:00Z", None, "createdAt").start == at + 1
    between = parse_temporal_q("between", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00,000Z", None)
    assert (between.start, between.end, between.time_at) == (at, at + 3_600_000_000, at)
    for args in (("between", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", None), ("after", None, None, None),
                 (None, "2026-01-01T00:00:00Z", None, None), ("before", "2026-01-01T00:00:00Z", None, "x"),
                 ("between", "2026-01-01T00:00:00Z", "2026-01-01T02:00:00+01:00", None),  # 4.6.3: UTC, "Z" only
                 ("before", "2026-01-01T00:00Z", None, None)):  # every component, seconds too
        with pytest.raises(BadRequestData):
            parse_temporal_q(*args)


@pytest.mark.parametrize("text,micros", [("P0D", 0), ("PT1H", 3_600_000_000), ("P1DT12H", 129_600_000_000),
                                         ("P1W", 604_800_000_000), ("PT0.5S", 500_000), ("PT15M", 900_000_000)])
def test_durations(text, micros):
    """ISO 8601 durations of weeks, days, hours, minutes, seconds."""
    assert parse_duration(text) == micros


@pytest.mark.parametrize("text", ["P", "PT", "P1M", "P1Y", "1H", "PT1H30", "P1DT"])
def test_bad_durations(text):
    """Years, months and malformed durations are BadRequestData."""
    with pytest.raises(BadRequestData):
        parse_duration(text)


def test_iso_from_micros():
    """Milliseconds unless the time has microseconds."""
    assert iso_from_micros(to_micros("2026-01-01T00:00:00Z")) == "2026-01-01T00:00:00.000Z"
    assert iso_from_micros(to_micros("2026-01-01T00:00:00.000001Z")) == "2026-01-01T00:00:00.000001Z"


def row(attr: str, t: int, seq: int = 0, **kw) -> HistoryRow:
    """A history row of a Property at time t (µs)."""
    fields = dict(entity_id="urn:e", entity_type=T + "Sensor", attr=attr, dataset_id="", kind="Property",
                  observed_at=t, created_at=t, modified_at=t, deleted=False, instance=b'{"value":1}', seq=seq)
    fields.update(kw)
    return HistoryRow(**fields)


def test_trim_cuts_every_attribute_at_the_common_time():
    """Forwards: the earliest n-th time of the cut attributes; backwards: the latest."""
    rows = [row("a", t) for t in (1, 2, 3)] + [row("b", t) for t in (1, 5)]
    kept, span = trim(rows, 2, newest_first=False, timeproperty="observedAt")
    assert [(r.attr, r.observed_at) for r in kept] == [("a", 1), ("a", 2), ("b", 1)] and span == (1, 2)
    newest = [row("a", t) for t in (9, 8, 7)] + [row("b", t) for t in (9, 2)]
    kept, span = trim(newest, 2, newest_first=True, timeproperty="observedAt")
    assert [(r.attr, r.observed_at) for r in kept] == [("a", 9), ("a", 8), ("b", 9)] and span == (9, 8)
    assert trim(rows[:2], 2, newest_first=False, timeproperty="observedAt") == (rows[:2], None)


def test_line_protocol_escapes_and_types():
    """Measurement and tags escaped, numbers as floats, strings quoted, deletions skipped."""
    text = row(T + "status", 5, instance=orjson.dumps({"type": "Property", "value": 'a "b"'}),
               entity_id="urn:x y", dataset_id="urn:d")
    line = to_line("city", text, lambda iri: iri.rsplit("/", 1)[-1], "dev,1", {"site": "s=1"})
    assert line == ('Sensor,dataset_id=urn:d,device_id=dev\\,1,entity_id=urn:x\\ y,site=s\\=1,tenant=city '
                    'status="a \\"b\\"" 5')
    number = row(T + "t", 7, instance=orjson.dumps({"type": "Property", "value": 20}))
    assert to_line("", number, lambda iri: "T", None, {}) == "T,entity_id=urn:e T=20.0 7"
    assert to_line("", row("a", 1, deleted=True), str, None, {}) is None


def test_forwarder_waits_for_a_gap_then_skips_it(monkeypatch):
    """Rows after a missing seq wait (a transaction may still commit it) until gap_wait has passed."""
    forwarder = Forwarder(None, None, str, gap_wait=30)
    forwarder.cursor = 10
    clock = [100.0]
    monkeypatch.setattr("middleware.history.influx.time.monotonic", lambda: clock[0])
    rows = [("", row("a", 1, seq)) for seq in (11, 12, 14, 15)]
    assert [r.seq for _, r in forwarder._contiguous(rows)] == [11, 12]
    forwarder.cursor = 12
    assert forwarder._contiguous(rows[2:]) == []
    clock[0] += 31
    assert [r.seq for _, r in forwarder._contiguous(rows[2:])] == [14, 15]
