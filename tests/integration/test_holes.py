"""A worker that is handed a record past the one after its checkpoint (a hole: Faust dropped
records across a rebalance) seeks its consumer back and applies the partition in order, with
the records it had applied dropped as duplicates (streams/stage.py step 1), against a real
broker, Redis and worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from models.events import TaskSubmitted
from streams.config import Settings
from streams.keys import Keys
from streams.topics import create_topics, load_topics
from tests.integration.helpers import (
    events,
    eventually,
    providers_file,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration

PARTITION = 0


def tasks_on(partition: int, n: int, tag: str) -> list[TaskSubmitted]:
    """``n`` tasks whose ids (the record keys) the producer's default partitioner puts on
    ``partition`` of the four-partition tasks topic."""
    choose = DefaultPartitioner()
    ids = (f"{tag}{i}" for i in range(10_000))
    picked = [t for t in ids if choose(t.encode(), [0, 1, 2, 3], [0, 1, 2, 3]) == partition][:n]
    return [TaskSubmitted(task_id=t, kind="code", prompt="def f():\n    return 1\n") for t in picked]


async def test_a_worker_seeks_back_over_a_hole_and_applies_each_record_once(
        kafka: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    settings = Settings(namespace=namespace, kafka_bootstrap_servers=kafka, redis_url=redis_url,
                        sandbox="off", validator_levels=("syntax",),
                        providers_file=providers_file(tmp_path, "providers:\n" + sim("solid")))
    registry = load_topics(namespace)
    await create_topics(kafka, registry)
    topic = registry.name("tasks")
    ckpt = Keys(namespace).checkpoint("analyzer", topic, PARTITION)
    redis = Redis.from_url(redis_url, decode_responses=True)
    first, later = tasks_on(PARTITION, 5, "a"), tasks_on(PARTITION, 1, "b")
    try:
        with worker(settings, tmp_path) as log:
            await submit(settings, registry, first)
            await wait_completed(settings, registry, {t.task_id for t in first}, log=log)
            # each task put a TaskSubmitted and a TaskCompleted on the partition: offsets 0..9
            assert await eventually(lambda: _at_least(redis, ckpt, 9))
            await redis.set(ckpt, 6)  # as if 7..9 had been dropped before they were applied
            await submit(settings, registry, later)
            await wait_completed(settings, registry, {later[0].task_id}, log=log)
            assert await eventually(lambda: _at_least(redis, ckpt, 11))
            text = log.read_text()
        assert f"{topic}[{PARTITION}] delivered offset 10 without 7 (checkpoint 6); seeking back to 7" in text
        analyzed = [e.payload.task_id for e in await events(settings, registry, "analyses")]
        assert sorted(analyzed) == sorted(t.task_id for t in first + later)  # once each
    finally:
        await redis.aclose()


async def _at_least(redis: Redis, key: str, offset: int) -> bool:
    value = await redis.get(key)
    return value is not None and int(value) >= offset
