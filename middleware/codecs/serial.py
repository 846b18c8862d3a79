"""Serial frames (PMS5003, SDS011-class modules): header, length, trailer, checksum; and a stream splitter."""
from __future__ import annotations

from typing import Any

from middleware.devices.types import DecodeError


def checksum(frame: bytes, spec: dict) -> int:
    """The checksum over frame[from:to] with the spec's algorithm (sum8, sum16, xor8)."""
    body = frame[spec["from"]:spec["to"]]
    if spec["algorithm"] == "sum16":
        return sum(body) & 0xFFFF
    if spec["algorithm"] == "sum8":
        return sum(body) & 0xFF
    x = 0
    for b in body:
        x ^= b
    return x


def check_frame(frame: bytes, framing: dict) -> None:
    """Raise DecodeError unless frame has the header, length, trailer and checksum the framing describes."""
    header = bytes.fromhex(framing["header"])
    if not frame.startswith(header):
        raise DecodeError(f"frame does not start with {header.hex().upper()}: {frame[:len(header)].hex().upper()}")
    if len(frame) != framing["length"]:
        raise DecodeError(f"frame is {len(frame)} bytes, expected {framing['length']}")
    trailer = bytes.fromhex(framing.get("trailer", ""))
    if trailer and not frame.endswith(trailer):
        raise DecodeError(f"frame does not end with {trailer.hex().upper()}: {frame[-len(trailer):].hex().upper()}")
    spec = framing.get("checksum")
    if spec:
        size = 2 if spec["algorithm"] == "sum16" else 1
        stored = int.from_bytes(frame[spec["at"]:spec["at"] + size], spec.get("byte_order", "big"))
        computed = checksum(frame, spec)
        if stored != computed:
            raise DecodeError(f"bad checksum: frame says 0x{stored:0{size * 2}X}, bytes sum to 0x{computed:0{size * 2}X}")


class FrameSplitter:
    """Cut a serial byte stream into checked frames: feed() chunks, get whole frames; garbage is skipped and counted."""

    def __init__(self, framing: dict) -> None:
        """Use a profile's codec.framing."""
        self.framing = framing
        self.header = bytes.fromhex(framing["header"])
        self.length = framing["length"]
        self.buffer = bytearray()
        self.skipped = 0          # bytes discarded while resynchronising
        self.rejected: list[tuple[bytes, str]] = []   # frame-shaped bytes that failed the check, with the reason

    @classmethod
    def for_profile(cls, profile: Any) -> "FrameSplitter":
        """A splitter for a serial profile."""
        return cls(profile.codec["framing"])

    def feed(self, chunk: bytes) -> list[bytes]:
        """Append bytes; return the complete, valid frames now available (rejected ones go to .rejected)."""
        self.buffer.extend(chunk)
        frames: list[bytes] = []
        while True:
            start = self.buffer.find(self.header)
            if start < 0:
                keep = len(self.header) - 1          # a header may be split across chunks
                drop = max(0, len(self.buffer) - keep)
                self.skipped += drop
                del self.buffer[:drop]
                return frames
            if start:
                self.skipped += start
                del self.buffer[:start]
            if len(self.buffer) < self.length:
                return frames
            candidate = bytes(self.buffer[:self.length])
            try:
                check_frame(candidate, self.framing)
            except DecodeError as exc:
                self.rejected.append((candidate, str(exc)))
                del self.buffer[:1]                   # resync from the next byte
                self.skipped += 1
                continue
            frames.append(candidate)
            del self.buffer[:self.length]
