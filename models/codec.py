"""One orjson codec for every topic, and the constructors of envelopes.

Derived events get deterministic ids (SPEC §3): ``sha256(causation_id | producer | attempt |
discriminator)``, so a stage that re-processes an input after a crash re-produces the same
ids and consumers drop the duplicates.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from models.catalogue import EVENT_TYPES, PAYLOADS, AnyEvent
from models.events import Envelope, Frozen

MAX_VALUE_BYTES = 1_000_000
"""Records larger than this are dead-lettered unread (Kafka's default max.message.bytes)."""

_ADAPTER: TypeAdapter[Envelope] = TypeAdapter(AnyEvent)


class CodecError(ValueError):
    """A record value that is not a valid envelope. ``kind`` is one of ``not_json``,
    ``not_object``, ``unknown_event_type``, ``schema`` or ``oversized``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def encode(event: Envelope) -> bytes:
    """Serialize an envelope to the JSON bytes written to Kafka."""
    return orjson.dumps(event.model_dump(mode="json"))


def decode(value: bytes | None, max_bytes: int | None = MAX_VALUE_BYTES) -> Envelope:
    """Parse and validate one record value. ``max_bytes`` (None: no limit) guards the stages;
    readers of history, such as the dead letters of oversized records, lift it.

    Raises:
        CodecError: the bytes are oversized, not JSON, not an object, of an unknown
            ``event_type``, or fail the type's schema.
    """
    if value is None:
        raise CodecError("not_json", "record has no value (tombstone)")
    if max_bytes is not None and len(value) > max_bytes:
        raise CodecError("oversized", f"{len(value)} bytes > {max_bytes}")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise CodecError("not_json", str(exc)) from None
    if not isinstance(raw, dict):
        raise CodecError("not_object", f"expected a JSON object, got {type(raw).__name__}")
    event_type = raw.get("event_type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise CodecError("unknown_event_type", f"event_type={raw.get('event_type')!r}")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise CodecError("schema", describe_validation(exc)) from None


def describe_validation(exc: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one line: ``field 'payload.kind': input should be 'code' or 'text'
    (got 'sql'); field 'payload.prompt': required, missing`` (the first ``limit`` problems;
    discriminated-union tags such as ``TaskSubmitted`` are left out of the path)."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in EVENT_TYPES))
        if err["type"] == "missing":
            message = "required, missing"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = err["msg"].removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
            shown = f"{err.get('input')!r:.60}"
            if not isinstance(err.get("input"), dict | list) and shown not in message:
                message += f" (got {shown})"
        parts.append(f"field '{loc}': {message}" if loc else message)
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def derive_event_id(causation_id: str, producer: str, attempt: int = 0, discriminator: str = "") -> str:
    """Deterministic id of a derived event: 32 hex chars of sha256 over its causes."""
    # JSON, not a joined string: ("a|b", "c") and ("a", "b|c") must not collide
    h = hashlib.sha256(orjson.dumps([causation_id, producer, attempt, discriminator]))
    return h.hexdigest()[:32]


def utcnow() -> datetime:
    """Wall-clock UTC time, used only for the ``occurred_at`` of newly produced events."""
    return datetime.now(UTC)


def make_event(
    payload: Frozen,
    *,
    producer: str,
    cause: Envelope | None = None,
    correlation_id: str | None = None,
    attempt: int = 0,
    discriminator: str = "",
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> Envelope:
    """Build an envelope around ``payload``.

    With a ``cause`` the id is derived deterministically and the correlation id is inherited;
    without one (a root event) the id is random unless given.
    """
    name = type(payload).__name__
    if name not in PAYLOADS:
        raise TypeError(f"{name} is not an event payload")
    if cause is not None:
        eid = event_id or derive_event_id(cause.event_id, producer, attempt, discriminator)
        corr = correlation_id or cause.correlation_id
    else:
        eid = event_id or uuid.uuid4().hex
        corr = correlation_id or getattr(payload, "task_id", None) or eid
    return EVENT_TYPES[name](
        event_id=eid,
        event_type=name,
        occurred_at=occurred_at or utcnow(),
        correlation_id=corr,
        causation_id=cause.event_id if cause is not None else None,
        producer=producer,
        payload=payload,
    )


def json_schemas() -> dict[str, Any]:
    """event_type -> JSON Schema of its envelope (what ``rmo schema`` prints)."""
    return {name: model.model_json_schema() for name, model in EVENT_TYPES.items()}
