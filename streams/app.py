"""The Faust app: one agent per consumer, each running the batch commit protocol.

Agents read raw bytes (``value_serializer="raw"``) so a malformed record reaches our codec
and the dead-letter topic instead of crashing Faust's deserializer. Each agent takes batches
with ``take_available`` (streams/batching.py: at once when idle, else Faust's window) and a
batch is acked only after ``BatchRunner.run`` returned, so offsets never pass unfinished work
(SPEC §4: Faust's ``concurrency>1`` commit gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka.errors import IllegalStateError
from faust.types import TP
from redis.asyncio import Redis

from models.codec import encode, make_event
from streams import liveness, metrics, seen
from streams.batching import take_available
from streams.config import Settings
from streams.keys import Keys
from streams.liveness import Heartbeat
from streams.pipeline import source_watermarks
from streams.stage import (
    PRODUCER_MAX_REQUEST_BYTES,
    REDIS_DOWN,
    BatchRunner,
    Consumer,
    Context,
    Record,
    StaleBatchError,
    Tx,
    produce,
)
from streams.topics import TopicRegistry

log = logging.getLogger("rmo.worker")


class FaustProducer:
    """Adapts Faust's producer to the runner's ``Producer`` protocol."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        return await self.app.producer.send(topic, key, value, partition=None, timestamp=None,
                                            headers=None)


def create_app(settings: Settings, registry: TopicRegistry, consumers: list[Consumer],
               redis: Redis, heartbeat: Heartbeat) -> faust.App:
    """Build the worker app for ``settings.namespace`` (consumer group ``rmo-{namespace}``);
    ``heartbeat`` is what it announces about itself (streams/liveness.py)."""
    bootstrap = settings.require_kafka()
    app = faust.App(
        f"rmo-{settings.namespace}",
        broker=[f"rmokafka://{b}" for b in bootstrap.split(",")],
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(settings.session_timeout_s / 6, 0.5),
        broker_rebalance_timeout=settings.session_timeout_s * 2,
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_linger=0.0,  # acks are awaited per batch: lingering only adds latency
        # a record's batch expires (is no longer retried) after this: within the seen-id
        # retention, so a late retry cannot land after its duplicate's bucket is dropped
        # (streams/seen.py, point d); Faust's default is 1,200 s
        producer_request_timeout=settings.seen_retention_s / 2,
        producer_max_batch_size=1 << 20,
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,  # dead letters of 1 MB records
        stream_buffer_maxsize=max(4 * max(batch_limit(c, settings) for c in consumers), 4096),
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        datadir=os.path.join(tempfile.gettempdir(), f"rmo-faust-{settings.namespace}"),
    )
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms  # read by streams.transport
    ctx = Context(settings=settings, keys=Keys(settings.namespace), topics=registry, redis=redis,
                  producer=FaustProducer(app))
    for consumer in consumers:
        _add_agent(app, consumer, ctx, settings)
    _add_metrics_timer(app, ctx, settings, heartbeat)
    _add_seen_rotation(app, ctx, [(c.name, c.source) for c in consumers])
    for consumer in consumers:
        if consumer.tick_s is not None:
            _add_tick(app, consumer, ctx)
    return app


def _every(app: faust.App, interval_s: float, name: str,
           work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` every ``interval_s`` seconds on the worker's loop (a Faust timer named
    ``name``). A run that fails is logged (``"{name} failed: ..."``) and the next one tries
    again: a periodic task never stops the worker. A Redis outage skips the run silently;
    the stages log outages themselves."""

    async def run() -> None:
        try:
            await work()
        except REDIS_DOWN:
            return
        except Exception as exc:  # noqa: BLE001 - e.g. no high watermark yet: next run
            log.warning("%s failed: %r; next try in %.0f s", name, exc, interval_s)

    run.__name__ = run.__qualname__ = name.replace(".", "_").replace(" ", "_")
    app.timer(interval_s)(run)


def _add_tick(app: faust.App, consumer: Consumer, ctx: Context) -> None:
    """Every ``consumer.tick_s``, ``consumer.tick`` and the production of what it emitted
    (streams/stage.py :meth:`Consumer.tick`).

    Raises (logged by :func:`_every`):
        RuntimeError: the tick queued writes, which only the commit protocol may apply.
    """

    async def tick() -> None:
        tx = Tx(ctx)
        await consumer.tick(tx)
        if tx.writes:
            raise RuntimeError(f"{consumer.name}.tick queued Redis writes; only a batch may write")
        await produce(tx)

    _every(app, consumer.tick_s, f"{consumer.name} tick", tick)


def _add_seen_rotation(app: faust.App, ctx: Context, sources: list[tuple[str, str]]) -> None:
    """Every ``seen_rotate_s``, one tick of the seen buckets' protocol (streams/seen.py) for
    ``sources`` ((consumer name, source role) pairs)."""
    settings = ctx.settings

    async def watermarks() -> dict[str, int]:
        return await source_watermarks(settings, ctx.topics, sources)

    async def rotate_seen() -> None:
        done = await seen.rotate(ctx.redis, ctx.keys, [name for name, _ in sources],
                                 watermarks, rotate_s=settings.seen_rotate_s,
                                 retention_s=settings.seen_retention_s)
        if done.dropped:
            log.debug("seen epochs %s dropped; %d..%d kept", done.dropped, done.oldest, done.current)

    _every(app, settings.seen_rotate_s, "seen rotation", rotate_seen)


def batch_limit(consumer: Consumer, settings: Settings) -> int:
    """Most records in one of ``consumer``'s batches: its own ``batch_max`` (the executor's
    is ``RMO_EXECUTOR_BATCH_MAX``) or ``RMO_BATCH_MAX``."""
    return consumer.batch_max or settings.batch_max


def _add_agent(app: faust.App, consumer: Consumer, ctx: Context, settings: Settings) -> None:
    topic = app.topic(ctx.topics.name(consumer.source), value_type=bytes, value_serializer="raw",
                      key_type=bytes, key_serializer="raw",
                      partitions=ctx.topics.specs[consumer.source].partitions)
    runner = BatchRunner(consumer, ctx)

    async def agent(stream: faust.StreamT) -> None:
        async for events in take_available(stream, batch_limit(consumer, settings),
                                           settings.batch_within_s):
            records = [Record(e.message.topic, e.message.partition, e.message.offset,
                              e.message.key, e.message.value) for e in events]
            while records:  # Faust acks the delivery once every part of it is applied
                n = await consumer.admit(len(records), ctx)
                holes = await _run_until_applied(runner, records[:n])
                records = records[n:]
                if holes:
                    await _seek_back(app, consumer.name, holes)
                    records = [r for r in records if (r.topic, r.partition) not in holes]

    agent.__name__ = agent.__qualname__ = consumer.name.replace(".", "_")
    app.agent(topic, name=f"rmo.{consumer.name}")(agent)


async def _run_until_applied(runner: BatchRunner, records: list[Record]) -> dict[tuple[str, int], int]:
    """Apply a batch; returns its holes (streams/stage.py step 1: partition -> offset to seek
    back to). An unexpected error is logged and the batch retried with backoff, so a bug or a
    broker hiccup stalls this partition loudly instead of crashing the agent or skipping
    records (the offsets are not acked until the batch is applied)."""
    delay = 1.0
    while True:
        try:
            return (await runner.run(records)).holes
        except StaleBatchError as exc:
            log.warning("%s: batch skipped, %s", runner.consumer.name, exc)
            return {}
        except Exception:
            log.exception("%s: batch of %d failed; retrying in %.0f s", runner.consumer.name,
                          len(records), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _seek_back(app: faust.App, consumer: str, holes: dict[tuple[str, int], int]) -> None:
    """Move the fetch position of each partition of ``holes`` back to its offset, so the
    records Faust did not deliver come again (streams/stage.py step 1). A partition this
    worker no longer holds is left to its new owner, whose step 1 finds the same hole."""
    for (topic, partition), offset in holes.items():
        try:
            await app.consumer.seek(TP(topic, partition), offset)
        except IllegalStateError:
            log.info("%s: %s[%d] was reassigned before the seek back to %d", consumer, topic,
                     partition, offset)


def _add_metrics_timer(app: faust.App, ctx: Context, settings: Settings, hb: Heartbeat) -> None:
    """The worker's heartbeat (streams/liveness.py) and its MetricsSnapshot every
    ``metrics_interval_s`` seconds. The worker writes its first heartbeat (``joining``) before
    the app starts (streams/worker.py); here it is written again when the consumer group's
    rebalance completed (``running``), refreshed, and deleted on shutdown, so
    `rmo demo` can tell a worker that is joining from one that runs or one that has stopped."""
    state = {"since": datetime.now(UTC), "hb": hb}

    async def announce(worker_state: str | None = None) -> None:
        if worker_state is not None:
            state["hb"] = replace(state["hb"], state=worker_state)
        with contextlib.suppress(*REDIS_DOWN):  # the stages log Redis outages themselves
            await liveness.beat(ctx.redis, ctx.keys, state["hb"], settings.metrics_interval_s)

    @app.on_rebalance_complete.connect
    async def announce_running(sender: faust.App, **_: Any) -> None:
        await announce("running")

    @app.on_before_shutdown.connect
    async def announce_stop(sender: faust.App, **_: Any) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            await asyncio.wait_for(liveness.clear(ctx.redis, ctx.keys, hb.host, hb.pid), 1.0)

    @app.timer(settings.metrics_interval_s)
    async def publish_metrics() -> None:
        """Heartbeat and MetricsSnapshot; skipped, not fatal, while Redis is unreachable."""
        await announce()
        try:
            await _publish(datetime.now(UTC))
        except REDIS_DOWN:
            pass

    async def _publish(now: datetime) -> None:
        snap = await metrics.collect(ctx.redis, ctx.keys, state["since"], now)
        state["since"] = now
        event = make_event(snap, producer=f"worker.{hb.worker_id}", correlation_id="metrics")
        fut = await ctx.producer.send(ctx.topics.name("metrics"), b"metrics", encode(event))
        await fut
