"""Bounded seen-id sets (streams/seen.py) and task-status retention, against real Redis and a
real broker: buckets close and drop only when the protocol says so, a duplicate is dropped for
as long as it can arrive, and the stage runner writes into the current epoch."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio.client import Pipeline

from models.codec import make_event
from models.events import TaskSubmitted
from streams import seen, stage
from streams.client import high_watermarks
from streams.projections import TaskStatusProjection
from streams.stage import BatchRunner, Context, ProjectionConsumer, StaleBatchError
from tests.integration.test_stage_runner import Echo, records, submitted

pytestmark = pytest.mark.integration


class Marks:
    """Watermarks the test sets: checkpoint key -> high watermark (the injected step-2 read)."""

    def __init__(self) -> None:
        self.value: dict[str, int] = {}

    async def __call__(self) -> dict[str, int]:
        return dict(self.value)


async def tick(ctx: Context, marks: Marks, retention_s: float = 0.0) -> seen.Rotation:
    return await seen.rotate(ctx.redis, ctx.keys, ["echo"], marks, rotate_s=0.0,
                             retention_s=retention_s)


async def test_a_bucket_drops_only_after_a_later_close_is_passed(ctx):
    topic = ctx.topics.name("tasks")
    ckpt = ctx.keys.checkpoint("echo", topic, 0)
    consumer = Echo()
    runner = BatchRunner(consumer, ctx)
    marks = Marks()
    evs = [submitted(i) for i in range(3)]
    await runner.run(records(topic, evs))  # epoch 0
    assert await ctx.redis.smembers(ctx.keys.seen("echo", 0)) == {e.event_id for e in evs}

    marks.value = {ckpt: 5}  # close 0: two more records are in the topic, one a duplicate
    assert (await tick(ctx, marks)).closed == 0
    for _ in range(2):  # not passed until the consumer applied them: no close, no drop
        r = await tick(ctx, marks)
        assert (r.closed, r.dropped) == (None, [])
    dup = [evs[1], submitted(3)]
    await runner.run(records(topic, dup, first_offset=3))  # epoch 1: the duplicate is dropped
    assert consumer.processed == 4
    assert await ctx.redis.smembers(ctx.keys.seen("echo", 1)) == {dup[1].event_id}

    r = await tick(ctx, marks)  # close 0 passed: close 1, but bucket 0 needs close 1 passed
    assert (r.closed, r.dropped) == (1, [])
    r = await tick(ctx, marks)
    assert (r.closed, r.dropped, r.oldest) == (2, [0], 1)
    assert not await ctx.redis.exists(ctx.keys.seen("echo", 0))
    assert await ctx.redis.exists(ctx.keys.seen("echo", 1))
    # past the drop, the same id at a new offset is applied again: the bucket really is gone
    await runner.run(records(topic, [evs[0]], first_offset=5))
    assert consumer.processed == 5


async def test_the_retention_holds_a_passed_bucket(ctx):
    marks = Marks()
    for _ in range(4):
        await tick(ctx, marks, retention_s=3600.0)
    assert int(await ctx.redis.get(ctx.keys.seen_current)) == 4
    assert int(await ctx.redis.get(ctx.keys.seen_oldest) or 0) == 0
    r = await tick(ctx, marks, retention_s=0.0)  # bucket 3 waits for close 4 to be passed
    assert (r.dropped, r.oldest, r.current) == ([0, 1, 2], 3, 5)


async def test_a_close_left_unrecorded_by_a_dead_worker_is_recorded_by_the_next_tick(ctx):
    await ctx.redis.set(ctx.keys.seen_current, 1)  # INCR done, worker gone before the record
    marks = Marks()
    marks.value = {"x": 7}
    r = await tick(ctx, marks)
    assert r.closed is None
    close = seen.Close.from_json(await ctx.redis.hget(ctx.keys.seen_closes, "0"))
    assert close.watermarks == {"x": 7}
    assert (await tick(ctx, Marks())).closed is None  # close 0 (x at 7) is not passed yet


async def test_a_commit_when_the_epoch_moves_is_made_again_into_the_new_bucket(ctx, monkeypatch, caplog):
    consumer = Echo()
    original_watch = Pipeline.watch
    moved = []

    async def watch_then_rotate(self, *names):
        result = await original_watch(self, *names)
        if not moved and ctx.keys.seen_current in names:
            moved.append(await ctx.redis.incr(ctx.keys.seen_current))
        return result

    monkeypatch.setattr(Pipeline, "watch", watch_then_rotate)
    with caplog.at_level(logging.WARNING, logger="rmo.stage"):
        await BatchRunner(consumer, ctx).run(records(ctx.topics.name("tasks"), [submitted(1)]))
    assert moved == [1]
    assert await ctx.redis.scard(ctx.keys.seen("echo", 1)) == 1
    assert not await ctx.redis.exists(ctx.keys.seen("echo", 0))
    assert (await ctx.redis.hgetall(ctx.keys.counters))["events:TaskSubmitted"] == "1"
    assert not [m for m in caplog.messages if "paused" in m], caplog.messages


async def test_a_long_batch_whose_partition_moved_produces_nothing(ctx, monkeypatch):
    monkeypatch.setattr(stage, "STALE_CHECK_S", 0.0)
    topic = ctx.topics.name("tasks")
    before = await high_watermarks(ctx.settings.require_kafka(), topic)
    consumer = Echo()
    consumer.rival_offset = 100  # a rival committed while this batch ran
    with pytest.raises(StaleBatchError, match="moved"):
        await BatchRunner(consumer, ctx).run(records(topic, [submitted(1)]))
    assert consumer.processed == 1
    assert await high_watermarks(ctx.settings.require_kafka(), topic) == before


def _at(task_id: str, when: datetime) -> object:
    return make_event(TaskSubmitted(task_id=task_id, kind="code", prompt="def f():\n    pass\n"),
                      producer="test", occurred_at=when)


async def test_task_status_expires_by_event_time_whatever_the_order(ctx, settings):
    c = replace(ctx, settings=settings.model_copy(update={"task_retention_s": 3600.0}), mode="replay")
    topic = c.topics.name("tasks")
    now = datetime.now(UTC)
    late, early = _at("t1", now), _at("t1", now - timedelta(minutes=30))
    # two consumers write the same task hash, the later event first
    await BatchRunner(ProjectionConsumer("a", "tasks", (TaskStatusProjection(),)), c).run(
        records(topic, [late]))
    await BatchRunner(ProjectionConsumer("b", "tasks", (TaskStatusProjection(),)), c).run(
        records(topic, [early]))
    expires = await c.redis.pexpiretime(c.keys.task("t1"))
    assert expires == int(now.timestamp() * 1000) + 3_600_000
    # a task whose latest event is older than the retention is gone at once, live or rebuilt
    await BatchRunner(ProjectionConsumer("c", "tasks", (TaskStatusProjection(),)), c).run(
        records(topic, [_at("t2", now - timedelta(hours=2))]))
    assert not await c.redis.exists(c.keys.task("t2"))
