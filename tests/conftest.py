"""Shared fixtures: one real embedded Kafka-protocol broker (Tansu) per session, the real
Redis (REDIS_URL, else an embedded one), and a fresh namespace per test."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator

import pytest
from redis import Redis as SyncRedis

from streams import embedded
from streams.config import Settings
from streams.keys import Keys
from streams.topics import create_topics, load_topics


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Bootstrap address of a session-scoped Tansu broker (or KAFKA_BOOTSTRAP_SERVERS)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    handle = embedded.start_kafka()
    yield handle.address
    handle.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if embedded.redis_reachable(url):
        yield url
        return
    handle = embedded.start_redis()
    yield handle.address
    handle.stop()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of its own for each test; its Redis keys are deleted afterwards."""
    ns = f"t{secrets.token_hex(4)}"
    yield ns
    r = SyncRedis.from_url(redis_url)
    for key in r.scan_iter(Keys(ns).pattern(), count=1000):
        r.delete(key)
    r.close()


@pytest.fixture
def settings(kafka: str, redis_url: str, namespace: str) -> Settings:
    return Settings(namespace=namespace, kafka_bootstrap_servers=kafka, redis_url=redis_url)


@pytest.fixture
def topics(settings: Settings):
    registry = load_topics(settings.namespace)
    asyncio.run(create_topics(settings.require_kafka(), registry))
    return registry
