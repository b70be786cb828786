"""The pipeline's consumers, in stage order: what a worker runs and what replay rebuilds."""

from __future__ import annotations

from agents.analyzer import AnalyzerStage
from agents.executor import ExecutorStage, breaker_config, qconfig
from agents.learning import QTableConsumer, RewardStage
from agents.providers.base import Provider
from agents.validator import ValidatorStage
from streams.config import Settings
from streams.projections import BreakerProjection
from streams.stage import Consumer, ProjectionConsumer


def build_consumers(settings: Settings, providers: dict[str, Provider]) -> list[Consumer]:
    """analyzer -> executor (+ breaker projection of its calls) -> validator -> learning
    (+ the Q-table consumer of the rewards topic)."""
    return [
        AnalyzerStage(),
        ExecutorStage(providers, settings),
        ProjectionConsumer("executor.breaker", "calls", (BreakerProjection(breaker_config(settings)),)),
        ValidatorStage(settings),
        RewardStage(settings),
        QTableConsumer(settings, qconfig(settings)),
    ]
