"""The Cortex jobs' user operations, one typed function each (SPEC §6; the task operations
are in streams/service.py): :func:`parse_job` / :func:`job_event` and :func:`submit_job`
(``rmo job submit``, ``POST /jobs``, MCP ``submit_job``),
:func:`job_status` (``rmo job status``, ``GET /jobs/{id}``, ``job_status``), :func:`list_jobs`
(``rmo job list``, ``GET /jobs``, ``list_jobs``), the report (streams/job_report.py: ``rmo job
report``, ``GET /jobs/{id}/report``, ``job_report``),
:func:`list_escalations` and :func:`resolve_escalation` (``rmo escalations``,
``/escalations``, ``list_escalations`` / ``resolve_escalation``). Front-ends only parse, call and render.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from agents.cortex.job import ACCEPTED, JobState
from models.codec import MAX_VALUE_BYTES, encode, make_event
from models.events import Envelope
from models.jobs import EscalationResolved, JobSubmitted
from streams.client import EventProducer
from streams.config import Settings
from streams.keys import Keys
from streams.service import InvalidTask, create_topics, parse_object
from streams.topics import load_topics


class InvalidJob(InvalidTask):
    """A job document is not a valid ``JobSubmitted`` (``where`` names the input, ``problem``
    the field): one line."""


class JobNotFound(LookupError):
    """No job of that id was applied in the namespace."""


class EscalationNotFound(LookupError):
    """No open escalation of that id (never raised, or already resolved)."""


def parse_job(text: str, source: str, producer: str = "cli.job") -> Envelope:
    """A JSON job document -> its ``JobSubmitted`` event (correlation id: the job id).

    Raises:
        InvalidJob: not JSON, not an object, not a valid job (a cycle, an unknown dependency,
            a subtask whose fields do not fit its kind: the message names it), or over the
            record limit.
    """
    return job_event(parse_object(text, source, JobSubmitted, InvalidJob), source, producer)


def job_event(job: JobSubmitted, where: str, producer: str) -> Envelope:
    """The ``JobSubmitted`` event of ``job`` (a new event id; correlation id: the job id).

    Raises:
        InvalidJob: the event would exceed the record limit (:data:`MAX_VALUE_BYTES`), or
            holds a value JSON on the wire cannot carry (an integer beyond 64 bits).
    """
    event = make_event(job, producer=producer, correlation_id=job.job_id)
    try:
        size = len(encode(event))
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits in a metadata value
        raise InvalidJob(where, f"not encodable as an event: {exc}") from None
    if size > MAX_VALUE_BYTES:
        raise InvalidJob(where, f"job {job.job_id!r} is {size:,} bytes as an event, over the "
                                f"{MAX_VALUE_BYTES:,}-byte record limit")
    return event


@dataclass(frozen=True)
class SubmittedJob:
    """A produced ``JobSubmitted``: job id, event id, and where the broker acked it."""

    job_id: str
    event_id: str
    topic: str
    partition: int
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _produce(settings: Settings, event: Envelope) -> tuple[str, int, int]:
    registry = load_topics(settings.namespace, settings.topics_file)
    await create_topics(settings)
    async with EventProducer(settings.require_kafka()) as producer:
        [md] = await producer.send_events(registry.name("jobs"), [event], key=event.payload.job_id)
    return md.topic, md.partition, md.offset


async def submit_job(settings: Settings, event: Envelope) -> SubmittedJob:
    """Create the topics if missing, then produce ``event`` (from :func:`parse_job`) to the
    jobs topic keyed by job id, and wait for its acknowledgement.

    Raises:
        ValueError: no Kafka broker or Redis is resolved in ``settings``.
        aiokafka.errors.KafkaError, redis.exceptions.ConnectionError: a service is unreachable.
    """
    topic, partition, offset = await _produce(settings, event)
    return SubmittedJob(event.payload.job_id, event.event_id, topic, partition, offset)


@dataclass(frozen=True)
class SubtaskLine:
    """One subtask in a job's status: its master, state, task id, cap and usage (tokens,
    USD), and why it is escalated (``reason``: subtask_failed, budget_exhausted) or skipped."""

    subtask_id: str
    domain: str
    status: str
    task_id: str | None
    depends_on: list[str]
    cap_tokens: int | None
    tokens: int
    cost_usd: float
    provider: str | None
    escalation: str | None
    detail: str | None
    reason: str | None = None


@dataclass(frozen=True)
class MasterLine:
    """One domain master's budget line: allocated (None: unlimited, personal + workers),
    used by settled subtasks, held by running ones, granted from the reserve (tokens; USD)."""

    domain: str
    tokens_allocated: int | None
    personal_tokens: int | None
    workers_tokens: int | None
    tokens_used: int
    tokens_held: int
    reserve_tokens_granted: int
    usd_allocated: float | None
    usd_used: float


@dataclass(frozen=True)
class JobReport:
    """A job as its coordinator projected it: ``phase`` (planning, running, done), the end
    ``status`` once done (completed, partial, failed, expired), masters, subtasks, open
    escalations, the reserve left and the budget. ``awaiting_operator``: the job is running
    but no subtask is, so it moves only once a person resolves its open escalations (Cortex's
    human operator; ``rmo escalations resolve``); a poller stops waiting here too."""

    job_id: str
    phase: str
    status: str | None
    reason: str | None
    submitted_at: str
    budget_tokens: int | None
    budget_usd: float | None
    reserve_tokens_left: int | None
    tokens_used: int
    masters: list[MasterLine] = field(default_factory=list)
    subtasks: list[SubtaskLine] = field(default_factory=list)
    escalations: list[str] = field(default_factory=list)
    artefacts: dict[str, str] = field(default_factory=dict)
    completed: dict[str, Any] | None = None
    """The ``JobCompleted`` payload once done (its aggregate; artefacts above)."""
    awaiting_operator: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, s: JobState) -> JobReport:
        masters = [MasterLine(m.domain, m.tokens, m.personal_tokens, m.workers_tokens, m.used_tokens,
                              m.held_tokens, m.reserve_tokens,
                              None if m.micro is None else m.micro / 1e6, m.used_micro / 1e6)
                   for m in s.masters.values()]
        subs = [SubtaskLine(x.spec.id, x.spec.domain, x.status, x.task_id, list(x.spec.depends_on),
                            x.cap_tokens, x.tokens, x.micro / 1e6, x.provider, x.escalation, x.detail,
                            x.reason)
                for x in sorted(s.subs.values(), key=lambda x: x.order)]
        r = s.result
        escalations = [x.escalation for x in s.subs.values() if x.status == "escalated" and x.escalation]
        return cls(job_id=s.job.job_id, phase=s.phase, status=r.status if r else None,
                   reason=r.reason if r else None, submitted_at=s.submitted_at,
                   budget_tokens=s.job.budget_tokens, budget_usd=s.job.budget_usd,
                   reserve_tokens_left=s.reserve_tokens,
                   tokens_used=sum(m.used_tokens for m in s.masters.values()),
                   masters=masters, subtasks=subs,
                   escalations=escalations,
                   artefacts=dict(r.artefacts) if r else {},
                   completed=r.model_dump(mode="json", exclude={"artefacts"}) if r else None,
                   awaiting_operator=s.phase == "running" and bool(escalations)
                   and not any(x.status == "running" for x in s.subs.values()))

    def render(self) -> list[str]:
        """Console lines: the job, a line per master, a line per subtask."""
        budget = f"{self.budget_tokens:,} tokens" if self.budget_tokens is not None else "unlimited"
        end = f" {self.status}" if self.status else ""
        wait = ", awaiting an operator" if self.awaiting_operator else ""
        lines = [f"job {self.job_id}: {self.phase}{end}{wait}"
                 + (f" ({self.reason})" if self.reason else "")
                 + f"; used {self.tokens_used:,} of {budget}"
                 + (f", reserve left {self.reserve_tokens_left:,}" if self.reserve_tokens_left is not None else "")]
        for m in self.masters:
            alloc = f"{m.tokens_allocated:,}" if m.tokens_allocated is not None else "unlimited"
            lines.append(f"  master {m.domain:14} allocated {alloc:>10}  used {m.tokens_used:>9,}  "
                         f"held {m.tokens_held:>8,}  reserve {m.reserve_tokens_granted:,}")
        for x in self.subtasks:
            why = f"  ({x.detail})" if x.detail and x.status in ("escalated", "skipped") else ""
            lines.append(f"  {x.subtask_id:20} {x.domain:14} {x.status:10} {x.tokens:>7,} tokens{why}")
        lines += [f"  open escalation: {e} (rmo escalations resolve {e} --answer FILE | --skip)"
                  for e in self.escalations]
        return lines


async def _state(redis: Redis, keys: Keys, job_id: str) -> JobState:
    raw = await redis.get(keys.job(job_id))
    if raw is None:
        raise JobNotFound(f"no job {job_id!r} in namespace {keys.namespace!r}")
    return JobState.model_validate_json(raw)


async def job_status(settings: Settings, job_id: str) -> JobReport:
    """The coordinator's projected state of ``job_id`` (reads Redis only).

    Raises:
        JobNotFound: the coordinator has not applied a job of that id.
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        return JobReport.from_state(await _state(redis, Keys(settings.namespace), job_id))
    finally:
        await redis.aclose()


@dataclass(frozen=True)
class JobLine:
    """One job in a listing: id, when submitted, phase, end status, subtasks accepted of all,
    tokens used of the budget (None: unlimited), open escalations."""

    job_id: str
    submitted_at: str
    phase: str
    status: str | None
    subtasks: int
    accepted: int
    tokens_used: int
    budget_tokens: int | None
    escalations: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def list_jobs(settings: Settings, limit: int = 100) -> list[JobLine]:
    """The namespace's jobs, newest first (at most ``limit``; reads Redis only).

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    keys = Keys(settings.namespace)
    try:
        ids = await redis.zrevrange(keys.jobs, 0, max(limit, 1) - 1)
        raw = await redis.mget([keys.job(i) for i in ids]) if ids else []
    finally:
        await redis.aclose()
    out = []
    for doc in raw:
        if doc is None:
            continue
        r = JobReport.from_state(JobState.model_validate_json(doc))
        out.append(JobLine(r.job_id, r.submitted_at, r.phase, r.status, len(r.subtasks),
                           sum(x.status in ACCEPTED for x in r.subtasks),
                           r.tokens_used, r.budget_tokens, len(r.escalations)))
    return out


@dataclass(frozen=True)
class Escalation:
    """An open escalation: its id, job, subtask, master, reason (subtask_failed,
    budget_exhausted) and detail."""

    escalation_id: str
    job_id: str
    subtask_id: str
    domain: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def list_escalations(settings: Settings) -> list[Escalation]:
    """Every open escalation of the namespace, by id (reads Redis only).

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        raw = await redis.hgetall(Keys(settings.namespace).escalations)
    finally:
        await redis.aclose()
    out = []
    for eid, doc in sorted(raw.items()):
        d = orjson.loads(doc)
        out.append(Escalation(eid, d["job_id"], d["subtask_id"], d["domain"], d.get("reason") or "",
                              d.get("detail") or ""))
    return out


@dataclass(frozen=True)
class ResolvedEscalation:
    """A produced ``EscalationResolved``: which escalation, skipped or answered, and where."""

    escalation_id: str
    skipped: bool
    event_id: str
    topic: str
    partition: int
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def resolve_escalation(settings: Settings, escalation_id: str, *, answer: str | None = None,
                             skip: bool = False, by: str = "operator") -> ResolvedEscalation:
    """Answer an open escalation (``answer``: the subtask's accepted answer) or ``skip`` it,
    by producing ``EscalationResolved`` to the jobs topic; the coordinator goes on.

    Raises:
        ValueError: neither or both of ``answer`` and ``skip``.
        EscalationNotFound: no open escalation of that id.
    """
    if (answer is None) == (not skip):
        raise ValueError("give an answer or skip, not both or neither")
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        doc = await redis.hget(Keys(settings.namespace).escalations, escalation_id)
    finally:
        await redis.aclose()
    if doc is None:
        raise EscalationNotFound(f"no open escalation {escalation_id!r}; list them with "
                                 "`rmo escalations list`")
    d = orjson.loads(doc)
    event = make_event(EscalationResolved(escalation_id=escalation_id, job_id=d["job_id"],
                                          subtask_id=d["subtask_id"], answer=answer,
                                          skipped=skip, by=by),
                       producer="cli.escalations", correlation_id=d["job_id"])
    topic, partition, offset = await _produce(settings, event)
    return ResolvedEscalation(escalation_id, skip, event.event_id, topic, partition, offset)
