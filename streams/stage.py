"""The batch commit protocol every consumer runs: stages live, projections in replay.

One batch is a list of records from one consumer's source topic. ``BatchRunner.run`` applies it
**effectively once** (SPEC §5):

1. Read the consumer's checkpoint for each topic-partition in the batch and drop records at
   or below it: they were applied before a crash or rebalance (a batch with nothing left
   ends here). A partition whose remaining records do not run on without a gap from the
   one right after its checkpoint came with a **hole**: records the client never handed
   over (seen across a rebalance: a worker handed offset 3,146 right after 3,144, and Faust
   cancels a delivery a rebalance interrupts yet records its offset as read;
   docs/performance.md), or that a previous owner's Kafka commit passed. Its records from the gap on are left out of the
   batch and ``Tx.holes`` names the offset to seek back to, so the missing records come
   again and the checkpoint never passes a record that was not applied. A hole found again
   at the same offsets after :data:`HOLE_SEEKS` seeks is a range holding no records (deleted
   by retention; a transactional producer's commit markers also take offsets): logged as an
   error, then accepted.
2. Decode every remaining record. A record that is not a valid envelope becomes a ``DeadLettered``
   event (reason, original bytes, topic/partition/offset) and is otherwise skipped; an
   oversized record on the tasks topic also completes the task its key names as
   ``dead_lettered``.
3. Drop events whose ``event_id`` this consumer has already applied (a re-produced
   duplicate from an upstream stage that crashed between producing and committing): the
   applied ids live in the consumer's seen buckets ``oldest..current`` (read in step 1), which
   expire once no duplicate of their ids can arrive any more (streams/seen.py: the argument).
4. ``Consumer.process`` runs the stage logic on the remaining events (live mode only); it
   queues output events with ``Tx.emit`` and state writes with ``Tx.write``. An event whose
   processing raises is dead-lettered with the exception as the reason (and its task gets a
   ``TaskCompleted`` with status ``dead_lettered``); the batch goes on.
5. Every projection of the consumer applies the remaining events, processed or dead-lettered
   alike, exactly as replay (which runs no stage logic) will (queues writes; may emit).
6. Produce every emitted event and wait for all acks. A crash after this point re-runs the
   batch, which re-produces the *same* deterministic event ids; consumers drop them in step 3.
   A batch that has run for more than :data:`STALE_CHECK_S` first reads its checkpoints
   again and stops with ``StaleBatchError`` if they moved, so a worker that lost its
   partitions while it waited (a Redis or provider outage, a pause) does not produce its
   duplicates long after the rival committed (streams/seen.py, point d).
7. In one MULTI/EXEC, guarded by WATCH on the batch's checkpoint keys and the current seen
   epoch: the queued writes, the applied event ids (into the current epoch's bucket), and the
   new checkpoints. If a checkpoint differs from what step 1 read (another consumer committed
   these partitions meanwhile: we are a zombie after a rebalance), ``StaleBatchError`` is
   raised and nothing is written; if only the epoch moved, the commit is made again.
8. Return; only now may the caller commit the Kafka offsets (Faust acks after the batch).

Why the seen buckets may expire without weakening step 3 (in full: streams/seen.py): a
duplicate only comes from re-running the upstream batch that produced the event, and such a
re-run only happens while that batch is uncommitted. An epoch's bucket is deleted once every
consumer has committed past the offsets that existed when the epoch closed (no re-run can
still come), then read past the offsets that existed once that was true (every duplicate the
re-runs produced has been dropped), and a retention has passed for the producers offsets do
not see (a client's send retry, a zombie batch: the check in step 6).

Redis being unreachable pauses the consumer (one log line), retries the step that failed with
backoff, and resumes (one log line): an outage at step 7 does not re-run step 4, so providers
are not called again; one inside step 4 (a stage reading state) re-runs step 4 alone, from
what steps 1-3 left. Nothing is written until step 7, so nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from models.codec import CodecError, decode, encode, make_event
from models.events import DeadLettered, Envelope, TaskCompleted
from streams.config import Settings
from streams.keys import Keys
from streams.logs import event_fields
from streams.topics import TopicRegistry

log = logging.getLogger("rmo.stage")
T = TypeVar("T")

Mode = Literal["live", "replay"]
MAX_DEADLETTER_BYTES = 2 * 1024 * 1024
"""Original bytes kept in a dead letter: base64 of 2 MiB stays under the deadletter topic's
4 MiB max.message.bytes (topics.yaml) and the producer's max request size."""
PRODUCER_MAX_REQUEST_BYTES = 4 * 1024 * 1024
STALE_CHECK_S = 10.0
"""A batch older than this (s, from step 1) re-reads its checkpoints before producing (step
6): far above a normal batch (milliseconds to a few seconds of provider calls), far below
the seen retention (``Settings.seen_retention_s``) that the check lets stay short."""
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
HOLE_SEEKS = 3
"""Seeks back over the same hole (step 1) before it counts as a range the log lost."""


class StaleBatchError(RuntimeError):
    """Another consumer committed past this batch's offsets: this batch must not be applied."""


@dataclass(frozen=True)
class Record:
    """One Kafka record as the runner sees it (offset and partition from the broker)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Producer(Protocol):
    """Sends one record; the returned awaitable resolves when the broker acked it."""

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]: ...


@dataclass
class Context:
    """What every consumer needs: settings, key layout, topics, Redis, a producer."""

    settings: Settings
    keys: Keys
    topics: TopicRegistry
    redis: Redis
    producer: Producer | None
    mode: Mode = "live"


Write = Callable[[Pipeline], None]


@dataclass
class Tx:
    """The batch being applied: reads go to ``redis`` directly, writes are queued for step 7."""

    ctx: Context
    writes: list[Write] = field(default_factory=list)
    emitted: list[tuple[str, bytes | None, Envelope]] = field(default_factory=list)
    failed: dict[str, BaseException] = field(default_factory=dict)
    holes: dict[tuple[str, int], int] = field(default_factory=dict)
    """(topic, partition) -> offset the consumer must seek back to (step 1)."""

    @property
    def redis(self) -> Redis:
        return self.ctx.redis

    @property
    def keys(self) -> Keys:
        return self.ctx.keys

    def write(self, fn: Write) -> None:
        self.writes.append(fn)

    def emit(self, role: str, event: Envelope, key: str | None = None) -> None:
        """Queue ``event`` for the topic of ``role``, keyed by ``key``, else its task id
        (SPEC §3; a job's subtasks share the job's correlation id but spread over partitions
        by task), else its correlation id. Dropped in replay mode: replay rebuilds state, it
        does not re-publish history."""
        if self.ctx.mode == "replay":
            return
        k = key if key is not None else getattr(event.payload, "task_id", None) or event.correlation_id
        self.emitted.append((role, k.encode(), event))

    def fail(self, event: Envelope, exc: BaseException) -> None:
        self.failed[event.event_id] = exc


BatchObserver = Callable[[str, int, Tx, float], None]
"""Told of every applied batch (after step 7): the consumer's name, the records taken, the
applied transaction (its ``emitted`` events) and the seconds the batch took."""

observers: list[BatchObserver] = []
"""The observers of this process's batches: the worker's Prometheus exporter adds one
(streams/prometheus.py). An observer must be quick and must not raise."""


class Projection(Protocol):
    """A piece of Redis state derived from events; ``apply`` queues the writes for a batch."""

    name: str

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None: ...


class Consumer:
    """A consumer of one topic role: a stage (``process``) plus the projections it maintains."""

    name: str = "consumer"
    source: str = "tasks"
    handles: frozenset[str] = frozenset()
    projections: tuple[Projection, ...] = ()
    batch_max: int | None = None
    """Most records per batch (None: ``Settings.batch_max``)."""

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        """Run the stage on the events of a handled type, concurrently; a raising event is
        recorded with ``tx.fail`` (dead-lettered) while the others go on."""
        results = await asyncio.gather(*(in_event_context(e, self.handle(e, tx)) for e in events),
                                       return_exceptions=True)
        for event, result in zip(events, results):
            if isinstance(result, REDIS_DOWN):
                raise result
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                tx.fail(event, result)

    async def handle(self, event: Envelope, tx: Tx) -> None:
        raise NotImplementedError

    tick_s: float | None = None
    """Seconds between the consumer's :meth:`tick` in a live worker (None: no tick)."""

    async def tick(self, tx: Tx) -> None:
        """Live work no batch causes, every ``tick_s`` in each worker (streams/app.py): it may
        read Redis and ``tx.emit``; its events are produced. It must not queue writes (state
        changes only through the commit protocol): the worker fails such a tick. Events
        emitted from a tick must have ids
        derived from what they decide, since every worker ticks and a tick may decide what a
        batch decides too."""

    async def admit(self, pending: int, ctx: Context) -> int:
        """How many of the ``pending`` delivered records (>= 1) to run as the next batch, the
        rest waiting for the batches after it (default: all). Each batch is the whole protocol
        (module docstring), so running a delivery as several batches keeps every guarantee:
        a crash re-delivers the rest, and step 1 drops what was applied."""
        return pending


async def in_event_context(event: Envelope, work: Awaitable[T]) -> T:
    """Await ``work`` with ``event``'s ids bound to the log context (streams/logs.py
    :func:`~streams.logs.event_fields`): every line logged meanwhile, by any module, carries
    ``task_id``, ``correlation_id``, ``event_id`` and ``event_type``. Meant for the per-event
    coroutines a stage gathers: ``asyncio.gather`` runs each in a task with a copy of the
    context, so the binding stays with that event and concurrent events do not mix."""
    with structlog.contextvars.bound_contextvars(**event_fields(event)):
        return await work


class BatchRunner:
    """Runs the commit protocol (module docstring) for one consumer."""

    def __init__(self, consumer: Consumer, ctx: Context) -> None:
        self.consumer = consumer
        self.ctx = ctx
        self._paused = False
        # (topic, partition) -> (first missing offset, first delivered offset, seeks so far)
        self._holes: dict[tuple[str, int], tuple[int, int, int]] = {}

    async def run(self, records: Sequence[Record]) -> Tx:
        """Apply one batch (steps 1-8). Returns the applied transaction (for tests and stats).
        Lines logged meanwhile carry ``stage`` (the consumer's name).

        Raises:
            StaleBatchError: a checkpoint moved under us (step 7).
        """
        with structlog.contextvars.bound_contextvars(stage=self.consumer.name):
            return await self._run(records)

    async def _run(self, records: Sequence[Record]) -> Tx:
        started, taken = time.perf_counter(), len(records)
        tx = Tx(self.ctx)
        marks, epochs = await self._redis(lambda: self._checkpoints(records))
        records = [r for r in records if r.offset > marks[(r.topic, r.partition)]]
        tx.holes = self._find_holes(records, marks)
        if tx.holes:
            records = [r for r in records if r.offset < tx.holes.get((r.topic, r.partition), r.offset + 1)]
        if not records:
            return tx  # applied before (redelivery after a crash), or all after a hole
        events, sources = self._decode(records, tx)
        events = await self._redis(lambda: self._unseen(events, epochs))
        handled = [e for e in events if e.event_type in self.consumer.handles]
        if self.ctx.mode == "live" and handled:
            queued = (len(tx.writes), len(tx.emitted))
            await self._redis(lambda: self._process(handled, tx, queued))
        for event_id, exc in tx.failed.items():
            event = next(e for e in events if e.event_id == event_id)
            self._dead_letter(tx, sources[event_id], f"{self.consumer.name} raised: {exc!r}",
                              type(exc).__name__, event)
        # projections record that an event is in the log, whether or not the stage managed to
        # process it: replay, which runs no stage logic, must rebuild the same state
        applied = events
        for projection in self.consumer.projections:
            await self._redis(lambda p=projection: p.apply(applied, tx))
        if tx.emitted and time.perf_counter() - started > STALE_CHECK_S:
            await self._redis(lambda: self._still_current(records, marks))
        await produce(tx)
        await self._redis(lambda: self._commit(records, marks, epochs, applied, tx))
        for observe in observers:
            observe(self.consumer.name, taken, tx, time.perf_counter() - started)
        return tx

    # -- steps ---------------------------------------------------------------------------

    async def _process(self, events: list[Envelope], tx: Tx, queued: tuple[int, int]) -> None:
        # a retry after a Redis outage restarts from what steps 1-3 queued (``queued``):
        # the stage's outputs are deterministic, so they are simply produced again
        del tx.writes[queued[0]:], tx.emitted[queued[1]:]
        tx.failed.clear()
        await self.consumer.process(events, tx)

    async def _checkpoints(self, records: Sequence[Record]
                           ) -> tuple[dict[tuple[str, int], int], range]:
        """(topic, partition) -> last applied offset (-1: none yet) for the batch's partitions,
        and the seen epochs ``oldest..current`` whose buckets step 3 reads."""
        tps = sorted({(r.topic, r.partition) for r in records})
        k = self.ctx.keys
        keys = [k.checkpoint(self.consumer.name, t, p) for t, p in tps]
        *values, oldest, current = await self.ctx.redis.mget([*keys, k.seen_oldest, k.seen_current])
        return ({tp: -1 if v is None else int(v) for tp, v in zip(tps, values)},
                range(int(oldest or 0), int(current or 0) + 1))

    def _find_holes(self, records: Sequence[Record],
                    marks: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Step 1's holes: (topic, partition) -> its first missing offset, for each partition
        whose ``records`` (those above the checkpoint) do not run on without a gap from the
        offset after its checkpoint (from its first record when it has none). Live only:
        replay reads each partition itself, from its start."""
        if self.ctx.mode != "live":
            return {}
        offsets: dict[tuple[str, int], list[int]] = {}
        for r in records:
            offsets.setdefault((r.topic, r.partition), []).append(r.offset)
        holes = {}
        for tp, got in offsets.items():
            got.sort()
            missing = marks[tp] + 1 if marks[tp] >= 0 else got[0]
            for offset in got:
                if offset > missing:
                    break
                missing = max(missing, offset + 1)
            else:
                self._holes.pop(tp, None)
                continue
            after = next(o for o in got if o > missing)
            was = self._holes.get(tp)
            seeks = was[2] + 1 if was is not None and was[:2] == (missing, after) else 1
            if seeks > HOLE_SEEKS:
                log.error("%s: %s[%d] offsets %d..%d never came after %d seeks back: the log "
                          "holds no records there (retention, or a transaction's markers); "
                          "going on from %d",
                          self.consumer.name, tp[0], tp[1], missing, after - 1, HOLE_SEEKS, after)
                self._holes.pop(tp)
                continue
            if was is None or was[0] != missing:
                log.warning("%s: %s[%d] delivered offset %d without %d (checkpoint %d); "
                            "seeking back to %d", self.consumer.name, tp[0], tp[1], after,
                            missing, marks[tp], missing)
            self._holes[tp] = (missing, after, seeks)
            holes[tp] = missing
        return holes

    async def _still_current(self, records: Sequence[Record],
                             marks: dict[tuple[str, int], int]) -> None:
        """Step 6's check: raise StaleBatchError if a checkpoint of the batch moved."""
        now, _ = await self._checkpoints(records)
        moved = [tp for tp, mark in marks.items() if now[tp] != mark]
        if moved:
            raise StaleBatchError(f"checkpoint of {moved[0][0]}[{moved[0][1]}] moved from "
                                  f"{marks[moved[0]]} to {now[moved[0]]} during this batch")

    def _decode(self, records: Sequence[Record], tx: Tx) -> tuple[list[Envelope], dict[str, Record]]:
        events: list[Envelope] = []
        sources: dict[str, Record] = {}
        for r in records:
            try:
                event = decode(r.value)
            except CodecError as exc:
                # an oversized record, or one failing its schema (e.g. a json task without its
                # schema), is never processed, but its key names its task (SPEC §3), so that
                # task can still complete; bytes that are not even an envelope claim nothing
                task_id = self._keyed_task(r) if exc.kind in ("oversized", "schema") else None
                self._dead_letter(tx, r, str(exc), exc.kind, None, task_id)
                continue
            if event.event_id in sources:  # duplicate inside one batch
                continue
            events.append(event)
            sources[event.event_id] = r
        return events, sources

    async def _unseen(self, events: list[Envelope], epochs: range) -> list[Envelope]:
        if not events:
            return []
        ids = [e.event_id for e in events]
        pipe = self.ctx.redis.pipeline(transaction=False)
        for epoch in epochs:
            pipe.smismember(self.ctx.keys.seen(self.consumer.name, epoch), ids)
        found = [any(hits) for hits in zip(*await pipe.execute())]
        return [e for e, seen in zip(events, found) if not seen]

    def _keyed_task(self, r: Record) -> str | None:
        """The task id a tasks-topic record's key names (SPEC §3: key = task id), or None for
        another topic or a key that cannot be a task id (missing, not UTF-8, over 256 chars)."""
        if r.key is None or r.topic != self.ctx.topics.name("tasks"):
            return None
        try:
            task_id = r.key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return task_id if 0 < len(task_id) <= 256 else None

    def _dead_letter(self, tx: Tx, r: Record, reason: str, error_type: str,
                     event: Envelope | None, task_id: str | None = None) -> None:
        """Queue a DeadLettered event (id derived from the record's position, so a re-run
        does not duplicate it) and that task's final TaskCompleted (``dead_lettered``) for a
        decoded task event, or for an undecoded record when ``task_id`` names its task."""
        log.warning("dead-letter %s[%d]@%d: %s", r.topic, r.partition, r.offset, reason,
                    extra=event_fields(event) if event else {"task_id": task_id} if task_id else {})
        payload = DeadLettered(
            reason=reason[:2000], error_type=error_type, stage=self.consumer.name,
            source_topic=r.topic, source_partition=r.partition, source_offset=r.offset,
            original_key_b64=base64.b64encode(r.key).decode() if r.key is not None else None,
            original_value_b64=base64.b64encode((r.value or b"")[:MAX_DEADLETTER_BYTES]).decode(),
            original_size=len(r.value or b""),
            original_truncated=len(r.value or b"") > MAX_DEADLETTER_BYTES,
        )
        position = f"{r.topic}:{r.partition}:{r.offset}"
        producer = f"{self.consumer.name}.deadletter"
        dl = make_event(payload, producer=producer,
                        correlation_id=event.correlation_id if event else task_id or position,
                        event_id=_position_id(position, self.consumer.name))
        tx.emit("deadletter", dl, key=position)
        if event is not None:
            # a TaskCompleted that fails is already the task's end: completing it again would loop
            task_id = (None if event.event_type == "TaskCompleted"
                       else getattr(event.payload, "task_id", None))
        if task_id:
            done = TaskCompleted(task_id=task_id, status="dead_lettered", result=reason[:500])
            # caused by the event when there is one, else by the dead letter, so lineage shows
            # why the task ended and a re-run derives the same id
            tx.emit("tasks", make_event(done, producer=producer, cause=event or dl,
                                        discriminator="dead_lettered"))

    async def _commit(self, records: Sequence[Record], marks: dict[tuple[str, int], int],
                      epochs: range, applied: Iterable[Envelope], tx: Tx) -> None:
        keys = self.ctx.keys
        top: dict[tuple[str, int], int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            top[tp] = max(top.get(tp, -1), r.offset)
        ckpt = {keys.checkpoint(self.consumer.name, t, p): off for (t, p), off in top.items()}
        expected = [marks[tp] for tp in top]
        ids = [e.event_id for e in applied]
        watched = [*ckpt, keys.seen_current]
        known_epoch = epochs.stop - 1  # as step 1 read it
        while True:
            try:
                async with self.ctx.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(*watched)
                    *current, epoch = await pipe.mget(watched)
                    for key, cur, mark in zip(ckpt, current, expected):
                        if (-1 if cur is None else int(cur)) != mark:
                            raise StaleBatchError(f"{key} moved from {mark} to {cur} during this batch")
                    pipe.multi()
                    for w in tx.writes:
                        w(pipe)
                    if ids:
                        pipe.sadd(keys.seen(self.consumer.name, int(epoch or 0)), *ids)
                    pipe.mset({k: str(v) for k, v in ckpt.items()})
                    await pipe.execute()
                    return
            except WatchError:
                # redis-py also raises WatchError when the connection dropped while watching
                # (at any point after WATCH): only a checkpoint that really moved makes this
                # batch stale, and a seen epoch that moved (streams/seen.py) only a retry
                *now, now_epoch = await self.ctx.redis.mget(watched)
                if [(-1 if v is None else int(v)) for v in now] != expected:
                    raise StaleBatchError(
                        f"a checkpoint of {self.consumer.name} moved during commit") from None
                if int(now_epoch or 0) != known_epoch:
                    known_epoch = int(now_epoch or 0)
                    continue
                raise RedisConnectionError("connection lost during commit") from None

    async def _redis(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """Run a step that talks to Redis; while Redis is unreachable, pause and retry."""
        delay = 0.1
        while True:
            try:
                result = await step()
            except REDIS_DOWN as exc:
                if not self._paused:
                    log.error("%s paused: Redis unreachable (%s); retrying until it returns",
                              self.consumer.name, exc)
                    self._paused = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self._paused:
                log.warning("%s resumed: Redis is back", self.consumer.name)
                self._paused = False
            return result


async def produce(tx: Tx) -> None:
    """Send ``tx``'s emitted events in order and wait for every ack (step 5).

    Raises:
        RuntimeError: the context has no producer.
    """
    if not tx.emitted:
        return
    producer = tx.ctx.producer
    if producer is None:
        raise RuntimeError("live consumer without a producer")
    acks = [await producer.send(tx.ctx.topics.name(role), key, encode(event))
            for role, key, event in tx.emitted]
    await asyncio.gather(*acks)


def _position_id(position: str, consumer: str) -> str:
    return hashlib.sha256(f"{position}|{consumer}".encode()).hexdigest()[:32]


class ProjectionConsumer(Consumer):
    """A consumer that only maintains projections (no stage logic)."""

    def __init__(self, name: str, source: str, projections: tuple[Projection, ...]) -> None:
        self.name = name
        self.source = source
        self.projections = projections
