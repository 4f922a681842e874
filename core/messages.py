"""Control messages carried inside sealed CONTROL frames: JSON objects, schema-checked.

Control frames are sequenced and acknowledged by the engine; this module only says what a
well-formed message is. Anything else is dropped and counted, never acted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .protocol import Drop, Dropped

SCHEMA = 1
MAX_CONTROL = 1200  # fits one frame at the smallest MTU we allow, with room to spare

KINDS = ("hello", "ack", "close_reason")


@dataclass(frozen=True)
class ControlMessage:
    kind: str
    seq: int
    body: dict[str, Any]


def encode(kind: str, seq: int, **body: Any) -> bytes:
    payload = json.dumps({"v": SCHEMA, "kind": kind, "seq": seq, **body}, separators=(",", ":"))
    data = payload.encode()
    if len(data) > MAX_CONTROL:
        raise ValueError(f"control message {kind!r} is {len(data)} bytes, over {MAX_CONTROL}")
    return data


def _short_str(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _valid_body(kind: str, body: dict[str, Any]) -> bool:
    if kind == "hello":
        return (
            body.get("role") in ("host", "vm")
            and _short_str(body.get("name"), 64)
            and _short_str(body.get("version"), 32)
        )
    if kind == "close_reason":
        return _short_str(body.get("reason"), 200)
    return kind == "ack"


def parse(payload: bytes) -> ControlMessage:
    if len(payload) > MAX_CONTROL:
        raise Dropped(Drop.CONTROL_INVALID)
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Dropped(Drop.CONTROL_INVALID) from None
    if not isinstance(obj, dict) or type(obj.get("v")) is not int or obj["v"] != SCHEMA:
        raise Dropped(Drop.CONTROL_INVALID)
    kind, seq = obj.get("kind"), obj.get("seq")
    if kind not in KINDS or type(seq) is not int or not 0 < seq < 1 << 53:
        raise Dropped(Drop.CONTROL_INVALID)
    body = {k: v for k, v in obj.items() if k not in ("v", "kind", "seq")}
    if not _valid_body(kind, body):
        raise Dropped(Drop.CONTROL_INVALID)
    return ControlMessage(kind, seq, body)
