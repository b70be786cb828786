"""Lineage: the causation tree of one task's events across every topic (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def to_dict(self) -> dict:
        e = self.event
        return {"event_id": e.event_id, "event_type": e.event_type, "producer": e.producer,
                "occurred_at": e.occurred_at.isoformat(), "topic": self.topic,
                "partition": self.partition, "offset": self.offset,
                "children": [c.to_dict() for c in self.children]}

    def render(self, depth: int = 0) -> list[str]:
        e = self.event
        line = (f"{'  ' * depth}{e.event_type}  {e.producer}  {e.occurred_at.isoformat()}  "
                f"{self.topic}[{self.partition}]@{self.offset}  {e.event_id}")
        return [line] + [x for c in self.children for x in c.render(depth + 1)]


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
