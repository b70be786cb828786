"""streams/projections.py write_tasks against a real Redis: the fields a task hash gets back
are the strings written, byte for byte, and its expiry is the latest event time plus the
retention, whatever order the writes come in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from streams.config import Settings
from streams.keys import Keys
from streams.projections import write_tasks
from streams.stage import Context, Tx
from streams.topics import load_topics

AWKWARD = {"answer": 'def f():\n    return "é\\u00e9 \\" 🙂"\x00\t', "empty": "", "n": "12",
           "json": '{"a": [1, 2]}', "long": "x" * 100_000}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


def new_tx(namespace: str, redis: Redis, retention_s: float) -> Tx:
    settings = Settings(namespace=namespace, task_retention_s=retention_s)
    return Tx(Context(settings=settings, keys=Keys(namespace), topics=load_topics(namespace),
                      redis=redis, producer=None))


async def write(tx: Tx, tasks: dict[str, tuple[dict[str, str], int]]) -> None:
    async with tx.redis.pipeline(transaction=True) as pipe:
        write_tasks(pipe, tx, tasks)
        await pipe.execute()


async def test_fields_come_back_as_written(namespace: str, redis: Redis) -> None:
    tx = new_tx(namespace, redis, 0)
    await write(tx, {"t1": (AWKWARD, 1), "t2": ({"kind": "code"}, 2)})
    assert await redis.hgetall(tx.keys.task("t1")) == AWKWARD
    assert await redis.hgetall(tx.keys.task("t2")) == {"kind": "code"}
    await write(tx, {"t1": ({"n": "13", "more": "1"}, 3)})  # fields merge, the last value wins
    assert await redis.hgetall(tx.keys.task("t1")) == AWKWARD | {"n": "13", "more": "1"}
    assert await redis.pttl(tx.keys.task("t1")) == -1  # retention 0: kept
    await write(tx, {"t3": ({}, 4)})  # nothing to write: no key, and the transaction succeeds
    assert not await redis.exists(tx.keys.task("t3"))


@pytest.mark.parametrize("order", [(10, 20), (20, 10)])
async def test_the_expiry_is_the_latest_event_time_plus_the_retention(
        namespace: str, redis: Redis, order: tuple[int, int]) -> None:
    tx = new_tx(namespace, redis, 86400)
    base = int((await redis.time())[0]) * 1000
    for offset_s in order:
        await write(tx, {"t": ({f"at{offset_s}": "1"}, base + offset_s * 1000)})
    assert await redis.pexpiretime(tx.keys.task("t")) == base + 20_000 + 86_400_000
