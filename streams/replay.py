"""Replay: rebuild every projection from the log into a fresh namespace, and verify it.

Each consumer of the pipeline (streams/pipeline.py) reads its source topic again, in each
partition's order, and runs the same commit protocol in ``replay`` mode: no stage logic, no
produced events, only its projections, checkpoints and applied ids in the target namespace.
Projections use event times, never the wall clock, so the same log always rebuilds the same
state. "Caught up" is the high watermark of fetch responses (SPEC §2).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from redis.asyncio import Redis

from models.codec import CodecError, decode
from streams.client import read_topic
from streams.config import Settings
from streams.keys import Keys
from streams.stage import BatchRunner, Consumer, Context, Record
from streams.topics import TopicRegistry

REPLAY_BATCH = 2000


class ReplayTargetError(ValueError):
    """The target namespace already holds keys; replay only writes into an empty one."""


@dataclass
class ReplayReport:
    """What a replay did: events read and applied per consumer, and how fast (events/s)."""

    source: str
    target: str
    events: int = 0
    seconds: float = 0.0
    per_consumer: dict[str, int] = field(default_factory=dict)
    differences: list[str] | None = None

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"source_namespace": self.source, "target_namespace": self.target,
                "events": self.events, "seconds": round(self.seconds, 3),
                "events_per_s": round(self.events_per_s, 1), "per_consumer": self.per_consumer,
                "verified": None if self.differences is None else not self.differences,
                "differences": self.differences}


async def replay(settings: Settings, registry: TopicRegistry, consumers: Sequence[Consumer],
                 redis: Redis, target: str, *, from_offset: int | None = None,
                 from_time: datetime | None = None) -> ReplayReport:
    """Rebuild the projections of ``consumers`` from their topics into namespace ``target``.

    ``from_offset`` starts every partition at that offset; ``from_time`` skips events whose
    ``occurred_at`` is earlier. Raises ReplayTargetError if ``target`` is not empty.
    """
    target_keys = Keys(target)
    async for _ in redis.scan_iter(target_keys.pattern(), count=100):
        raise ReplayTargetError(f"namespace {target!r} already holds keys; pass a new --namespace")
    ctx = Context(settings=settings, keys=target_keys, topics=registry, redis=redis,
                  producer=None, mode="replay")
    report = ReplayReport(source=settings.namespace, target=target)
    started = time.perf_counter()

    async def rebuild(consumer: Consumer) -> None:
        runner = BatchRunner(consumer, ctx)
        topic = registry.name(consumer.source)
        start = {p: from_offset for p in range(registry.specs[consumer.source].partitions)} \
            if from_offset is not None else None
        batch: list[Record] = []
        n = 0
        async for record in read_topic(settings.require_kafka(), topic, start=start):
            if from_time is not None and _before(record, from_time):
                continue
            batch.append(record)
            if len(batch) >= REPLAY_BATCH:
                await runner.run(batch)
                n += len(batch)
                batch = []
        if batch:
            await runner.run(batch)
            n += len(batch)
        report.per_consumer[consumer.name] = n
        report.events += n

    # consumers own disjoint state (each projection reads one topic), so they rebuild
    # concurrently: one's Redis round trips overlap another's decoding
    await asyncio.gather(*(rebuild(c) for c in consumers))
    report.seconds = time.perf_counter() - started
    return report


def _before(record: Record, t: datetime) -> bool:
    try:
        return decode(record.value).occurred_at < t
    except CodecError:
        return False  # keep it: the replayed consumer dead-letters nothing, but counts it


async def projection_state(redis: Redis, keys: Keys, *, bookkeeping: bool = False) -> dict[str, object]:
    """Every projection key of a namespace (with ``bookkeeping``: checkpoints, applied ids
    and ephemeral keys too), keyed without the namespace prefix, with its value read by type."""
    state: dict[str, object] = {}
    prefix = len(keys.namespace) + 1
    async for key in redis.scan_iter(keys.pattern(), count=1000):
        if not bookkeeping and keys.is_bookkeeping(key):
            continue
        kind = await redis.type(key)
        if kind == "hash":
            value: object = await redis.hgetall(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        else:
            value = await redis.get(key)
        state[key[prefix:]] = value
    return state


async def verify(redis: Redis, live: Keys, rebuilt: Keys) -> list[str]:
    """Compare two namespaces key by key; returns one line per difference (empty: equal)."""
    a, b = await projection_state(redis, live), await projection_state(redis, rebuilt)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            diffs.append(f"{key}: only in live {live.namespace}")
        elif key not in a:
            diffs.append(f"{key}: only in rebuilt {rebuilt.namespace}")
        elif a[key] != b[key]:
            x, y = a[key], b[key]
            if isinstance(x, dict) and isinstance(y, dict):
                fields = sorted(f for f in set(x) | set(y) if x.get(f) != y.get(f))
                detail = ", ".join(f"{f}: {x.get(f)!r} != {y.get(f)!r}" for f in fields[:5])
                diffs.append(f"{key}: live != rebuilt ({detail})")
            else:
                diffs.append(f"{key}: live {_short(x)} != rebuilt {_short(y)}")
    return diffs


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."
