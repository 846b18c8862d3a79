"""DeadLetters in-process on a real SQLite store: what a letter keeps, group commit, listing, trimming, metrics."""
from __future__ import annotations

import asyncio
import base64

import pytest

from middleware import metrics
from middleware.devices.deadletters import MAX_PAYLOAD, DeadLetters, as_json
from middleware.devices.types import Device, Uplink


def uplink(payload: bytes = b"\x01\x02garbage", topic: str = "/json/k1/dev-1/attrs", at: float = 1_700_000_000.25):
    """An MQTT uplink."""
    return Uplink("mqtt", "broker:1883", topic, payload, at)


def sample(name: str, **labels) -> float:
    """The current value of a counter sample (0 when absent)."""
    value = metrics.registry().get_sample_value(name, labels or None)
    return value or 0.0


async def test_a_letter_keeps_where_why_and_the_raw_bytes(store):
    """Time, transport, topic, address, device (when known), reason and the payload as base64."""
    letters = DeadLetters(store)
    device = Device(tenant="siheung", service_path="/dust", device_id="dev-1",
                    entity_name="urn:ngsi-ld:AirQualityObserved:dev-1", entity_type="AirQualityObserved")
    await letters.add(uplink(), "decode-error: not JSON", device)
    await letters.add(uplink(b"", topic="/json/k9/ghost/attrs"), "unknown-device: no device 'ghost'")
    records, total = await letters.list()
    assert total == 2 and await letters.count() == 2
    ghost, known = records
    assert known.tenant == "siheung" and known.device_id == "dev-1"
    assert base64.b64decode(known.payload_b64) == b"\x01\x02garbage"
    assert ghost.tenant is None and ghost.device_id is None and ghost.payload_b64 == ""
    assert as_json(known) == {"id": known.seq, "time": "2023-11-14T22:13:20.250Z", "transport": "mqtt",
                              "topic": "/json/k1/dev-1/attrs", "address": "broker:1883", "service": "siheung",
                              "device_id": "dev-1", "reason": "decode-error: not JSON",
                              "payload_b64": known.payload_b64}
    only, count = await letters.list(tenant="siheung")
    assert count == 1 and only[0].device_id == "dev-1"
    assert await letters.count("siheung") == 1


async def test_concurrent_letters_are_all_written(store):
    """A burst of concurrent adds is group-committed: every letter is stored, each add returns once durable."""
    letters = DeadLetters(store)
    await asyncio.gather(*(letters.add(uplink(str(n).encode()), f"decode-error: #{n}") for n in range(200)))
    records, total = await letters.list(limit=1000)
    assert total == 200
    assert sorted(base64.b64decode(r.payload_b64).decode() for r in records) == sorted(str(n) for n in range(200))
    page, _ = await letters.list(limit=5, offset=10)
    assert [r.seq for r in page] == [r.seq for r in records[10:15]]
    assert records[0].seq > records[-1].seq  # newest first


async def test_old_letters_are_trimmed(store):
    """Only the newest `keep` letters are kept once trimming runs."""
    letters = DeadLetters(store, keep=10, trim_every=5)
    for n in range(30):
        await letters.add(uplink(str(n).encode()), "decode-error: x")
    records, total = await letters.list(limit=100)
    assert total <= 15
    assert base64.b64decode(records[0].payload_b64) == b"29"


async def test_huge_payloads_are_truncated_and_say_so(store):
    """A payload above MAX_PAYLOAD is cut, and the reason tells the original size."""
    letters = DeadLetters(store)
    record = await letters.add(uplink(b"x" * (MAX_PAYLOAD + 10)), "decode-error: too big")
    assert len(base64.b64decode(record.payload_b64)) == MAX_PAYLOAD
    assert f"of {MAX_PAYLOAD + 10} bytes" in record.reason


class BrokenStore:
    """A store whose writes fail."""

    async def add_deadletters(self, rows):
        """Fail like a full disk."""
        raise OSError("disk full")


async def test_a_store_failure_reaches_the_caller():
    """If the store cannot write, add raises (the uplink is not acknowledged and will come again)."""
    letters = DeadLetters(BrokenStore())
    with pytest.raises(OSError, match="disk full"):
        await letters.add(uplink(), "decode-error: x")
    await letters.close()


async def test_letters_are_counted_per_reason_code(store):
    """The Prometheus counter is labelled by the reason's code, not its free text."""
    letters = DeadLetters(store)
    before = sample("citybridge_deadletters_total", reason="decode-error")
    other = sample("citybridge_deadletters_total", reason="other")
    await letters.add(uplink(), "decode-error: byte 3")
    await letters.add(uplink(), "decode-error: byte 4")
    await letters.add(uplink(), "Something Odd happened")
    assert sample("citybridge_deadletters_total", reason="decode-error") == before + 2
    assert sample("citybridge_deadletters_total", reason="other") == other + 1


def test_metrics_api():
    """uplink / committed / notification move their counters; reason_code keeps labels bounded."""
    up = sample("citybridge_uplinks_total", transport="coap")
    done = sample("citybridge_measurements_committed_total")
    failed = sample("citybridge_notifications_total", outcome="failed")
    metrics.uplink("coap")
    metrics.committed(7)
    metrics.committed(0)
    metrics.notification(ok=False)
    assert sample("citybridge_uplinks_total", transport="coap") == up + 1
    assert sample("citybridge_measurements_committed_total") == done + 7
    assert sample("citybridge_notifications_total", outcome="failed") == failed + 1
    assert metrics.reason_code("unknown-device: x") == "unknown-device"
    assert metrics.reason_code("x" * 80) == "other"
    body, content_type = metrics.render("application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")
