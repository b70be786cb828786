"""Lineage: the causation tree of one task's events across every topic (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from models.codec import CodecError, decode
from models.events import Envelope
from streams.client import read_topic
from streams.config import Settings
from streams.topics import TopicRegistry

ROLES = ("tasks", "analyses", "decisions", "calls", "executions", "validations", "errors",
         "rewards", "system", "deadletter")


@dataclass
class Node:
    """One event and where it sits in the log; ``children`` are the events it caused."""

    event: Envelope
    topic: str
    partition: int
    offset: int
    children: list[Node] = field(default_factory=list)

    def to_dict(self, payload: bool = False) -> dict:
        """This node and its subtree as JSON-ready dicts: event id, type, producer,
        ``occurred_at`` (RFC 3339), ``causation_id``, topic, partition, offset, children and,
        with ``payload``, the event's ``payload`` in full (the wire JSON's field values)."""
        e = self.event
        d = {"event_id": e.event_id, "event_type": e.event_type, "producer": e.producer,
             "occurred_at": e.occurred_at.isoformat(), "causation_id": e.causation_id,
             "topic": self.topic, "partition": self.partition, "offset": self.offset}
        if payload:
            d["payload"] = e.payload.model_dump(mode="json")
        d["children"] = [c.to_dict(payload) for c in self.children]
        return d

    def render(self, depth: int = 0, payload: bool = False) -> list[str]:
        """One line per event, indented by depth; with ``payload``, each event's line is
        followed by its payload's fields, one per line, long values shortened to
        :data:`PAYLOAD_VALUE_CHARS` characters (``--json`` has them in full)."""
        e = self.event
        pad = "  " * depth
        line = (f"{pad}{e.event_type}  {e.producer}  {e.occurred_at.isoformat()}  "
                f"{self.topic}[{self.partition}]@{self.offset}  {e.event_id}")
        lines = [line]
        if payload:
            for name, value in e.payload.model_dump(mode="json").items():
                lines.append(f"{pad}    | {name}: {_shorten(value)}")
        return lines + [x for c in self.children for x in c.render(depth + 1, payload)]


PAYLOAD_VALUE_CHARS = 200
"""Characters of one payload value shown by the plain rendering."""


def _shorten(value: object) -> str:
    # JSON, so strings show their quotes and newlines stay on one line
    text = orjson.dumps(value).decode()
    if len(text) <= PAYLOAD_VALUE_CHARS:
        return text
    return f"{text[:PAYLOAD_VALUE_CHARS]}… ({len(text)} chars)"


async def lineage(settings: Settings, registry: TopicRegistry, task_id: str) -> list[Node]:
    """The roots of ``task_id``'s causation forest (events whose cause is not the task's),
    children in log order. Duplicates of one event id (re-produced after a crash) appear once."""
    nodes: dict[str, Node] = {}
    for role in ROLES:
        async for r in read_topic(settings.require_kafka(), registry.name(role)):
            try:
                e = decode(r.value, max_bytes=None)
            except CodecError:
                continue
            if e.correlation_id == task_id and e.event_id not in nodes:
                nodes[e.event_id] = Node(e, r.topic, r.partition, r.offset)
    roots = []
    for node in sorted(nodes.values(), key=lambda n: n.event.occurred_at):
        parent = nodes.get(node.event.causation_id or "")
        (parent.children if parent else roots).append(node)
    return roots
