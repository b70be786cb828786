"""The pipeline's consumers, in stage order: what a worker runs and what replay rebuilds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from redis.asyncio import Redis

from agents.analyzer import AnalyzerStage
from agents.cortex.coordinator import Coordinator
from agents.executor import ExecutorStage, breaker_config, qconfig
from agents.learning import QTableConsumer, RewardStage
from agents.patterns import PatternExtractor
from agents.providers.base import Provider
from agents.rules import ProtocolUpdater, RuleMonitor
from agents.validator import ValidatorStage
from streams.client import topics_high_watermarks
from streams.config import Settings
from streams.keys import Keys
from streams.projections import BreakerProjection, BudgetProjection
from streams.stage import Consumer, ProjectionConsumer
from streams.topics import TopicRegistry, create_topics

log = logging.getLogger("rmo.pipeline")

BREAKER_CONSUMER = ("executor.breaker", "calls")

SOURCES: tuple[tuple[str, str], ...] = (
    (AnalyzerStage.name, AnalyzerStage.source),
    (ExecutorStage.name, ExecutorStage.source),
    BREAKER_CONSUMER,
    (ValidatorStage.name, ValidatorStage.source),
    (RewardStage.name, RewardStage.source),
    (QTableConsumer.name, QTableConsumer.source),
    (PatternExtractor.name, PatternExtractor.source),
    (ProtocolUpdater.name, ProtocolUpdater.source),
    (RuleMonitor.name, RuleMonitor.source),
    (Coordinator.name, Coordinator.source),
)
"""(consumer name, source role) of every consumer, in pipeline order."""


def build_consumers(settings: Settings, providers: dict[str, Provider]) -> list[Consumer]:
    """analyzer -> executor (+ breaker and budget projections of its calls) -> validator ->
    learning (+ the Q-table consumer of the rewards topic), and the learning subsystem's
    error patterns (errors topic), protocol rules (learning topic) and task outcomes with the
    rules' evaluation (rewards topic; agents/rules.py), and the Cortex jobs' coordinator
    (jobs topic; agents/cortex)."""
    return [
        AnalyzerStage(),
        ExecutorStage(providers, settings),
        ProjectionConsumer(*BREAKER_CONSUMER, (BreakerProjection(breaker_config(settings)),
                                               BudgetProjection())),
        ValidatorStage(settings),
        RewardStage(settings),
        QTableConsumer(settings, qconfig(settings)),
        PatternExtractor(settings),
        ProtocolUpdater(settings),
        RuleMonitor(settings),
        Coordinator(),
    ]


async def source_watermarks(settings: Settings, registry: TopicRegistry,
                            sources: Sequence[tuple[str, str]] = SOURCES) -> dict[str, int]:
    """Checkpoint key -> high watermark of its source partition, for every consumer of
    ``sources`` ((name, source role) pairs) and every partition holding records (from fetch
    responses)."""
    keys = Keys(settings.namespace)
    topics = {name: registry.name(role) for name, role in sources}
    hws = await topics_high_watermarks(settings.require_kafka(), list(topics.values()))
    return {keys.checkpoint(name, topic, partition): hw
            for name, topic in topics.items() for partition, hw in hws[topic].items() if hw > 0}


async def reached(redis: Redis, target: dict[str, int]) -> bool:
    """True when every checkpoint key of ``target`` (:func:`source_watermarks`) reached its
    high watermark: its consumer applied every record below it (checkpoint >= hw - 1)."""
    marks = await redis.mget(list(target)) if target else []
    return all(m is not None and int(m) >= hw - 1 for m, hw in zip(marks, target.values()))


async def wait_caught_up(settings: Settings, registry: TopicRegistry, redis: Redis,
                         timeout_s: float = 60.0) -> bool:
    """Wait until every consumer's checkpoint reached its source topic's high watermark (from
    a fetch response), i.e. every projection applied everything in the log. Returns False on
    timeout. Call it once producers are quiet: a busy pipeline keeps moving the watermarks.

    Watermarks are read again only once the checkpoints reached the last ones read (catching
    up produces downstream events); equal twice in a row means done.
    """
    deadline = time.monotonic() + timeout_s
    target = await source_watermarks(settings, registry)
    while time.monotonic() < deadline:
        if await reached(redis, target):
            latest = await source_watermarks(settings, registry)
            if latest == target:
                return True
            target = latest
            continue
        await asyncio.sleep(0.1)
    return False


async def prepare_log(settings: Settings, registry: TopicRegistry, redis: Redis) -> list[str]:
    """Create the namespace's topics (idempotent) and return the names created.

    A newly created tasks topic means the log is empty: any projection state Redis still holds
    under this namespace was derived from another log (typically an embedded broker that has
    been restarted, whose memory storage is gone) and would never match this one, so it is
    deleted, with one warning naming the namespace.
    """
    created = await create_topics(settings.require_kafka(), registry)
    if registry.name("tasks") in created:
        stale = [key async for key in redis.scan_iter(Keys(settings.namespace).pattern(), count=1000)]
        if stale:
            await redis.delete(*stale)
            log.warning("namespace %s held %d Redis keys of another log (the tasks topic is new); "
                        "cleared them", settings.namespace, len(stale))
    return created
