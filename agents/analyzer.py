"""Analyzer stage: TaskSubmitted -> the five-analyzer swarm -> TaskAnalyzed (SPEC §4)."""

from __future__ import annotations

from agents.analyzers import analyze_task
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

    async def handle(self, event: Envelope, tx: Tx) -> None:
        task = event.payload
        analyzed = await analyze_task(task)
        analyzed = analyzed.model_copy(update={"task": task})
        tx.emit("analyses", make_event(analyzed, producer="analyzer", cause=event))
