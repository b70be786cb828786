"""streams/stall.py: a loop blocked on purpose is seen (with the stacks), a consumer with lag
that does not move is seen once; a healthy loop and a moving consumer are not."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import orjson
import pytest
from redis.asyncio import Redis

from streams import logs, stall
from streams.keys import Keys


@pytest.fixture
def json_log(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    logs.configure(logging.INFO, fmt="json", stream=stream)
    return stream


def block_on_purpose(seconds: float) -> None:
    time.sleep(seconds)  # a synchronous call inside a coroutine: the loop cannot run


async def parked(event: asyncio.Event) -> None:
    await event.wait()


async def watch(threshold_ms: float, body) -> list[stall.LoopStall]:
    reports: list[stall.LoopStall] = []

    async def report(s: stall.LoopStall) -> None:
        reports.append(s)

    watchdog = stall.LoopWatchdog(threshold_ms, report)
    runner = asyncio.create_task(watchdog.run())
    await asyncio.sleep(0.3)  # the beat and the watching thread are going
    try:
        await body()
        await asyncio.sleep(0.4)  # the loop is back: the beat measures the gap and reports
    finally:
        watchdog.stop()
        await runner
    return reports


async def test_a_loop_blocked_on_purpose_is_reported_with_its_stacks(json_log) -> None:
    release = asyncio.Event()
    helper = asyncio.create_task(parked(release), name="parked-helper")

    async def body() -> None:
        block_on_purpose(0.8)

    reports = await watch(200, body)
    release.set()
    await helper
    (report,) = reports
    assert 750 <= report.blocked_ms < 5000, report.blocked_ms
    # the watching thread saw the loop's thread inside the blocking call
    assert any("block_on_purpose" in line for line in report.stack), report.stack
    assert any("time.sleep" in line for line in report.stack)
    tasks = {t["task"]: t for t in report.tasks}
    assert any("in parked" in line for line in tasks["parked-helper"]["stack"]), tasks
    records = [orjson.loads(line) for line in json_log.getvalue().splitlines()]
    seen = [r for r in records if r["event"].startswith("event loop blocked")]
    assert len(seen) == 1 and seen[0]["level"] == "error" and seen[0]["logger"] == "rmo.stall"
    assert any("parked" in " ".join(t["stack"]) for t in seen[0]["tasks"])
    assert any(r["event"] == "event loop was blocked" and r["blocked_ms"] >= 750 for r in records)


async def test_a_healthy_loop_is_not_reported(json_log) -> None:
    async def body() -> None:
        for _ in range(10):
            block_on_purpose(0.02)  # short synchronous steps, as a busy worker takes
            await asyncio.sleep(0.05)

    assert await watch(1000, body) == []
    assert json_log.getvalue() == ""


def test_a_consumer_with_lag_and_no_progress_is_stalled_once() -> None:
    t = stall.ProgressTracker(threshold_s=10)
    key = ("executor", "rmo.analyses", 2)
    assert t.observe(key, checkpoint=4, highwater=9, now=0.0) is None  # lag 4 appears
    assert t.observe(key, 4, 9, now=9.9) is None
    assert t.observe(key, 4, 12, now=10.0) == 10.0  # more records, still nothing applied
    assert t.observe(key, 4, 12, now=30.0) is None  # reported once per stall
    assert t.observe(key, 8, 12, now=31.0) is None  # it moved: a new stall starts from here
    assert t.observe(key, 8, 12, now=40.0) is None
    assert t.observe(key, 8, 12, now=41.0) == 10.0


def test_a_consumer_that_moves_or_has_no_lag_is_not_stalled() -> None:
    t = stall.ProgressTracker(threshold_s=10)
    key = ("validator", "rmo.executions", 0)
    for n in range(10):
        assert t.observe(key, checkpoint=n, highwater=100, now=n * 5.0) is None
    idle = ("learning", "rmo.validations", 0)
    for n in range(10):  # caught up (checkpoint = high watermark - 1), waiting for records
        assert t.observe(idle, checkpoint=41, highwater=42, now=n * 5.0) is None
    assert t.observe(idle, -1, 0, now=100.0) is None  # an empty partition


async def test_the_progress_check_reads_checkpoints_from_redis(redis_url: str, namespace: str) -> None:
    redis = Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(namespace)
    readers = {"ns.calls": ["executor.breaker"], "ns.analyses": ["executor"]}
    tracker = stall.ProgressTracker(threshold_s=5)
    hw = {("ns.analyses", 0): 10, ("ns.analyses", 1): 3, ("ns.calls", 0): 7}
    try:
        await redis.set(keys.checkpoint("executor", "ns.analyses", 0), 6)
        await redis.set(keys.checkpoint("executor", "ns.analyses", 1), 2)
        # executor.breaker has no checkpoint: it applied nothing of its 7 records
        assert await stall.check_progress(tracker, redis, keys, readers, hw, now=0.0) == []
        stalls = await stall.check_progress(tracker, redis, keys, readers, hw, now=6.0)
    finally:
        await redis.aclose()
    assert sorted(stalls, key=lambda s: s.consumer) == [
        stall.ConsumerStall("executor", "ns.analyses", 0, lag=3, stalled_s=6.0),
        stall.ConsumerStall("executor.breaker", "ns.calls", 0, lag=7, stalled_s=6.0),
    ]


async def test_a_task_stack_follows_the_await_chain() -> None:
    release = asyncio.Event()

    async def outer() -> None:
        await middle()

    async def middle() -> None:
        await parked(release)

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    stack = stall.task_stack(task)
    release.set()
    await task
    assert [line.rsplit(" in ", 1)[1] for line in stack] == ["outer", "middle", "parked", "wait"]
