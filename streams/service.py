"""The user operations, one typed function each (SPEC §6 "One operation, three front-ends").

The CLI (and later the HTTP API and the MCP server) only parse input, call these functions and
render what they return, so the front-ends cannot disagree. Results are dataclasses with
typed fields; ``to_dict()`` gives their JSON form, numbers as numbers and booleans as booleans.

Operations here so far: :func:`task_report` (``rmo status``), :func:`task_lineage`
(``rmo lineage``), :func:`list_providers` and :func:`check_providers` (``rmo providers``),
:func:`breaker_list` and :func:`breaker_command` (``rmo breaker``), :func:`budget_report`
(``rmo budget``), :func:`evaluate_policy` (``rmo evaluate-policy``), :func:`rules_report`
(``rmo rules``). Submit, replay, dead letters and metrics still live in streams/cli.py.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from agents import ope, target_policies
from agents.breaker import BreakerConfig, BreakerState, Command, admission
from agents.budget import BudgetUsage, load_budgets, usage
from agents.executor import breaker_config
from agents.providers.base import Provider, ProviderError, ProviderRequest, ProviderTimeout
from agents.providers.registry import load_providers
from agents.providers.sim import STUB_BODY
from models.codec import make_event
from models.events import BreakerCommand, Envelope
from streams import policy_eval
from streams.client import EventProducer
from streams.config import Settings
from streams.keys import Keys
from streams.lineage import Node, lineage
from streams.policy_eval import NoDecisions, PolicyEstimate
from streams.projections import task_status
from streams.topics import load_topics

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
