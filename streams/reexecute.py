"""Re-execution: one task through analyzer, executor and validator again, answered by the
``replay`` provider from its recorded calls (zero new provider calls).

The new events form a chain of their own: the new ``TaskSubmitted`` is caused by the original
one (``causation_id`` = the original event id, ``metadata.reexecution_of`` likewise), and every
later event derives from it, so lineage links the re-run to the history it replays. The stages
run in-process against a scratch namespace (deleted afterwards) and their events are returned,
not published: re-running history must not feed the live pipeline.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from redis.asyncio import Redis

from agents.analyzer import AnalyzerStage
from agents.executor import ExecutorStage
from agents.providers.replay import ReplayProvider
from agents.sandbox import resolve_mode
from agents.validator import ValidatorStage
from models.codec import CodecError, decode, make_event
from models.events import Envelope, TaskSubmitted
from streams.client import read_topic
from streams.config import Settings
from streams.keys import Keys
from streams.stage import Consumer, Context, Tx
from streams.topics import TopicRegistry


class NothingToReexecute(LookupError):
    """The log holds no submission or no routing decision for the task."""


@dataclass
class Reexecution:
    """The original and new outcome, and every new event (in stage order)."""

    task_id: str
    original_passed: bool | None
    passed: bool
    replayed_calls: int
    new_provider_calls: int
    events: list[Envelope]

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "original_passed": self.original_passed,
                "passed": self.passed, "same_outcome": self.original_passed == self.passed,
                "replayed_calls": self.replayed_calls, "new_provider_calls": self.new_provider_calls,
                "events": [e.model_dump(mode="json") for e in self.events]}


async def task_history(settings: Settings, registry: TopicRegistry, task_id: str,
                       roles: tuple[str, ...]) -> dict[str, list[Envelope]]:
    """role -> the task's events on that topic, in log order."""
    out: dict[str, list[Envelope]] = {}
    for role in roles:
        events = []
        async for r in read_topic(settings.require_kafka(), registry.name(role)):
            try:
                e = decode(r.value, max_bytes=None)
            except CodecError:
                continue
            if e.correlation_id == task_id:
                events.append(e)
        out[role] = events
    return out


async def reexecute(settings: Settings, registry: TopicRegistry, redis: Redis,
                    task_id: str) -> Reexecution:
    """Re-run ``task_id`` from its recorded submission, decision and provider calls.

    Raises:
        NothingToReexecute: no TaskSubmitted or no ProviderSelected for the task in the log.
        agents.sandbox.SandboxUnavailable: ``RMO_SANDBOX`` asks for a sandbox this machine lacks.
    """
    resolve_mode(settings.sandbox)  # the stages below run the recorded answers' code
    history = await task_history(settings, registry, task_id,
                                 ("tasks", "decisions", "calls", "validations"))
    submitted = [e for e in history["tasks"] if e.event_type == "TaskSubmitted"]
    decisions = [e for e in history["decisions"] if e.event_type == "ProviderSelected"]
    if not submitted or not decisions:
        raise NothingToReexecute(f"{task_id}: the log has no submission and routing decision for it")
    original, decision = submitted[-1], decisions[-1]
    calls = [e.payload for e in history["calls"]]
    # the recorded decision's provider order, not the calls' arrival order: consensus breaks
    # ties by candidate order, so another order could pick another winner
    order = dict.fromkeys([*decision.payload.providers, *(c.provider for c in calls)])
    providers = {p: ReplayProvider(p, next((c.model for c in calls if c.provider == p), "unknown"), calls)
                 for p in order}
    validated = [e.payload for e in history["validations"]]

    task: TaskSubmitted = original.payload
    task = task.model_copy(update={"metadata": {**task.metadata, "reexecution_of": original.event_id}})
    root = make_event(task, producer="replay.reexecute", cause=original)
    scratch = Keys(f"{settings.namespace}-reexec-{secrets.token_hex(4)}")
    ctx = Context(settings=settings, keys=scratch, topics=registry, redis=redis, producer=None)
    stages: list[Consumer] = [
        AnalyzerStage(),
        ExecutorStage(providers, settings, forced_actions={task_id: decision.payload.action}),
        ValidatorStage(settings),
    ]
    produced: list[Envelope] = [root]
    inputs = [root]
    try:
        for stage in stages:
            tx = Tx(ctx)
            await stage.process([e for e in inputs if e.event_type in stage.handles], tx)
            if tx.failed:
                raise RuntimeError(f"{stage.name} failed: {next(iter(tx.failed.values()))!r}")
            outputs = [e for _, _, e in tx.emitted]
            produced += outputs
            inputs = outputs
    finally:
        async for key in redis.scan_iter(scratch.pattern(), count=1000):
            await redis.delete(key)
    result = next(e for e in produced if e.event_type == "TaskValidated")
    replayed = sum(p.served for p in providers.values())
    call_events = sum(e.event_type in ("ProviderCallCompleted", "ProviderCallFailed") for e in produced)
    return Reexecution(
        task_id=task_id,
        original_passed=validated[-1].passed if validated else None,
        passed=result.payload.passed,
        replayed_calls=replayed,
        new_provider_calls=call_events - replayed,  # attempts history could not answer
        events=produced,
    )
