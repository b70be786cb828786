"""The batch commit protocol of streams/stage.py against real Redis and a real broker."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from models.codec import decode, encode, make_event
from models.events import Envelope, TaskSubmitted
from streams.projections import CountersProjection, TaskStatusProjection
from streams.stage import BatchRunner, Consumer, Record, StaleBatchError, Tx
from tests.integration.helpers import events

pytestmark = pytest.mark.integration


class Echo(Consumer):
    """Emits one TaskCompleted per TaskSubmitted; raises on prompts saying 'boom'; can move
    its own checkpoint mid-batch to play a zombie's rival."""

    name = "echo"
    source = "tasks"
    handles = frozenset({"TaskSubmitted"})
    projections = (TaskStatusProjection(), CountersProjection())

    def __init__(self) -> None:
        self.rival_offset: int | None = None
        self.processed = 0

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        if self.rival_offset is not None:
            topic = tx.ctx.topics.name("tasks")
            await tx.redis.set(tx.keys.checkpoint(self.name, topic, 0), self.rival_offset)
        await super().process(events, tx)

    async def handle(self, event: Envelope, tx: Tx) -> None:
        if "boom" in event.payload.prompt:
            raise RuntimeError("boom")
        self.processed += 1
        from models.events import TaskCompleted

        done = TaskCompleted(task_id=event.payload.task_id, status="passed")
        tx.emit("tasks", make_event(done, producer="echo", cause=event))


def submitted(i: int, prompt: str = "def f():\n    pass\n") -> Envelope:
    return make_event(TaskSubmitted(task_id=f"t{i}", kind="code", prompt=prompt), producer="test")


def records(topic: str, evs: list[Envelope], first_offset: int = 0) -> list[Record]:
    return [Record(topic, 0, first_offset + i, e.correlation_id.encode(), encode(e))
            for i, e in enumerate(evs)]


async def test_records_at_or_below_the_checkpoint_are_not_applied_again(ctx):
    consumer = Echo()
    runner = BatchRunner(consumer, ctx)
    batch = records(ctx.topics.name("tasks"), [submitted(i) for i in range(5)])
    await runner.run(batch)
    await runner.run(batch)  # redelivered after a crash before the Kafka commit
    counters = await ctx.redis.hgetall(ctx.keys.counters)
    assert counters["events:TaskSubmitted"] == "5"
    assert consumer.processed == 5
    assert await ctx.redis.get(ctx.keys.checkpoint("echo", ctx.topics.name("tasks"), 0)) == "4"


async def test_a_reproduced_event_id_at_a_new_offset_is_dropped(ctx):
    consumer = Echo()
    runner = BatchRunner(consumer, ctx)
    evs = [submitted(i) for i in range(3)]
    topic = ctx.topics.name("tasks")
    await runner.run(records(topic, evs))
    await runner.run(records(topic, [evs[1], submitted(9)], first_offset=3))
    assert consumer.processed == 4
    assert (await ctx.redis.hgetall(ctx.keys.counters))["events:TaskSubmitted"] == "4"


async def test_outputs_are_produced_with_deterministic_ids(ctx, settings, topics):
    topic = ctx.topics.name("tasks")
    evs = [submitted(i) for i in range(3)]
    tx1 = await BatchRunner(Echo(), ctx).run(records(topic, evs))
    # a second consumer instance re-processing the same input (no checkpoint under its name)
    other = Echo()
    other.name = "echo2"
    tx2 = await BatchRunner(other, ctx).run(records(topic, evs))
    assert [e.event_id for _, _, e in tx1.emitted] == [e.event_id for _, _, e in tx2.emitted]
    on_topic = [e for e in await events(settings, topics, "tasks") if e.event_type == "TaskCompleted"]
    assert len({e.event_id for e in on_topic}) == 3 and len(on_topic) == 6


async def test_poison_and_raising_events_are_dead_lettered_and_the_rest_applied(ctx, settings, topics):
    topic = ctx.topics.name("tasks")
    good = [submitted(i) for i in range(3)]
    bad = submitted(7, prompt="boom")
    batch = records(topic, good + [bad])
    batch.append(Record(topic, 0, len(batch), b"k", b"\xff not json"))
    tx = await BatchRunner(Echo(), ctx).run(batch)
    letters = [e for r, _, e in tx.emitted if r == "deadletter"]
    assert sorted(e.payload.error_type for e in letters) == ["RuntimeError", "not_json"]
    poison = next(e for e in letters if e.payload.error_type == "not_json")
    assert (poison.payload.source_topic, poison.payload.source_offset) == (topic, 4)
    dead_done = [e for r, _, e in tx.emitted if r == "tasks" and e.payload.status == "dead_lettered"]
    assert [e.payload.task_id for e in dead_done] == ["t7"]
    # the raising event is still a fact of the log: its projection applied, like replay does
    assert (await ctx.redis.hgetall(ctx.keys.counters))["events:TaskSubmitted"] == "4"
    on_topic = await events(settings, topics, "deadletter")
    assert {decode(encode(e)).event_id for e in on_topic} == {e.event_id for e in letters}


async def test_a_checkpoint_moved_by_another_consumer_aborts_the_commit(ctx):
    consumer = Echo()
    consumer.rival_offset = 100
    with pytest.raises(StaleBatchError):
        await BatchRunner(consumer, ctx).run(records(ctx.topics.name("tasks"), [submitted(1)]))
    assert await ctx.redis.hgetall(ctx.keys.counters) == {}
    assert await ctx.redis.hgetall(ctx.keys.task("t1")) == {}


async def test_a_hole_after_the_checkpoint_is_not_applied_but_sought_back(ctx):
    """Offsets 5 and 6 never came (Faust dropped them across a rebalance): the records after
    them are left out, nothing moves the checkpoint past them, and the batch names offset 5
    to seek back to; once they come, the partition is applied in order."""
    consumer = Echo()
    runner = BatchRunner(consumer, ctx)
    topic = ctx.topics.name("tasks")
    evs = [submitted(i) for i in range(10)]
    await runner.run(records(topic, evs[:5]))
    other = [Record(topic, 1, 0, b"t9", encode(evs[9]))]  # another partition, no hole
    tx = await runner.run(records(topic, evs[7:9], first_offset=7) + other)
    assert tx.holes == {(topic, 0): 5}
    assert await ctx.redis.get(ctx.keys.checkpoint("echo", topic, 0)) == "4"
    assert await ctx.redis.get(ctx.keys.checkpoint("echo", topic, 1)) == "0"
    tx = await runner.run(records(topic, evs[5:9], first_offset=5))
    assert tx.holes == {}
    assert consumer.processed == 10
    assert await ctx.redis.get(ctx.keys.checkpoint("echo", topic, 0)) == "8"


async def test_a_hole_inside_a_batch_stops_the_partition_before_it(ctx):
    """Offset 2 is missing between delivered ones: 0 and 1 are applied, 3 and 4 wait for the
    seek back to 2 (the checkpoint would otherwise pass 2 for good)."""
    consumer = Echo()
    runner = BatchRunner(consumer, ctx)
    topic = ctx.topics.name("tasks")
    evs = [submitted(i) for i in range(5)]
    batch = records(topic, evs)
    tx = await runner.run(batch[:2] + batch[3:])
    assert tx.holes == {(topic, 0): 2}
    assert consumer.processed == 2
    assert await ctx.redis.get(ctx.keys.checkpoint("echo", topic, 0)) == "1"
    assert (await runner.run(batch)).holes == {}  # what the seek brings again, from 2
    assert consumer.processed == 5


async def test_a_hole_that_seeking_back_does_not_fill_is_accepted_with_an_error(ctx, caplog):
    """The same hole after HOLE_SEEKS seeks back is a range the log lost (retention): the
    partition goes on from what the log holds, with one error line."""
    from streams.stage import HOLE_SEEKS

    consumer = Echo()
    runner = BatchRunner(consumer, ctx)
    topic = ctx.topics.name("tasks")
    evs = [submitted(i) for i in range(6)]
    await runner.run(records(topic, evs[:2]))
    late = records(topic, evs[4:], first_offset=4)
    for _ in range(HOLE_SEEKS):
        assert (await runner.run(late)).holes == {(topic, 0): 2}
    assert consumer.processed == 2
    tx = await runner.run(late)
    assert tx.holes == {}
    assert consumer.processed == 4
    assert any("offsets 2..3 never came" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)
