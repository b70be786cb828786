"""Fixtures of the integration tests that run the stage runner directly."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from streams.client import EventProducer
from streams.keys import Keys
from streams.stage import Context


@pytest.fixture
async def ctx(settings, topics):
    """A live Context on the test's namespace: real Redis and a real producer."""
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    async with EventProducer(settings.require_kafka()) as producer:
        yield Context(settings=settings, keys=Keys(settings.namespace), topics=topics,
                      redis=redis, producer=producer)
    await redis.aclose()
