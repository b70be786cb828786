"""Starting a worker: topics first, then the Faust app with every consumer."""

from __future__ import annotations

import asyncio
import logging

from faust.worker import Worker
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.providers.registry import load_providers
from streams.app import create_app
from streams.config import Settings
from streams.pipeline import build_consumers, prepare_log
from streams.topics import load_topics


def redis_for_worker(settings: Settings) -> Redis:
    """The worker's Redis client."""
    # bounded timeouts: an unreachable Redis must surface as an error the stages pause on,
    # not as a call that hangs
    return Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5.0,
                           socket_connect_timeout=2.0, health_check_interval=10,
                           # a pooled connection to a restarted server fails once: retry it
                           # on a fresh connection instead of reporting a new outage
                           retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                           retry_on_error=[RedisConnectionError, RedisTimeoutError])


def build_app(settings: Settings):
    """The worker's Faust app for ``settings`` (services already resolved)."""
    registry = load_topics(settings.namespace, settings.topics_file)
    providers = load_providers(settings.providers_file, seed=settings.seed)
    redis = redis_for_worker(settings)
    return create_app(settings, registry, build_consumers(settings, providers), redis)


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Create the topics (idempotent), then run the worker until SIGINT/SIGTERM."""
    registry = load_topics(settings.namespace, settings.topics_file)

    async def prepare() -> None:
        redis = redis_for_worker(settings)
        try:
            await prepare_log(settings, registry, redis)
        finally:
            await redis.aclose()

    asyncio.run(prepare())
    app = build_app(settings)
    # aiokafka logs every send at DEBUG; building those records costs ~3 % of a busy worker
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()
