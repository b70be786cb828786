"""Analyzer stage: TaskSubmitted -> the five-analyzer swarm -> TaskAnalyzed (SPEC §4)."""

from __future__ import annotations

from collections.abc import Sequence

from agents.analyzers import analyze_batch
from models.codec import make_event
from models.events import Envelope
from streams.projections import CountersProjection, TaskStatusProjection
from streams.stage import Consumer, Tx


class AnalyzerStage(Consumer):
    """Consumes the tasks topic. Besides analyzing submissions it projects task status and
    counters for everything on that topic (TaskSubmitted and TaskCompleted)."""

    name = "analyzer"
    source = "tasks"
    handles = frozenset({"TaskSubmitted"})
    projections = (TaskStatusProjection(), CountersProjection())

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        tasks = [e.payload for e in events]
        for event, task, analyzed in zip(events, tasks, await analyze_batch(tasks)):
            analyzed = analyzed.model_copy(update={"task": task})
            tx.emit("analyses", make_event(analyzed, producer="analyzer", cause=event))
