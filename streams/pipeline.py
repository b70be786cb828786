"""The pipeline's consumers, in stage order: what a worker runs and what replay rebuilds."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from agents.analyzer import AnalyzerStage
from agents.executor import ExecutorStage, breaker_config, qconfig
from agents.learning import QTableConsumer, RewardStage
from agents.providers.base import Provider
from agents.validator import ValidatorStage
from streams.client import high_watermarks
from streams.config import Settings
from streams.keys import Keys
from streams.projections import BreakerProjection
from streams.stage import Consumer, ProjectionConsumer
from streams.topics import TopicRegistry

BREAKER_CONSUMER = ("executor.breaker", "calls")

SOURCES: tuple[tuple[str, str], ...] = (
    (AnalyzerStage.name, AnalyzerStage.source),
    (ExecutorStage.name, ExecutorStage.source),
    BREAKER_CONSUMER,
    (ValidatorStage.name, ValidatorStage.source),
    (RewardStage.name, RewardStage.source),
    (QTableConsumer.name, QTableConsumer.source),
)
"""(consumer name, source role) of every consumer, in pipeline order."""


def build_consumers(settings: Settings, providers: dict[str, Provider]) -> list[Consumer]:
    """analyzer -> executor (+ breaker projection of its calls) -> validator -> learning
    (+ the Q-table consumer of the rewards topic)."""
    return [
        AnalyzerStage(),
        ExecutorStage(providers, settings),
        ProjectionConsumer(*BREAKER_CONSUMER, (BreakerProjection(breaker_config(settings)),)),
        ValidatorStage(settings),
        RewardStage(settings),
        QTableConsumer(settings, qconfig(settings)),
    ]


async def wait_caught_up(settings: Settings, registry: TopicRegistry, redis: Redis,
                         timeout_s: float = 60.0) -> bool:
    """Wait until every consumer's checkpoint reached its source topic's high watermark (from
    a fetch response), i.e. every projection applied everything in the log. Returns False on
    timeout. Call it once producers are quiet: a busy pipeline keeps moving the watermarks."""
    keys = Keys(settings.namespace)
    deadline = time.monotonic() + timeout_s
    while True:
        behind = False
        for name, role in SOURCES:
            topic = registry.name(role)
            for partition, hw in (await high_watermarks(settings.require_kafka(), topic)).items():
                mark = await redis.get(keys.checkpoint(name, topic, partition))
                if hw > 0 and (mark is None or int(mark) < hw - 1):
                    behind = True
        if not behind:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
