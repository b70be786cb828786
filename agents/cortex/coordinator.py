"""The coordinator: the consumer of the ``jobs`` topic that runs every job's state machine
(agents/cortex/job.py) as a projection, live and in replay.

Its state is a projection of the jobs topic, so ``rmo replay`` rebuilds it; the events it
emits (subtasks into the tasks topic, masters and assignments into the jobs topic,
escalations into the system topic) are produced only live, by the commit protocol's step 6
(streams/stage.py), with ids derived from the event they answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson

from agents.cortex import job as machine
from agents.cortex.job import JobState, Out
from models.codec import derive_event_id, make_event
from models.events import Envelope
from models.jobs import EscalationResolved, JobDeadlinePassed, JobSubmitted, SubtaskCompleted
from streams.stage import Consumer, Tx

log = logging.getLogger("rmo.coordinator")
HANDLED = frozenset({"JobSubmitted", "SubtaskCompleted", "EscalationResolved", "JobDeadlinePassed"})
TICK_S = 5.0
"""Seconds between the coordinator's deadline checks in each worker."""


def _job_id(e: Envelope) -> str:
    return e.payload.job_id


def step(state: JobState | None, e: Envelope) -> tuple[JobState | None, list[Out]]:
    """One event of a job: its next state and what to emit. A second ``JobSubmitted`` for
    a known job, or an event for an unknown one, changes nothing (logged)."""
    p = e.payload
    if isinstance(p, JobSubmitted):
        if state is not None:
            log.warning("job %s submitted again (event %s): ignored", p.job_id, e.event_id)
            return state, []
        return machine.start(p, e.occurred_at.isoformat())
    if state is None:
        log.warning("%s for unknown job %s: ignored", e.event_type, p.job_id)
        return None, []
    if isinstance(p, SubtaskCompleted):
        return state, machine.completed(state, p)
    if isinstance(p, EscalationResolved):
        return state, machine.resolved(state, p)
    if isinstance(p, JobDeadlinePassed):
        return state, machine.deadline_passed(state)
    return state, []


class JobProjection:
    """Every job's :class:`JobState` (``{ns}:job:{id}``), the jobs index and the open
    escalations, from the jobs topic; emits what each step decides."""

    name = "jobs"

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        mine = [e for e in events if e.event_type in HANDLED]
        if not mine:
            return
        ids = list(dict.fromkeys(_job_id(e) for e in mine))
        raw = dict(zip(ids, await tx.redis.mget([tx.keys.job(i) for i in ids])))
        states = {i: _load(r) for i, r in raw.items()}
        applied: dict[str, list[Envelope]] = {i: [] for i in ids}
        for e in mine:
            job_id = _job_id(e)
            try:
                # in place: a deep copy per event made a job's events quadratic in its size
                after, outs = step(states[job_id], e)
            except Exception:  # a bug must not wedge the partition: the event stays in the log
                log.exception("coordinator could not apply %s %s of job %s", e.event_type,
                              e.event_id, job_id)
                # step may have half-changed the state: rebuild it from the batch's start
                # and the events applied since (step is a function of state and event)
                states[job_id] = _rebuild(raw[job_id], applied[job_id])
                continue
            states[job_id] = after
            applied[job_id].append(e)
            for o in outs:
                tx.emit(o.role, make_event(o.payload, producer="coordinator", cause=e,
                                           discriminator=o.discriminator, correlation_id=job_id),
                        key=o.key or job_id)
        touched = {i: s for i, s in states.items() if s is not None}
        k = tx.keys

        def write(pipe) -> None:
            for job_id, s in touched.items():
                pipe.set(k.job(job_id), s.model_dump_json())
                at = s.submitted_at and _epoch(s.submitted_at)
                pipe.zadd(k.jobs, {job_id: at or 0})
                deadline = _deadline(s)
                if deadline is not None and s.phase != "done":
                    pipe.zadd(k.job_deadlines, {job_id: deadline.timestamp()})
                else:
                    pipe.zrem(k.job_deadlines, job_id)
                for sub in s.subs.values():
                    if sub.escalation is None:
                        continue
                    if sub.status == "escalated":
                        pipe.hset(k.escalations, sub.escalation, orjson.dumps({
                            "job_id": job_id, "subtask_id": sub.spec.id, "domain": sub.spec.domain,
                            "reason": sub.reason, "detail": sub.detail}).decode())
                    else:
                        pipe.hdel(k.escalations, sub.escalation)

        tx.write(write)


def _load(raw: str | bytes | None) -> JobState | None:
    return JobState.model_validate_json(raw) if raw else None


def _rebuild(raw: str | bytes | None, events: Sequence[Envelope]) -> JobState | None:
    """The state ``raw`` held, with ``events`` (each applied once already) stepped again; what
    they emit was emitted the first time."""
    state = _load(raw)
    for e in events:
        state, _ = step(state, e)
    return state


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _deadline(s: JobState) -> datetime | None:
    if s.job.deadline_s is None or not s.submitted_at:
        return None
    return datetime.fromisoformat(s.submitted_at) + timedelta(seconds=s.job.deadline_s)


class Coordinator(Consumer):
    """Consumes the jobs topic (agents/cortex/job.py: the protocol)."""

    name = "coordinator"
    source = "jobs"
    handles = frozenset()  # no stage logic: the projection decides, in replay as live
    projections = (JobProjection(),)
    tick_s = TICK_S

    async def tick(self, tx: Tx) -> None:
        """Emit ``JobDeadlinePassed`` for every open job whose deadline (by Redis' clock) has
        passed. Every worker ticks: the event's id is derived from the job, so copies are
        dropped, and a late one finds the job done and changes nothing."""
        sec, usec = await tx.redis.time()  # one clock for every worker (streams/seen.py)
        now = sec + usec / 1e6
        for job_id, at in await tx.redis.zrangebyscore(tx.keys.job_deadlines, 0, now, withscores=True):
            deadline = datetime.fromtimestamp(at, UTC)
            tx.emit("jobs", make_event(JobDeadlinePassed(job_id=job_id, deadline=deadline),
                                       producer="coordinator.tick", correlation_id=job_id,
                                       event_id=derive_event_id(job_id, "coordinator.tick", 0, "deadline")),
                    key=job_id)
