"""The user operations, one typed function each (SPEC §6 "One operation, three front-ends").

The CLI (and later the HTTP API and the MCP server) only parse input, call these functions and
render what they return, so the front-ends cannot disagree. Results are dataclasses with
typed fields; ``to_dict()`` gives their JSON form, numbers as numbers and booleans as booleans.

Operations: :func:`submit_tasks` (with :func:`parse_tasks` / :func:`task_event`; ``rmo
submit``), :func:`task_report` (``rmo status``), :func:`task_events` (a task's events as they
happen), :func:`task_lineage` (``rmo lineage``), :func:`replay` and :func:`reexecute`
(``rmo replay``), :func:`dead_letters` and :func:`retry_dead_letter` (``rmo deadletter``),
:func:`metrics_snapshots` (``rmo metrics``), :func:`metrics_summary`, :func:`health`,
:func:`live_workers`, :func:`list_providers` and :func:`check_providers` (``rmo providers``),
:func:`breaker_list` and :func:`breaker_command` (``rmo breaker``), :func:`budget_report`
(``rmo budget``), :func:`evaluate_policy` (``rmo evaluate-policy``), :func:`rules_report`
(``rmo rules``), :func:`report` (``rmo report``). Front-ends: streams/cli.py, streams/api.py (HTTP), streams/mcp_server.py (MCP).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents import ope, target_policies
from agents.breaker import BreakerConfig, BreakerState, Command, admission
from agents.budget import BudgetUsage, load_budgets, usage
from agents.executor import breaker_config
from agents.policy import make_policy
from agents.providers.base import Provider, ProviderError, ProviderRequest, ProviderTimeout
from agents.providers.registry import load_providers
from agents.providers.sim import STUB_BODY
from models.codec import (
    MAX_VALUE_BYTES,
    CodecError,
    decode,
    derive_event_id,
    describe_validation,
    encode,
    make_event,
    utcnow,
)
from models.events import BreakerCommand, Envelope, TaskSubmitted
from streams import liveness, policy_eval
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.embedded import kafka_reachable
from streams.keys import Keys
from streams.lineage import ROLES, Node, lineage
from streams.liveness import Heartbeat
from streams.locate import redact
from streams.metrics import ProviderSummary, learned_policy, provider_summaries
from streams.policy_eval import NoDecisions, PolicyEstimate
from streams.projections import MICRO, task_status
from streams.topics import load_topics

if TYPE_CHECKING:
    from streams.reexecute import Reexecution
    from streams.report import Report

SIM_STUB_NOTE = (
    "the answer is a stub (`raise NotImplementedError`): sim providers only answer the tasks "
    "in their answer book (HumanEval's 164 problems, plus a profile's `reference_file`), and "
    "this prompt is not in it, so no sim provider can pass its tests")
"""Shown with a code answer that ends in the sim providers' stub body."""


class TaskNotFound(LookupError):
    """No event of the task is in the log (lineage). Its message names the task id."""


@dataclass(frozen=True)
class ProviderCallReport:
    """One provider call of a task (one attempt): ``latency_ms`` in ms, ``cost_usd`` in USD,
    ``tokens`` input + output; ``error_type`` and ``http_status`` only for a failed call."""

    provider: str
    attempt: int
    ok: bool
    model: str
    error_type: str | None
    http_status: int | None
    latency_ms: float
    cost_usd: float
    tokens: int


@dataclass(frozen=True)
class LevelReport:
    """One validator level that ran, in run order."""

    level: str
    passed: bool


@dataclass(frozen=True)
class FailureReport:
    """Why validation failed: the first failed level, the error type of its first failure
    (e.g. ``"AssertionError"``, ``"NotImplementedError"``, ``"ruff:F821"``; None when the level
    has none, e.g. ``provider``: no candidate answer) and its message (at most 500 chars, e.g.
    the failing assert with its test line, or the exception's message)."""

    level: str
    error_type: str | None
    message: str


@dataclass(frozen=True)
class TaskReport:
    """Everything the task projection knows about one task (``rmo status``).

    ``status``: passed | failed | rejected | dead_lettered, else the furthest stage reached
    (pending, analyzed, executed, validated), or unknown when no event of the task was
    projected. ``provider``: the provider whose answer was chosen; ``providers``: every
    provider called, in ``calls`` order. ``answer``: the chosen answer (the code, for a code
    task), its first 20,000 characters; ``answer_chars`` its full length. ``cost_usd`` (USD)
    and ``tokens`` (input + output) count every call, failed ones included; ``latency_ms`` is
    submit to completion in ms. Times are event times. Fields are None (or empty) until the
    event that sets them has been projected.
    """

    task_id: str
    status: str
    kind: str | None = None
    priority: int | None = None
    task_type: str | None = None
    complexity: str | None = None
    action: str | None = None
    strategy: str | None = None
    provider: str | None = None
    providers: list[str] = field(default_factory=list)
    calls: list[ProviderCallReport] = field(default_factory=list)
    agreement: float | None = None
    answer: str | None = None
    answer_chars: int = 0
    answer_truncated: bool = False
    passed: bool | None = None
    tests_passed: int | None = None
    tests_total: int | None = None
    levels: list[LevelReport] = field(default_factory=list)
    failure: FailureReport | None = None
    result: str | None = None
    cost_usd: float = 0.0
    tokens: int = 0
    latency_ms: float | None = None
    submitted_at: datetime | None = None
    analyzed_at: datetime | None = None
    executed_at: datetime | None = None
    validated_at: datetime | None = None
    completed_at: datetime | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_hash(cls, task_id: str, h: dict[str, str]) -> TaskReport:
        """Read the ``{ns}:task:{id}`` hash written by TaskStatusProjection and
        BreakerProjection (streams/projections.py); missing fields stay None."""
        calls = sorted((_call(name, value) for name, value in h.items() if name.startswith("call:")),
                       key=lambda c: (c.provider, c.attempt))
        answer = h.get("answer") or None
        answer_chars = _int(h.get("answer_chars")) or len(answer or "")
        truncated = answer is not None and answer_chars > len(answer)
        failure = None
        if "failed_level" in h:
            failure = FailureReport(level=h["failed_level"],
                                    error_type=h.get("failed_error_type") or None,
                                    message=h.get("failed_message", ""))
        notes = []
        if h.get("kind") == "code" and answer and not truncated and answer.endswith(STUB_BODY):
            notes.append(SIM_STUB_NOTE)
        executed = "executed_cost_usd" in h
        return cls(
            task_id=task_id, status=task_status(h), kind=h.get("kind"),
            priority=_int(h.get("priority")), task_type=h.get("task_type"),
            complexity=h.get("complexity"), action=h.get("action"), strategy=h.get("strategy"),
            provider=h.get("chosen") or h.get("provider") or None,
            providers=list(dict.fromkeys(c.provider for c in calls)), calls=calls,
            agreement=_float(h.get("agreement")), answer=answer, answer_chars=answer_chars,
            answer_truncated=truncated,
            passed=None if "passed" not in h else h["passed"] == "1",
            tests_passed=_int(h.get("tests_passed")), tests_total=_int(h.get("tests_total")),
            levels=[LevelReport(d["level"], d["passed"]) for d in orjson.loads(h.get("levels", "[]"))],
            failure=failure, result=h.get("result") or None,
            # the executor's total is the spend even when the task was dead-lettered later
            cost_usd=_float(h.get("executed_cost_usd" if executed else "cost_usd")) or 0.0,
            tokens=_int(h.get("executed_tokens" if executed else "tokens")) or 0,
            latency_ms=_float(h.get("latency_ms")),
            submitted_at=_time(h.get("submitted_at")), analyzed_at=_time(h.get("analyzed_at")),
            executed_at=_time(h.get("executed_at")), validated_at=_time(h.get("validated_at")),
            completed_at=_time(h.get("completed_at")), notes=notes,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: numbers as numbers, booleans as booleans, times as RFC 3339
        strings, absent values as null."""
        d = asdict(self)
        for name, value in d.items():
            if isinstance(value, datetime):
                d[name] = value.isoformat()
        return d

    def render(self) -> list[str]:
        """The plain-text form, one line per item; the answer last, indented."""
        lines = [f"{self.task_id}: {self.status}"]
        if self.status == "unknown":
            return lines
        facts = [("kind", self.kind), ("priority", self.priority), ("task type", self.task_type),
                  ("complexity", self.complexity), ("action", self.action),
                  ("strategy", self.strategy), ("chosen provider", self.provider),
                  ("providers called", ", ".join(self.providers) or None),
                  ("agreement", self.agreement)]
        lines += [f"  {name}: {value}" for name, value in facts if value is not None]
        for c in self.calls:
            outcome = "ok" if c.ok else f"failed {c.error_type}" + (
                f" (HTTP {c.http_status})" if c.http_status else "")
            lines.append(f"    call {c.provider} #{c.attempt}: {outcome}, {c.model}, "
                         f"{c.latency_ms:.1f} ms, ${c.cost_usd:.6f}, {c.tokens} tokens")
        if self.levels:
            lines.append("  validation: " + ", ".join(
                f"{lv.level} {'ok' if lv.passed else 'FAILED'}" for lv in self.levels))
        if self.tests_total:
            lines.append(f"  tests: {self.tests_passed}/{self.tests_total} passed")
        if self.failure is not None:
            f = self.failure
            lines.append(f"  failed level: {f.level}"
                         + (f" ({f.error_type})" if f.error_type else "") + f": {f.message}")
        if self.result:
            lines.append(f"  result: {self.result}")
        if self.executed_at or self.completed_at:
            lines.append(f"  cost: ${self.cost_usd:.6f} USD, {self.tokens} tokens"
                         + (f", latency {self.latency_ms:.0f} ms" if self.latency_ms is not None else ""))
        lines += [f"  note: {n}" for n in self.notes]
        if self.answer is not None:
            more = f", first {len(self.answer)} shown" if self.answer_truncated else ""
            lines.append(f"  answer ({self.answer_chars} chars{more}):")
            lines += [f"    | {line}" for line in self.answer.splitlines()]
        return lines


async def task_report(settings: Settings, task_id: str) -> TaskReport:
    """The projected state of ``task_id`` in ``settings.namespace`` (status ``unknown`` when
    none of its events was projected). Reads Redis only.

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        h = await redis.hgetall(Keys(settings.namespace).task(task_id))
    finally:
        await redis.aclose()
    return TaskReport.from_hash(task_id, h)


async def task_lineage(settings: Settings, task_id: str) -> list[Node]:
    """The causation forest of ``task_id``'s events, read from every topic of the log: the
    roots in time order, each :class:`streams.lineage.Node` with its children (render them
    with or without payloads: ``Node.to_dict(payload=True)``, ``Node.render(payload=True)``).

    Raises:
        TaskNotFound: no event with correlation id ``task_id`` is in the log.
        ValueError: no Kafka broker is resolved in ``settings``.
    """
    roots = await lineage(settings, load_topics(settings.namespace, settings.topics_file), task_id)
    if not roots:
        raise TaskNotFound(f"no events with correlation id {task_id!r}")
    return roots


@dataclass(frozen=True)
class TaskEvent:
    """One event of a task and where it is in the log."""

    topic: str
    partition: int
    offset: int
    event: Envelope

    def to_dict(self) -> dict[str, Any]:
        """``topic``, ``partition``, ``offset`` and ``event``: the envelope as wire JSON."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "event": self.event.model_dump(mode="json")}


class _CausalOrder:
    """Releases a task's events so that none comes before its cause: an event whose cause
    (``causation_id``) has not been released yet waits for it. Events arrive from one reader
    per topic, so a TaskAnalyzed can be read before the TaskSubmitted that caused it."""

    def __init__(self) -> None:
        self.released: set[str] = set()
        self.waiting: dict[str, list[TaskEvent]] = {}
        self.held: set[str] = set()

    def add(self, te: TaskEvent) -> list[TaskEvent]:
        """``te`` and the events it unblocks, in order (empty: a duplicate, or ``te`` waits)."""
        eid, cause = te.event.event_id, te.event.causation_id
        if eid in self.released or eid in self.held:
            return []  # re-produced after a crash: the same id again
        if cause is not None and cause not in self.released:
            self.held.add(eid)
            self.waiting.setdefault(cause, []).append(te)
            return []
        out, queue = [], [te]
        while queue:
            x = queue.pop(0)
            self.held.discard(x.event.event_id)
            self.released.add(x.event.event_id)
            out.append(x)
            queue += self.waiting.pop(x.event.event_id, [])
        return out

    def rest(self) -> list[TaskEvent]:
        """Every event still waiting (its cause is on no topic read, or is another task's),
        in event-time order."""
        left = sorted((te for batch in self.waiting.values() for te in batch),
                      key=lambda te: te.event.occurred_at)
        self.waiting.clear()
        self.held.clear()
        out = []
        for te in left:
            if te.event.event_id not in self.released:
                self.released.add(te.event.event_id)
                out.append(te)
        return out


async def task_events(settings: Settings, task_id: str) -> AsyncGenerator[TaskEvent, None]:
    """The events of ``task_id`` (its correlation id) on every topic: first those already in
    the log, then new ones as they are produced, each after the event that caused it, until
    the task's ``TaskCompleted`` and every event logged before it were yielded. A task that
    never completes (or is never submitted) keeps the iterator waiting: the caller stops it.
    An event id re-produced after a crash is yielded once. Costs one consumer per topic while
    following, and a read of the whole log at the start and at the end.

    Raises:
        ValueError: no Kafka broker is resolved in ``settings``.
        LookupError: a topic does not exist (``rmo topics create``).
    """
    bootstrap = settings.require_kafka()
    registry = load_topics(settings.namespace, settings.topics_file)
    topics = [registry.name(role) for role in ROLES]
    # next offset per topic-partition, over every record read, so each read resumes there
    positions: dict[str, dict[int, int]] = {t: {} for t in topics}
    order = _CausalOrder()

    def match(topic: str, partition: int, offset: int, value: bytes | None) -> TaskEvent | None:
        positions[topic][partition] = offset + 1
        try:
            e = decode(value, max_bytes=None)
        except CodecError:
            return None
        return TaskEvent(topic, partition, offset, e) if e.correlation_id == task_id else None

    async def read_to_end(topic: str) -> list[TaskEvent]:
        found = []
        async for r in read_topic(bootstrap, topic, start=positions[topic] or None):
            if (te := match(r.topic, r.partition, r.offset, r.value)) is not None:
                found.append(te)
        return found

    async def catch_up() -> list[TaskEvent]:
        batches = await asyncio.gather(*(read_to_end(t) for t in topics))
        found = sorted((te for batch in batches for te in batch), key=lambda te: te.event.occurred_at)
        return [x for te in found for x in order.add(te)]

    def completes(te: TaskEvent) -> bool:
        return te.event.event_type == "TaskCompleted"

    finished = False
    for te in await catch_up():
        finished = finished or completes(te)
        yield te
    if not finished:
        queue: asyncio.Queue[TaskEvent | Exception] = asyncio.Queue()

        async def follow(topic: str) -> None:
            try:
                async for r in read_topic(bootstrap, topic, start=positions[topic] or None,
                                          follow=True):
                    if (te := match(r.topic, r.partition, r.offset, r.value)) is not None:
                        queue.put_nowait(te)
            except Exception as exc:  # noqa: BLE001 - handed to the iterating task
                queue.put_nowait(exc)

        pumps = [asyncio.create_task(follow(t)) for t in topics]
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                for te in order.add(item):
                    finished = finished or completes(te)
                    yield te
        finally:
            for pump in pumps:
                pump.cancel()
            # shielded: a caller cancelled again meanwhile must not interrupt the pumps
            # stopping their consumers (their connections would stay open)
            await asyncio.shield(asyncio.gather(*pumps, return_exceptions=True))
        for item in [queue.get_nowait() for _ in range(queue.qsize())]:
            for te in order.add(item) if isinstance(item, TaskEvent) else ():
                yield te
    # every event of the task was logged before its TaskCompleted, but a topic read above may
    # have finished before such an event arrived: read each topic from where it stopped
    for te in await catch_up():
        yield te
    for te in order.rest():
        yield te


class LineageNode(BaseModel):
    """The JSON form of one :class:`streams.lineage.Node`: an event of a task's causation
    tree and where it is in the log; ``payload`` (the event's payload as wire JSON) only when
    asked for; ``children``: the events it caused, in log order."""

    event_id: str
    event_type: str
    producer: str
    occurred_at: datetime
    causation_id: str | None
    topic: str
    partition: int
    offset: int
    payload: dict[str, Any] | None = None
    children: list[LineageNode] = Field(default_factory=list)

    @classmethod
    def of(cls, node: Node, payload: bool = False) -> LineageNode:
        """``node`` and its subtree, with or without payloads."""
        return cls.model_validate(node.to_dict(payload))


def _call(name: str, value: str) -> ProviderCallReport:
    provider, attempt = name.removeprefix("call:").rsplit(":", 1)
    d = orjson.loads(value)
    return ProviderCallReport(provider=provider, attempt=int(attempt), ok=d["ok"], model=d["model"],
                              error_type=d["error_type"], http_status=d["http_status"],
                              latency_ms=float(d["latency_ms"]), cost_usd=float(d["cost_usd"]),
                              tokens=int(d["tokens"]))


def _int(value: str | None) -> int | None:
    return None if value is None or value == "" else int(value)


def _float(value: str | None) -> float | None:
    return None if value is None or value == "" else float(value)


def _time(value: str | None) -> datetime | None:
    return None if not value else datetime.fromisoformat(value)


# --------------------------------------------------------------------------- providers


CHECK_PROMPT = "Reply with the single word OK."
"""What `rmo providers check` asks every provider: a tiny text task (a few tokens each way)."""
CHECK_MAX_OUTPUT_TOKENS = 16

FIXES = {
    "auth_error": "set the environment variable named by api_key_env to a valid key",
    "quota_exceeded": "the account has no credit or quota left: check its billing",
    "connection_failed": "nothing answers at the endpoint: start the server or correct base_url",
    "timeout": "no answer in time: check the endpoint, or raise timeout_s",
    "rate_limited": "rate limited: wait, or raise the account's rate limits",
    "bad_request": "the endpoint refused the request: check the entry's model name",
    "context_length_exceeded": "the model's context is too small for even a tiny prompt: "
                               "check the model name",
    "malformed_response": "the endpoint does not speak this kind's protocol: check base_url "
                          "(an OpenAI-compatible URL ends in /v1) and kind",
    "server_error": "the provider failed (5xx): retry later",
    "overloaded": "the provider is overloaded: retry later",
}
"""What to do about a failed check, by ``ProviderCallFailed.error_type``."""


@dataclass(frozen=True)
class ProviderInfo:
    """One configured provider (``rmo providers list``). Prices in USD per million tokens,
    None when genai-prices does not know the model and no override is set (``priced``
    False: its calls count as costing 0). ``endpoint``: the base URL of an HTTP kind."""

    id: str
    kind: str
    model: str
    endpoint: str | None
    priced: bool
    input_usd_per_mtok: float | None
    output_usd_per_mtok: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProviderCheck:
    """The outcome of one tiny call (``rmo providers check``): ``reachable`` (an HTTP answer
    came back), ``auth_ok`` (None when unreachable), ``latency_ms`` in ms, the ``answer`` on
    success, else ``error_type``, ``message`` and the ``fix`` to apply."""

    provider: ProviderInfo
    ok: bool
    reachable: bool
    auth_ok: bool | None
    latency_ms: float
    answer: str | None = None
    error_type: str | None = None
    message: str | None = None
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "provider": self.provider.to_dict()}


def _info(p: Provider) -> ProviderInfo:
    price = p.price_per_mtok()
    return ProviderInfo(id=p.id, kind=p.kind, model=p.model, endpoint=p.endpoint(),
                        priced=price is not None, input_usd_per_mtok=price[0] if price else None,
                        output_usd_per_mtok=price[1] if price else None)


def list_providers(providers_file: Path | None, seed: int | None = None) -> list[ProviderInfo]:
    """The providers of ``providers_file`` (None: the shipped sim profiles), in file order.

    Raises:
        agents.providers.registry.ProviderConfigError: the file or an entry is invalid.
    """
    return [_info(p) for p in load_providers(providers_file, seed=seed).values()]


async def check_providers(providers_file: Path | None, seed: int | None = None,
                          timeout_s: float = 30.0) -> list[ProviderCheck]:
    """One tiny text call per provider, all at once, each bounded by ``timeout_s`` seconds.

    Raises:
        agents.providers.registry.ProviderConfigError: the file or an entry is invalid.
    """
    providers = load_providers(providers_file, seed=seed)
    try:
        return list(await asyncio.gather(*(_check(p, timeout_s) for p in providers.values())))
    finally:
        await asyncio.gather(*(p.aclose() for p in providers.values()))


async def _check(p: Provider, timeout_s: float) -> ProviderCheck:
    request = ProviderRequest(task_id="rmo-providers-check", prompt=CHECK_PROMPT, kind="text",
                              entry_point=None, task_type="check",
                              max_output_tokens=CHECK_MAX_OUTPUT_TOKENS)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            response = await p.complete(request)
    except TimeoutError:
        err: ProviderError = ProviderTimeout(f"no answer within {timeout_s:g} s")
    except ProviderError as exc:
        err = exc
    else:
        return ProviderCheck(_info(p), ok=True, reachable=True, auth_ok=True,
                             latency_ms=round(response.latency_ms, 1),
                             answer=response.text.strip()[:200])
    unreachable = err.error_type in ("connection_failed", "timeout")
    return ProviderCheck(_info(p), ok=False, reachable=not unreachable,
                         auth_ok=None if unreachable else err.error_type != "auth_error",
                         latency_ms=round((time.perf_counter() - started) * 1000, 1),
                         error_type=err.error_type, message=str(err)[:300],
                         fix=FIXES.get(err.error_type, "see the message"))


# --------------------------------------------------------------------------- breakers


class UnknownProvider(LookupError):
    """A breaker command names a provider that is neither configured nor has a breaker."""


@dataclass(frozen=True)
class BreakerReport:
    """One provider's breaker as projected (``rmo breaker list``). ``admits``: what admission
    answers now (``allow``, ``trial``, ``reject``; agents/breaker.py); ``hold``: ``auth``,
    ``quota``, ``manual`` or "" (open for the normal, backed-off time); times are event times
    (UTC), ``open_until`` None when not open; ``window_*``: the closed state's sliding window
    (calls counted, failed and slow fractions)."""

    provider: str
    state: str
    admits: str
    reason: str
    hold: str
    failures: int
    successes: int
    trips: int
    opened_at: datetime | None
    open_until: datetime | None
    window_calls: int
    window_failure_rate: float
    window_slow_rate: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("opened_at", "open_until"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


def _breaker_report(provider: str, s: BreakerState, now_ms: int, cfg: BreakerConfig) -> BreakerReport:
    n = len(s.window)
    return BreakerReport(
        provider=provider, state=s.state, admits=admission(s, now_ms, cfg), reason=s.reason,
        hold=s.hold, failures=s.failures, successes=s.successes, trips=s.trips,
        opened_at=datetime.fromtimestamp(s.opened_at_ms / 1000, UTC) if s.opened_at_ms else None,
        open_until=datetime.fromtimestamp(s.open_until_ms / 1000, UTC) if s.state == "open" else None,
        window_calls=n,
        window_failure_rate=sum(c in "xX" for c in s.window) / n if n else 0.0,
        window_slow_rate=sum(c in "sX" for c in s.window) / n if n else 0.0)


async def breaker_list(settings: Settings) -> list[BreakerReport]:
    """Every breaker of ``settings.namespace``, by provider id. Reads Redis only; ``admits``
    uses this host's clock.

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    keys = Keys(settings.namespace)
    prefix = keys.breaker("")
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        names = sorted([k async for k in redis.scan_iter(keys.breaker("*"), count=1000)])
        pipe = redis.pipeline(transaction=False)
        for k in names:
            pipe.hgetall(k)
        hashes = await pipe.execute()
    finally:
        await redis.aclose()
    now_ms = int(time.time() * 1000)
    cfg = breaker_config(settings)
    return [_breaker_report(k[len(prefix):], BreakerState.from_hash(h), now_ms, cfg)
            for k, h in zip(names, hashes) if h]


async def breaker_command(settings: Settings, provider: str, command: Command, reason: str = "",
                          operator: str = "") -> Envelope:
    """Produce a ``BreakerCommand`` (``open``, ``close`` or ``reset``) on the calls topic, keyed
    by ``provider``; the executor.breaker consumer applies it in order with the provider's
    calls and emits its ``BreakerTransitioned``. Returns the produced event.

    Raises:
        UnknownProvider: ``provider`` is not in ``settings.providers_file`` and has no breaker.
        ValueError: no Kafka broker or Redis is resolved in ``settings``.
    """
    configured = set(load_providers(settings.providers_file, seed=settings.seed))
    if provider not in configured:
        redis = Redis.from_url(settings.require_redis(), decode_responses=True)
        try:
            known = await redis.exists(Keys(settings.namespace).breaker(provider))
        finally:
            await redis.aclose()
        if not known:
            raise UnknownProvider(f"no provider {provider!r}: configured are "
                                  f"{', '.join(sorted(configured))}")
    event = make_event(BreakerCommand(provider=provider, command=command, reason=reason,
                                      operator=operator),
                       producer="rmo.breaker", correlation_id=provider)
    topic = load_topics(settings.namespace, settings.topics_file).name("calls")
    async with EventProducer(settings.require_kafka()) as producer:
        await producer.send_events(topic, [event], key=provider)
    return event


async def budget_report(settings: Settings) -> list[BudgetUsage]:
    """Every budget line of ``settings.budgets_file`` in its current bucket: limit, spent,
    pending, reserved, remaining and reserve used (agents/budget.py). Reads Redis only;
    "current" uses this host's clock. No budgets file: an empty list.

    Raises:
        OSError, pydantic.ValidationError: the budgets file is unreadable or invalid.
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    lines = load_budgets(settings.budgets_file).budgets
    if not lines:
        return []
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        return await usage(redis, Keys(settings.namespace), lines, datetime.now(UTC))
    finally:
        await redis.aclose()


# --------------------------------------------------------------------------- submit


M = TypeVar("M", bound=BaseModel)


class InvalidTask(ValueError):
    """A task is not a valid ``TaskSubmitted``. ``where`` names it (``stdin:2``, ``tasks.jsonl:7``,
    ``body[0]``), ``problem`` says what is wrong, naming the field(s) as spelled on the wire;
    the message is ``"{where}: {problem}"``, one line."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class TaskTooLarge(InvalidTask):
    """A task whose event would exceed :data:`models.codec.MAX_VALUE_BYTES` (1,000,000 bytes,
    Kafka's default ``max.message.bytes``): the stages would dead-letter it unread."""


def task_event(task: TaskSubmitted, where: str, producer: str) -> Envelope:
    """The ``TaskSubmitted`` event of ``task`` (a new random event id, produced by ``producer``).

    Raises:
        TaskTooLarge: the event encodes to more than :data:`models.codec.MAX_VALUE_BYTES`.
        InvalidTask: the task holds a value JSON on the wire cannot carry (an integer beyond
            64 bits, which Python's own JSON parser accepts; orjson, the codec, does not).
    """
    event = make_event(task, producer=producer)
    try:
        size = len(encode(event))
    except orjson.JSONEncodeError as exc:
        raise InvalidTask(where, f"not encodable as an event: {exc}") from None
    if size > MAX_VALUE_BYTES:
        raise TaskTooLarge(where, f"task {task.task_id!r} is {size:,} bytes as an event, over the "
                                  f"{MAX_VALUE_BYTES:,}-byte record limit (larger records are "
                                  "dead-lettered); shorten its prompt or test")
    return event


def parse_tasks(lines: Iterable[str], source: str, producer: str = "cli.submit") -> list[Envelope]:
    """JSONL task lines (one JSON object each; blank lines skipped) -> TaskSubmitted events,
    every line checked before any event is returned. ``source`` names the input in errors
    (``{source}:{line number}``).

    Raises:
        InvalidTask: a line is not JSON, not an object or not a valid task (the problem names
            the field and what is allowed, at most 5 problems).
        TaskTooLarge: a line's event would exceed the record limit.
    """
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        events.append(task_event(parse_object(line, where, TaskSubmitted), where, producer))
    return events


def parse_object(text: str, where: str, model: type[M], error: type[InvalidTask] = InvalidTask) -> M:
    """``text``, one JSON object, as ``model``.

    Raises:
        ``error`` (``where``, the problem): not JSON, not an object, or not a valid ``model``
            (the problem names the field and what is allowed, at most 5 problems).
    """
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise error(where, f"not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise error(where, f"a JSON {type(raw).__name__}, not an object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(where, describe_validation(exc, limit=5)) from None


async def create_topics(settings: Settings) -> list[str]:
    """Create the namespace's topics of topics.yaml that do not exist yet (idempotent) and
    return their names; a new tasks topic clears the namespace's Redis state left from another
    log, with a warning (streams.pipeline.prepare_log).

    Raises:
        ValueError: no Kafka broker or Redis is resolved in ``settings``.
        aiokafka.errors.KafkaError, redis.exceptions.ConnectionError: a service is unreachable.
    """
    from streams.pipeline import prepare_log  # the stages: see replay()

    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        return await prepare_log(settings, load_topics(settings.namespace, settings.topics_file),
                                 redis)
    finally:
        await redis.aclose()


@dataclass(frozen=True)
class SubmittedTask:
    """One produced ``TaskSubmitted``: the task id, its event id, and where the broker
    acknowledged it (topic, partition, offset)."""

    task_id: str
    event_id: str
    topic: str
    partition: int
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def submit_tasks(settings: Settings, events: Sequence[Envelope]) -> list[SubmittedTask]:
    """Create the namespace's topics if missing (:func:`create_topics`), then produce
    ``events`` (TaskSubmitted, from :func:`parse_tasks` or :func:`task_event`) to the tasks
    topic, keyed by task id, and wait for every acknowledgement. Returns them in input order.

    Raises:
        ValueError: no Kafka broker or Redis is resolved in ``settings``.
        aiokafka.errors.KafkaError, redis.exceptions.ConnectionError: a service is unreachable.
    """
    registry = load_topics(settings.namespace, settings.topics_file)
    await create_topics(settings)
    async with EventProducer(settings.require_kafka()) as producer:
        acks = await producer.send_events(registry.name("tasks"), events)
    return [SubmittedTask(task_id=e.payload.task_id, event_id=e.event_id, topic=md.topic,
                          partition=md.partition, offset=md.offset) for e, md in zip(events, acks)]


# --------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class ReplayResult:
    """What a replay rebuilt (``rmo replay``): events applied in all and per consumer, in how
    many seconds (3 decimals) and events/s (1 decimal); with verify, ``verified`` and one
    line per differing key (``differences``), both None without verify."""

    source_namespace: str
    target_namespace: str
    events: int
    seconds: float
    events_per_s: float
    per_consumer: dict[str, int]
    verified: bool | None
    differences: list[str] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay_target(settings: Settings) -> str:
    """A fresh namespace name for a replay of ``settings.namespace``:
    ``{namespace}-replay-{UTC time, to the second}-{4 random hex}`` (the random part keeps two
    replays started in the same second apart)."""
    return f"{settings.namespace}-replay-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"


async def replay(settings: Settings, *, from_offset: int | None = None,
                 from_time: datetime | None = None, target: str | None = None,
                 verify: bool = False) -> ReplayResult:
    """Rebuild every projection of ``settings.namespace`` from the log into the empty
    namespace ``target`` (default :func:`replay_target`), which is kept for inspection; with
    ``verify`` compare it key by key with the live namespace (streams/replay.py).

    ``from_offset`` starts every partition there; ``from_time`` skips events that occurred
    before it (a time without a zone is UTC).

    Raises:
        streams.replay.ReplayTargetError: ``target`` already holds keys.
        agents.providers.registry.ProviderConfigError: the providers file is invalid.
        ValueError: no Kafka broker or Redis is resolved in ``settings``.
    """
    # the stages' modules take about a second to import: only commands that replay pay it
    from agents.providers.registry import load_providers
    from streams import replay as replaying
    from streams.pipeline import build_consumers

    if from_time is not None and from_time.tzinfo is None:
        from_time = from_time.replace(tzinfo=UTC)
    target = target or replay_target(settings)
    consumers = build_consumers(settings, load_providers(settings.providers_file, seed=settings.seed))
    registry = load_topics(settings.namespace, settings.topics_file)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        report = await replaying.replay(settings, registry, consumers, redis, target,
                                        from_offset=from_offset, from_time=from_time)
        if verify:
            report.differences = await replaying.verify(redis, Keys(settings.namespace),
                                                        Keys(target))
    finally:
        await redis.aclose()
    return ReplayResult(**report.to_dict())


class ReexecutionFailed(RuntimeError):
    """A stage raised while re-running the task (``"{task_id}: {stage} failed: {error}"``)."""


async def reexecute(settings: Settings, task_id: str) -> Reexecution:
    """Re-run ``task_id`` through analyzer, executor and validator, answered by the ``replay``
    provider from its recorded calls (streams/reexecute.py); nothing is published.

    Returns the original and the new outcome, the calls replayed and new, and the new events.

    Raises:
        streams.reexecute.NothingToReexecute: the log has no submission or routing decision
            for the task.
        ReexecutionFailed: a stage raised on the task.
        agents.sandbox.SandboxUnavailable: ``RMO_SANDBOX`` asks for a sandbox this machine lacks.
        ValueError: no Kafka broker or Redis is resolved in ``settings``.
    """
    from streams import reexecute as reexecution  # the stages: see replay()

    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        return await reexecution.reexecute(
            settings, load_topics(settings.namespace, settings.topics_file), redis, task_id)
    except RuntimeError as exc:
        # streams/reexecute.py raises a plain RuntimeError when a stage fails on the task
        # (the same failure dead-lettered it live); subclasses are other errors
        if type(exc) is not RuntimeError:
            raise
        raise ReexecutionFailed(f"{task_id}: {exc}") from exc
    finally:
        await redis.aclose()


# --------------------------------------------------------------------------- dead letters


class DeadLetterNotFound(LookupError):
    """No dead letter has the given event id."""


async def dead_letters(settings: Settings) -> list[Envelope]:
    """Every ``DeadLettered`` event on the deadletter topic, in log order (payload: reason,
    error type, stage, source topic/partition/offset, original key and value in base64).

    Raises:
        ValueError: no Kafka broker is resolved in ``settings``.
    """
    topic = load_topics(settings.namespace, settings.topics_file).name("deadletter")
    return [decode(r.value, max_bytes=None) async for r in read_topic(settings.require_kafka(), topic)]


@dataclass(frozen=True)
class Resubmitted:
    """A dead letter's record produced again: where the broker acknowledged it, and
    ``event_id``, the id of the copy when the record was an event (None: the original bytes,
    which were not an event, went back as they were)."""

    dead_letter_id: str
    topic: str
    partition: int
    offset: int
    event_id: str | None = None


RETRY_PRODUCER = "deadletter.retry"


async def retry_dead_letter(settings: Settings, dead_letter_id: str) -> Resubmitted:
    """Produce dead letter ``dead_letter_id``'s record (its event id) to its source topic
    again, after fixing what made it fail, with its original key.

    A record that was not an event (not JSON, not an envelope, a failed schema) goes back
    byte for byte. An event that a stage raised on goes back as a copy with an id of its own
    (``derive_event_id(dead_letter_id, "deadletter.retry")``, caused by the dead letter, time
    now): the consumer recorded the original id as applied (streams/stage.py step 3), so an
    identical copy would be dropped unseen. The derived id makes retrying the same dead letter
    twice idempotent; a copy that fails again is a new dead letter, retried by its own id.

    Raises:
        DeadLetterNotFound: no dead letter has that id.
        ValueError: no Kafka broker is resolved in ``settings``.
    """
    match = [e for e in await dead_letters(settings) if e.event_id == dead_letter_id]
    if not match:
        raise DeadLetterNotFound(f"no dead letter {dead_letter_id!r}")
    p = match[-1].payload
    value = base64.b64decode(p.original_value_b64)
    copy_id = None
    if not p.original_truncated:
        try:
            original = decode(value, max_bytes=None)
        except CodecError:
            original = None  # never had an event id: no consumer can have recorded one
        if original is not None:
            copy_id = derive_event_id(dead_letter_id, RETRY_PRODUCER)
            value = encode(original.model_copy(update={
                "event_id": copy_id, "causation_id": dead_letter_id, "occurred_at": utcnow()}))
    async with EventProducer(settings.require_kafka()) as producer:
        fut = await producer.send(p.source_topic,
                                  base64.b64decode(p.original_key_b64) if p.original_key_b64 else None,
                                  value)
        md = await fut
    return Resubmitted(dead_letter_id=dead_letter_id, topic=md.topic, partition=md.partition,
                       offset=md.offset, event_id=copy_id)


# --------------------------------------------------------------------------- report


async def report(settings: Settings, since: datetime | None = None,
                 budgets_file: Path | None = None) -> Report:
    """The self-contained HTML report of ``settings.namespace``'s log (``rmo report``, ``GET
    /report``; streams/report.py): summary, providers, learning, breakers, budgets, stage
    latencies, dead letters, stalls. ``since``: only events at or after it; budget limits
    from ``budgets_file``, else ``settings.budgets_file``.

    Raises:
        LookupError: a topic does not exist.
        TimeoutError: the broker reports no high watermark.
        OSError, ValueError: the budgets file cannot be read or is invalid.
        ValueError: no Kafka broker is resolved in ``settings``.
    """
    from streams.report import build_report  # matplotlib: only the commands that draw load it

    return await build_report(settings, load_topics(settings.namespace, settings.topics_file),
                              since=since, budgets_file=budgets_file)


# --------------------------------------------------------------------------- metrics, health


async def live_workers(settings: Settings) -> list[Heartbeat]:
    """The heartbeats of the workers running in ``settings.namespace``, oldest first
    (streams/liveness.py; a heartbeat left by a killed worker of this host is dropped).

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        return await liveness.live_workers(redis, Keys(settings.namespace))
    finally:
        await redis.aclose()


async def metrics_snapshots(settings: Settings, follow: bool = False) -> AsyncIterator[Envelope]:
    """The ``MetricsSnapshot`` events of the metrics topic in log order (a worker publishes one
    every ``metrics_interval_s``, 5 s); with ``follow``, then new ones as they arrive, forever.

    Raises:
        ValueError: no Kafka broker is resolved in ``settings``.
    """
    topic = load_topics(settings.namespace, settings.topics_file).name("metrics")
    async for r in read_topic(settings.require_kafka(), topic, follow=follow):
        yield decode(r.value, max_bytes=None)


@dataclass(frozen=True)
class PolicyEntry:
    """What routing has learned for one state: the greedy action and its Q-value."""

    state: str
    action: str
    q: float


@dataclass(frozen=True)
class MetricsSummary:
    """The namespace's figures now, read from the projections (``GET /metrics/summary``).

    ``tasks``: completed tasks per final status; ``completed`` their sum; ``pass_rate``:
    passed / completed (0.0 when none); ``events``: events projected per event type;
    ``cost_usd`` (USD) and ``tokens``: of every completed task; ``providers``: per provider
    (streams/metrics.py: calls, failures, pass rate, p50/p95 latency in ms, cost in USD,
    breaker state, trips); ``q_updates``: rewards applied to the Q-table; ``policy``: the
    greedy action per state; ``workers``: live workers.
    """

    namespace: str
    completed: int
    tasks: dict[str, int]
    pass_rate: float
    cost_usd: float
    tokens: int
    events: dict[str, int]
    providers: list[ProviderSummary]
    q_updates: int
    policy: list[PolicyEntry]
    workers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def metrics_summary(settings: Settings) -> MetricsSummary:
    """Counters, per-provider figures, the learned policy and live workers of
    ``settings.namespace``. Reads Redis only.

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    keys = Keys(settings.namespace)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        counters = {k: int(v) for k, v in (await redis.hgetall(keys.counters)).items()}
        providers = await provider_summaries(redis, keys)
        # the configured policy, for what it learned (a provider:ID policy learns nothing)
        name = settings.policy
        shown = make_policy(name, [name.removeprefix("provider:")] if name.startswith("provider:") else [],
                            settings)
        policy = await learned_policy(redis, keys, shown)
        updates = int(float(await redis.hget(keys.qmeta, "updates") or 0))
        workers = await liveness.live_workers(redis, keys)
    finally:
        await redis.aclose()
    tasks = {k.removeprefix("tasks:"): v for k, v in sorted(counters.items()) if k.startswith("tasks:")}
    completed = sum(tasks.values())
    return MetricsSummary(
        namespace=settings.namespace, completed=completed, tasks=tasks,
        pass_rate=tasks.get("passed", 0) / completed if completed else 0.0,
        cost_usd=counters.get("cost_microusd", 0) / MICRO, tokens=counters.get("tokens", 0),
        events={k.removeprefix("events:"): v for k, v in sorted(counters.items())
                if k.startswith("events:")},
        providers=list(providers.values()),
        q_updates=updates,
        policy=[PolicyEntry(state=s, action=a, q=q) for s, (a, q) in policy.items()],
        workers=len(workers))


HEALTH_KAFKA_TIMEOUT_S = 2.0
"""Seconds the broker has to answer a metadata request in :func:`health`."""
HEALTH_REDIS_TIMEOUT_S = 1.0
"""Seconds Redis has to answer PING in :func:`health`."""


@dataclass(frozen=True)
class DependencyHealth:
    """One service a front-end depends on: its address (a password shown as ``***``), whether
    it answered, and why not."""

    address: str | None
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Health:
    """Whether the pipeline can take work now: the broker answers metadata, Redis answers PING,
    and at least one worker is alive in the namespace (``workers``: their heartbeats, empty
    when Redis is down). ``problems``: one line per failed condition; ``ok`` when none."""

    ok: bool
    namespace: str
    kafka: DependencyHealth
    redis: DependencyHealth
    workers: list[Heartbeat]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def health(settings: Settings) -> Health:
    """Probe the broker (:data:`HEALTH_KAFKA_TIMEOUT_S`), Redis (:data:`HEALTH_REDIS_TIMEOUT_S`)
    and the workers' heartbeats; never raises for an unreachable service: it is reported."""
    problems = []
    bootstrap, url = settings.kafka_bootstrap_servers, settings.redis_url
    # the probe blocks (its own loop in a thread): keep this loop serving meanwhile
    kafka_ok = bool(bootstrap) and await asyncio.to_thread(
        kafka_reachable, bootstrap, HEALTH_KAFKA_TIMEOUT_S)
    kafka = DependencyHealth(address=bootstrap, ok=kafka_ok, error=None if kafka_ok else (
        f"no Kafka metadata within {HEALTH_KAFKA_TIMEOUT_S:g} s" if bootstrap else "no broker resolved"))
    if not kafka_ok:
        problems.append(f"kafka {bootstrap or '-'}: {kafka.error}")
    workers: list[Heartbeat] = []
    redis_error = None if url else "no Redis resolved"
    if url:
        client = Redis.from_url(url, decode_responses=True, socket_timeout=HEALTH_REDIS_TIMEOUT_S,
                                socket_connect_timeout=HEALTH_REDIS_TIMEOUT_S)
        try:
            await client.ping()
            workers = await liveness.live_workers(client, Keys(settings.namespace))
        except (RedisError, OSError) as exc:
            redis_error = f"no PING reply within {HEALTH_REDIS_TIMEOUT_S:g} s ({type(exc).__name__})"
        finally:
            await client.aclose()
    shown = redact(url) if url else None
    redis = DependencyHealth(address=shown, ok=redis_error is None, error=redis_error)
    if redis_error:
        problems.append(f"redis {shown or '-'}: {redis_error}")
    elif not workers:
        problems.append(f"no worker is running in namespace {settings.namespace} "
                        "(start one: `rmo worker`)")
    return Health(ok=not problems, namespace=settings.namespace, kafka=kafka, redis=redis,
                  workers=workers, problems=problems)


# --------------------------------------------------------------------------- policy evaluation


async def evaluate_policy(settings: Settings, policy: str | None = None, *,
                          policy_file: Path | None = None, from_offset: int | None = None,
                          from_time: datetime | None = None,
                          n_bootstrap: int = ope.DEFAULT_BOOTSTRAP,
                          alpha: float = ope.DEFAULT_ALPHA, seed: int = 0) -> PolicyEstimate:
    """Estimate the pass rate and cost per task (USD) a target policy would have had on
    ``settings.namespace``'s logged traffic (``rmo evaluate-policy``): IPS, SNIPS and doubly
    robust estimates with percentile bootstrap intervals (``n_bootstrap`` resamples,
    ``1 - alpha`` level, ``seed``), the effective sample size, warnings, and the logged
    policy's measured figures (streams/policy_eval.py, agents/ope.py).

    The target is ``policy`` (a name of agents/target_policies.py: ``provider:ID``,
    ``random``, ``greedy``, ``logged``) or ``policy_file`` (a YAML task-type routing), exactly
    one of them. ``from_offset`` starts every decisions partition at that offset;
    ``from_time`` keeps the decisions that occurred at or after it. Reads Kafka only.

    Raises:
        agents.target_policies.UnknownPolicy: an unknown name or an invalid policy file.
        streams.policy_eval.NoDecisions: no ``ProviderSelected`` in the range read.
        streams.policy_eval.NothingToEvaluate: no decision has an outcome yet, or the target
            can act in none of the logged rounds.
        ValueError: neither or both of ``policy`` and ``policy_file``; no Kafka broker resolved.
        LookupError: the decisions or rewards topic does not exist.
    """
    if (policy is None) == (policy_file is None):
        raise ValueError("give exactly one of a policy name and a policy file")
    target = (target_policies.load_policy_file(policy_file) if policy_file is not None
              else target_policies.resolve(policy or ""))
    registry = load_topics(settings.namespace, settings.topics_file)
    log = await policy_eval.read_log(settings, registry, from_offset=from_offset,
                                     from_time=from_time)
    if not log.decisions:
        since = (f" from offset {from_offset}" if from_offset is not None else
                 f" since {from_time.isoformat()}" if from_time is not None else "")
        raise NoDecisions(f"namespace {settings.namespace}: no routing decision (ProviderSelected) "
                          f"in {registry.name('decisions')}{since}")
    estimate = policy_eval.estimate(settings.namespace, log, target, n_bootstrap=n_bootstrap,
                                    alpha=alpha, seed=seed)
    return replace(estimate, from_offset=from_offset, from_time=from_time)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class PatternReport:
    """One error pattern (agents/patterns.py). ``key`` is
    ``category|error_type|task_type|complexity|provider`` (``*``: any), its parts repeated;
    ``occurrences``: distinct tasks that failed this way, ``events``: ErrorLogged events;
    ``opportunities`` and ``confidence`` (0-1) as of now; ``first_seen`` / ``last_seen``: event
    times; ``detected_confidence``: the confidence its PatternDetected carried (None: not
    detected)."""

    key: str
    category: str
    error_type: str
    task_type: str
    complexity: str
    provider: str
    occurrences: int
    events: int
    opportunities: int
    confidence: float
    first_seen: datetime | None
    last_seen: datetime | None
    detected_confidence: float | None


@dataclass(frozen=True)
class RuleStageReport:
    """One transition of a rule: ``stage`` (proposed, applied, rejected, rolled_back), its
    event time, the reason, and the evidence figures (:class:`models.events.RuleEvidence`,
    only those set)."""

    stage: str
    at: datetime
    reason: str
    evidence: dict[str, Any]


@dataclass(frozen=True)
class RuleReport:
    """One protocol rule (agents/rules.py): id, kind, params, the pattern that proposed it,
    its ``state``, every stage it went through in order and, while applied, ``measured``: the
    before/after figures as of now (counts of tasks, ``measured_effect`` = before rate -
    after rate)."""

    id: str
    kind: str
    params: dict[str, str | float]
    pattern: str
    state: str
    stages: list[RuleStageReport]
    measured: dict[str, Any] | None = None


@dataclass(frozen=True)
class RulesReport:
    """``rmo rules``: error patterns (most occurrences first) and protocol rules (by id)."""

    patterns: list[PatternReport]
    rules: list[RuleReport]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: numbers as numbers, times as RFC 3339 strings, absent values null."""
        def plain(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value
        return plain(asdict(self))

    def render(self, detected_only: bool = False) -> list[str]:
        """The plain-text form: one line per pattern (with ``detected_only``, only those that
        were detected); per rule a line, then its stages."""
        shown = [p for p in self.patterns if p.detected_confidence is not None or not detected_only]
        lines = [f"patterns ({len(shown)}{' detected' if detected_only else ''}):"]
        for p in shown:
            where = ", ".join(f"{n}={v}" for n, v in (("error_type", p.error_type),
                                                      ("task_type", p.task_type),
                                                      ("complexity", p.complexity),
                                                      ("provider", p.provider)) if v != "*")
            seen = (f", seen {p.first_seen:%H:%M:%S}-{p.last_seen:%H:%M:%S}Z"
                    if p.first_seen and p.last_seen else "")
            detected = (f", detected at confidence {p.detected_confidence:.2f}"
                        if p.detected_confidence is not None else "")
            lines.append(f"  {p.category} {where}: {p.occurrences} of {p.opportunities} tasks "
                         f"(confidence {p.confidence:.2f}), {p.events} errors{seen}{detected}")
        lines.append(f"rules ({len(self.rules)}):")
        for r in self.rules:
            params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.params.items())
            lines.append(f"  {r.id}: {r.state} ({r.kind} {params}; pattern {r.pattern})")
            for s in r.stages:
                lines.append(f"    {s.stage} {s.at:%Y-%m-%d %H:%M:%S}Z: {s.reason}")
                if s.evidence:
                    lines.append("      evidence: " + _figures(s.evidence))
            if r.measured:
                lines.append("    measured now: " + _figures(r.measured))
        return lines


def _figures(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


async def rules_report(settings: Settings) -> RulesReport:
    """Every error pattern and protocol rule of ``settings.namespace`` (the projections of
    agents/patterns.py, agents/rules.py and agents/outcomes.py). Reads Redis only.

    Raises:
        ValueError: no Redis URL is resolved in ``settings``.
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    from agents.patterns import (
        PatternCounts,
        PatternKey,
        confidence,
        detected_payload,
        occurrences,
        to_time,
    )
    from agents.rules import RuleState, measure

    keys = Keys(settings.namespace)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        patterns = sorted(await redis.smembers(keys.error_patterns))
        rule_ids = sorted(await redis.smembers(keys.rules))
        pipe = redis.pipeline(transaction=False)
        pipe.hgetall(keys.detected)
        for p in patterns:
            pipe.hgetall(keys.error_pattern(p))
        for r in rule_ids:
            pipe.hgetall(keys.rule(r))
        detected_h, *rest = await pipe.execute()
        found, outcomes = await occurrences(redis, keys, patterns)
    finally:
        await redis.aclose()
    reports = []
    for p, h in zip(patterns, rest):
        key, counts = PatternKey.parse(p), PatternCounts.from_hash(h)
        opportunities = key.opportunities(outcomes)
        detected = detected_payload(detected_h[p]) if p in detected_h else None
        reports.append(PatternReport(
            key=p, category=key.category, error_type=key.error_type, task_type=key.task_type,
            complexity=key.complexity, provider=key.provider, occurrences=found[p],
            events=counts.events, opportunities=opportunities,
            confidence=round(confidence(found[p], opportunities), 4),
            first_seen=to_time(counts.first_seen_ms), last_seen=to_time(counts.last_seen_ms),
            detected_confidence=round(detected.confidence, 4) if detected else None))
    reports.sort(key=lambda r: (-r.occurrences, r.key))
    rules = []
    for rule_id, h in zip(rule_ids, rest[len(patterns):]):
        if not h:
            continue
        s = RuleState.from_hash(rule_id, h)
        stages = sorted((RuleStageReport(stage, datetime.fromisoformat(at), reason,
                                         ev.model_dump(exclude_none=True))
                         for stage, (at, reason, ev) in s.stages.items()), key=lambda x: x.at)
        measured = (measure(s.rule, s.applied, outcomes).evidence.model_dump(exclude_none=True)
                    if s.state == "applied" else None)
        rules.append(RuleReport(id=rule_id, kind=s.rule.kind, params=dict(s.rule.params),
                                pattern=s.pattern, state=s.state, stages=stages, measured=measured))
    return RulesReport(reports, rules)
