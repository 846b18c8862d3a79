"""Dead letters: every uplink that cannot be processed is kept with the reason and its raw bytes — never a silent drop.

Reasons are free text that starts with a short code, e.g. ``unknown-device: no device 'x' with apikey 'k'`` or
``decode-error: expected 8 bytes, got 3``; the code is the Prometheus label (see middleware/metrics.py).

Concurrent `add` calls are written together in one transaction (group commit): each caller still waits until its
letter is durable, but a burst of bad uplinks costs a few writes, not one per uplink.
"""
from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime, timezone

from .. import metrics
from ..store.base import DeadLetterRecord
from .types import Device, Uplink

log = logging.getLogger("citybridge.deadletters")

MAX_PAYLOAD = 1024 * 1024  # bytes of an uplink kept in a dead letter; longer payloads are truncated (and say so)


class DeadLetters:
    """Records undeliverable uplinks in the store and lists them (newest first)."""

    def __init__(self, store, *, keep: int = 100_000, trim_every: int = 1000):
        self.store = store
        self.keep = keep
        self.trim_every = trim_every
        self._pending: list[tuple[DeadLetterRecord, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._since_trim = 0

    async def add(self, uplink: Uplink, reason: str, device: Device | None = None) -> DeadLetterRecord:
        """Record an uplink that cannot be processed (with the device when it is known); return once it is stored."""
        payload = uplink.payload
        if len(payload) > MAX_PAYLOAD:
            reason = f"{reason} (payload truncated to {MAX_PAYLOAD} of {len(payload)} bytes)"
            payload = payload[:MAX_PAYLOAD]
        record = DeadLetterRecord(
            seq=None, time=uplink.received_at, transport=uplink.transport, topic=uplink.topic, address=uplink.address,
            tenant=device.tenant if device is not None else None,
            device_id=device.device_id if device is not None else None,
            reason=reason, payload_b64=base64.b64encode(payload).decode("ascii"))
        metrics.deadletter(reason)
        log.warning("dead letter: %s (transport %s, topic %s, from %s, device %s, %d bytes)", reason, uplink.transport,
                    uplink.topic, uplink.address, record.device_id, len(uplink.payload))
        done = asyncio.get_running_loop().create_future()
        self._pending.append((record, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(done)
        return record

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.store.add_deadletters([record for record, _ in batch])
            except Exception as exc:
                log.exception("%d dead letters could not be stored", len(batch))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
            self._since_trim += len(batch)
            if self._since_trim >= self.trim_every:
                self._since_trim = 0
                try:
                    await self.store.trim_deadletters(self.keep)
                except Exception:
                    log.exception("trimming dead letters failed")

    async def list(self, limit: int = 20, offset: int = 0, *,
                   tenant: str | None = None) -> tuple[list[DeadLetterRecord], int]:
        """A page of dead letters, newest first (tenant None: all tenants and unknown senders), and their total."""
        return await self.store.list_deadletters(limit, offset, tenant=tenant)

    async def count(self, tenant: str | None = None) -> int:
        """How many dead letters are kept (tenant None: all)."""
        return await self.store.count_deadletters(tenant)

    async def close(self) -> None:
        """Wait for letters still being written."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)


def as_json(record: DeadLetterRecord) -> dict:
    """The JSON form of a dead letter on GET /iot/deadletters."""
    when = datetime.fromtimestamp(record.time, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"id": record.seq, "time": when, "transport": record.transport, "topic": record.topic,
            "address": record.address, "service": record.tenant, "device_id": record.device_id,
            "reason": record.reason, "payload_b64": record.payload_b64}
