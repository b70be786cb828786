"""Bounded seen-id sets: applied event ids kept in epoch buckets, dropped once no duplicate can come.

Each consumer remembers the ids of the events it applied (streams/stage.py step 3) so that an
event an upstream stage produced twice (it crashed after producing, before committing, and
re-ran the batch: step 6) is applied once. Kept forever, these sets grow with every event;
here they live in buckets ``{ns}:seen:{consumer}:{epoch}`` that are deleted once a duplicate
of their ids can no longer arrive. The protocol, one tick of :func:`rotate` (every worker runs
it every ``seen_rotate_s``; concurrent ticks are safe, each change is guarded by WATCH):

1. Commits (stage.py step 7) add a batch's ids to bucket ``current``, in the MULTI/EXEC that
   WATCHes ``current``: every id of bucket k was committed before ``current`` moved past k.
2. **Close.** When the last close has been passed (3) and ``seen_rotate_s`` have gone by since
   it, INCR ``current`` (k -> k+1), then record close k: Redis' clock, then the high watermark
   of every consumer's source partitions (:func:`streams.pipeline.source_watermarks`), both
   read after the INCR. A worker that dies between the two leaves close k missing; the next
   tick records it (HSETNX): a later reading is after the INCR too.
3. **Passed.** A close is passed when every consumer's checkpoint reached the watermarks it
   recorded (:func:`streams.pipeline.reached`). Checkpoints only advance and later closes
   record higher watermarks, so the closes are passed in order.
4. **Drop.** Bucket k of every consumer is deleted, and ``oldest`` moved past it, once a
   later close j is passed whose clock is at least ``seen_retention_s`` after close k's.

Why a dropped bucket loses no duplicate (effectively-once is kept):

a. A duplicate of an event E is E produced again by a re-run of the batch B that produced it,
   over B's records: a re-run of B re-reads B's records, so it happens only while B's consumer
   has not committed B (step 1 drops committed records).
b. E is in bucket k, so it was committed before close k's watermarks were read (1, 2), and
   B's records, older than E, lie below them. Once close k is passed, B's consumer committed
   B: no re-run produces E again.
c. Close k+1 (and every later one) is recorded after close k was passed (2), so its
   watermarks lie above every duplicate of E that a re-run produced; once it is passed, every
   consumer has read those duplicates, and dropped each against bucket k, which was still there.
d. What offsets cannot see, the retention covers: a producer outside the pipeline re-sending
   a record (an aiokafka retry of `rmo submit`'s send, within its 40 s request timeout), and a
   zombie: a worker whose partitions were reassigned while it was inside a batch, and which
   produces its step-6 events after the rival committed. A batch older than
   :data:`streams.stage.STALE_CHECK_S` re-reads its checkpoints before producing, so a zombie
   produces within that time of starting the batch, which began before close k. A close j
   at least ``seen_retention_s`` (default 300 s) after close k is therefore read after those
   duplicates too. A worker's producer gives up on a record half the retention after sending
   it (Faust's ``producer_request_timeout``, streams/app.py; the batch then fails and runs
   again), so no retry of a pipeline record lands later than that either. What stays outside
   the guarantee is a process frozen for longer than the retention between that check and its
   produce (as for any non-transactional Kafka producer).
e. While any consumer is stopped or stuck, no close is passed and nothing is dropped: memory
   grows, correctness holds. Replay writes into a fresh namespace with no tick: one bucket.

Bucket count: about ``(seen_retention_s + consumer lag) / seen_rotate_s + 2``; stage.py step
3 checks them all in one pipelined round trip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from streams.keys import Keys
from streams.pipeline import reached

Watermarks = Callable[[], Awaitable[dict[str, int]]]
"""Reads checkpoint key -> high watermark of every consumer's source partitions (step 2)."""


@dataclass(frozen=True)
class Close:
    """The record of a closed epoch: Redis' clock (s) read after the INCR, and the watermarks
    (checkpoint key -> high watermark) read after that."""

    at: float
    watermarks: dict[str, int]

    def to_json(self) -> str:
        return orjson.dumps({"at": self.at, "watermarks": self.watermarks}).decode()

    @classmethod
    def from_json(cls, raw: str) -> Close:
        d = orjson.loads(raw)
        return cls(at=float(d["at"]), watermarks={k: int(v) for k, v in d["watermarks"].items()})


@dataclass
class Rotation:
    """What one tick did: the epoch it closed (None: none), the epochs whose buckets it
    deleted, and the epochs ``oldest..current`` left."""

    closed: int | None = None
    dropped: list[int] = field(default_factory=list)
    oldest: int = 0
    current: int = 0


async def redis_clock(redis: Redis) -> float:
    """Redis' TIME in seconds: one clock for every worker, whatever their hosts' clocks say."""
    s, us = await redis.time()
    return s + us / 1e6


async def rotate(redis: Redis, keys: Keys, consumers: Sequence[str], watermarks: Watermarks,
                 *, rotate_s: float, retention_s: float) -> Rotation:
    """One tick of the protocol (module docstring, steps 2-4) for the seen buckets of
    ``consumers`` (names). Raises what Redis or ``watermarks`` raise (a tick that fails
    changes nothing that the next tick does not finish)."""
    oldest, current = (int(v or 0) for v in await redis.mget(keys.seen_oldest, keys.seen_current))
    closes = {int(e): Close.from_json(raw) for e, raw in (await redis.hgetall(keys.seen_closes)).items()}
    out = Rotation(oldest=oldest, current=current)
    if current > 0 and current - 1 not in closes:  # step 2's repair
        await _record_close(redis, keys, current - 1, watermarks)
        return out
    last_passed = None  # step 3, newest first: passing is in order
    for epoch in sorted(closes, reverse=True):
        if await reached(redis, closes[epoch].watermarks):
            last_passed = epoch
            break
    if last_passed is not None:
        horizon = closes[last_passed].at - retention_s
        droppable = [e for e in range(oldest, last_passed) if e in closes and closes[e].at <= horizon]
        if droppable:
            out.dropped = await _drop(redis, keys, consumers, oldest, max(droppable))
            out.oldest = max(droppable) + 1 if out.dropped else oldest
    last = closes.get(current - 1)
    due = last is None or (last_passed == current - 1
                           and await redis_clock(redis) - last.at >= rotate_s)
    if due and await _advance(redis, keys, current):
        await _record_close(redis, keys, current, watermarks)
        out.closed, out.current = current, current + 1
    return out


async def _advance(redis: Redis, keys: Keys, current: int) -> bool:
    """INCR ``current`` unless another worker moved it since it was read (False then)."""
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(keys.seen_current)
            if int(await pipe.get(keys.seen_current) or 0) != current:
                return False
            pipe.multi()
            pipe.incr(keys.seen_current)
            await pipe.execute()
            return True
        except WatchError:
            return False


async def _record_close(redis: Redis, keys: Keys, epoch: int, watermarks: Watermarks) -> None:
    at = await redis_clock(redis)  # before the watermarks: they are read at or after ``at``
    close = Close(at=at, watermarks=await watermarks())
    await redis.hsetnx(keys.seen_closes, str(epoch), close.to_json())


async def _drop(redis: Redis, keys: Keys, consumers: Sequence[str], oldest: int,
                upto: int) -> list[int]:
    """Delete the buckets of epochs ``oldest..upto`` and their close records, and set
    ``oldest`` to ``upto + 1``, unless another worker moved ``oldest`` meanwhile ([] then)."""
    epochs = list(range(oldest, upto + 1))
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(keys.seen_oldest)
            if int(await pipe.get(keys.seen_oldest) or 0) != oldest:
                return []
            pipe.multi()
            pipe.delete(*(keys.seen(c, e) for c in consumers for e in epochs))
            pipe.hdel(keys.seen_closes, *map(str, epochs))
            pipe.set(keys.seen_oldest, upto + 1)
            await pipe.execute()
            return epochs
        except WatchError:
            return []
