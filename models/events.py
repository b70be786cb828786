"""The wire contract (SPEC §3): the envelope and every event type, as frozen pydantic v2 models.

Every Kafka record value is one JSON object, the envelope. Each event type is a subclass of
:class:`Envelope` whose ``event_type`` is a literal and whose ``payload`` is the type's payload
model, so a single discriminated union (:data:`AnyEvent`) decodes any record and
``rmo schema`` exports a JSON Schema per type for producers in other languages.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from jsonschema import Draft202012Validator, SchemaError
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1


class Frozen(BaseModel):
    """Base of every wire model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- payloads


TaskKind = Literal["code", "json", "text"]
"""What a task asks for, and so how the validator checks the answer (SPEC §3, §4)."""

_WIRE_ALIASES = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True,
                           validate_by_name=True, validate_by_alias=True)
"""Config of the models with a wire alias: ``json_schema`` is ``"schema"`` on the wire (a
pydantic model cannot have a field named ``schema``: it shadows ``BaseModel.schema``), read
under either name, always written as ``"schema"``."""

_SCHEMA_DOC = ("json tasks: the JSON Schema (Draft 2020-12) the answer must satisfy; "
               "required for kind json")
_EXPECTED_DOC = ("json tasks: an object of field values the answer must have (keys are field "
                 "names or dotted paths such as 'address.city' or 'items.0.id'; compared as "
                 "JSON values); text tasks: the answer, compared after whitespace normalisation")
_MUST_MATCH_DOC = "text tasks: a Python regular expression the answer must contain a match of"
_MUST_CONTAIN_DOC = ("text tasks: substrings the answer must contain (compared after "
                     "whitespace normalisation)")


_SCHEMA_CHECKS: dict[bytes, str | None] = {}
"""sha256 of a schema's canonical JSON -> :func:`_schema_problem`'s verdict. Every stage
that decodes a task re-validates its schema (about 1 ms each), so verdicts are kept; the
map is emptied when it reaches :data:`_SCHEMA_CHECKS_MAX` entries (digests, never schemas,
so its memory stays bounded whatever the schemas' size)."""
_SCHEMA_CHECKS_MAX = 4096


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a valid Draft 2020-12 JSON Schema (naming where in it), or None."""
    try:
        canonical = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # only Python callers can pass non-JSON values
        return f"not a JSON document: {exc}"
    digest = hashlib.sha256(canonical).digest()
    if digest in _SCHEMA_CHECKS:
        return _SCHEMA_CHECKS[digest]
    try:
        Draft202012Validator.check_schema(schema)
        problem = None
    except SchemaError as exc:
        where = exc.json_path.removeprefix("$") or " (its root)"
        problem = f"not a valid JSON Schema (Draft 2020-12): at schema{where}: {exc.message}"[:500]
    except RecursionError:
        problem = "not a valid JSON Schema: nested too deeply to check"
    if len(_SCHEMA_CHECKS) >= _SCHEMA_CHECKS_MAX:
        _SCHEMA_CHECKS.clear()
    _SCHEMA_CHECKS[digest] = problem
    return problem


def _kind_problems(task: TaskSubmitted) -> list[str]:
    """What ``task`` lacks for its kind or carries in vain, one message per field, each
    naming the field as it is spelled on the wire (``"field 'schema': required for kind
    json"``); empty when the task is consistent. Fields another kind would use are refused
    rather than ignored, so a producer never believes a check ran that did not."""
    kind = task.kind
    problems = []
    if kind == "code" and task.test is not None and not task.entry_point:
        problems.append("field 'entry_point': required for kind code with a test "
                        "(the function check(candidate) receives)")
    if kind == "json":
        if task.json_schema is None:
            problems.append("field 'schema': required for kind json")
        elif problem := _schema_problem(task.json_schema):
            problems.append(f"field 'schema': {problem}")
        if task.expected is not None and not isinstance(task.expected, dict):
            problems.append("field 'expected': for kind json an object of field values, "
                            f"got {type(task.expected).__name__}")
    elif task.json_schema is not None:
        problems.append(f"field 'schema': only for kind json (kind is {kind})")
    if kind == "text":
        if task.expected is not None and not isinstance(task.expected, str):
            problems.append("field 'expected': for kind text a string, "
                            f"got {type(task.expected).__name__}")
        if task.must_match is not None:
            try:
                re.compile(task.must_match)
            except (re.error, RecursionError, OverflowError) as exc:
                problems.append(f"field 'must_match': not a valid regular expression: {exc}")
    else:
        if kind == "code" and task.expected is not None:
            problems.append("field 'expected': only for kinds json and text (kind is code)")
        for name, value in (("must_match", task.must_match), ("must_contain", task.must_contain)):
            if value is not None:
                problems.append(f"field '{name}': only for kind text (kind is {kind})")
    return problems


_KIND_IS = {k: {"properties": {"kind": {"const": k}}, "required": ["kind"]}
            for k in ("code", "json", "text")}


DOMAIN = r"^[A-Za-z0-9_.-]{1,64}$"
"""A job master's domain: it qualifies routing state and statistics keys, whose fields are
joined with tabs and ``|`` (agents/qlearning.py, agents/policy/bandit.py), so neither may
appear in it."""


class JobRef(Frozen):
    """The job a task is a subtask of (agents/cortex): set by the coordinator on the
    subtasks it submits and carried on to ``TaskExecuted``, so the validator reports the
    verdict to the job (``SubtaskCompleted``) and the executor routes by the domain master's
    own rows. ``avoid_providers``: providers the executor must not route this task to (a
    re-planned job asks another provider than the one whose plan failed)."""

    job_id: str = Field(min_length=1, max_length=128)
    subtask_id: str = Field(min_length=1, max_length=64)
    domain: str = Field(pattern=DOMAIN)
    avoid_providers: list[str] = Field(default_factory=list)


class TaskSubmitted(Frozen):
    """A task enters the pipeline (SPEC §3). What it carries depends on ``kind``:

    - ``code``: ``prompt`` is a Python module prefix (signature + docstring); ``test`` is
      HumanEval-style source defining ``check(candidate)``, run on ``entry_point``.
    - ``json``: the answer must be one JSON document satisfying ``schema`` (wire name of
      ``json_schema``; a Draft 2020-12 JSON Schema, required) and, if given, having the
      ``expected`` field values.
    - ``text``: the answer is checked by ``expected`` (equal after whitespace
      normalisation), ``must_match`` (a regex found in it) and ``must_contain`` (substrings),
      all the given ones; with none of them the task completes ``unverified``.

    ``max_cost_usd`` (USD, SPEC §3) and ``budget_tokens`` cap what all the task's provider
    calls may cost (agents/budget.py: the executor reserves each call's worst case on them).
    A task whose fields do not fit its kind fails validation with a message naming the
    field, so the stages dead-letter it with that reason.
    """

    model_config = _WIRE_ALIASES | ConfigDict(json_schema_extra={"allOf": [
        # what _kind_problems enforces, stated for producers in other languages (`rmo schema`,
        # the HTTP API's OpenAPI document); only "schema must itself be a valid JSON Schema"
        # is checked by the model alone
        {"if": _KIND_IS["json"],
         "then": {"required": ["schema"],
                  "properties": {"schema": {"type": "object"},
                                 "expected": {"type": ["object", "null"]}}},
         "else": {"properties": {"schema": {"type": "null"}}}},
        {"if": _KIND_IS["text"],
         "then": {"properties": {"expected": {"type": ["string", "null"]},
                                 "must_match": {"format": "regex"}}},
         "else": {"properties": {"must_match": {"type": "null"},
                                 "must_contain": {"type": "null"}}}},
        {"if": _KIND_IS["code"],
         "then": {"properties": {"expected": {"type": "null"}}}},
        {"if": {"properties": {"kind": {"const": "code"}, "test": {"type": "string"}},
                "required": ["kind", "test"]},
         "then": {"required": ["entry_point"],
                  "properties": {"entry_point": {"type": "string", "minLength": 1}}}},
    ]})

    task_id: str = Field(min_length=1, max_length=256)
    kind: TaskKind
    prompt: str
    entry_point: str | None = None
    test: str | None = None
    priority: int = Field(default=3, ge=1, le=10)  # SPEC §3: 1-10
    budget_tokens: int | None = Field(default=None, ge=1, le=10**12)  # a 64-bit field on the wire
    metadata: dict[str, Any] = Field(default_factory=dict)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema",
                                               description=_SCHEMA_DOC)
    expected: Any = Field(default=None, description=_EXPECTED_DOC)
    must_match: str | None = Field(default=None, description=_MUST_MATCH_DOC)
    must_contain: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, description=_MUST_CONTAIN_DOC)
    # bounded: a cap in the 1e308s overflowed the budget's integer micro-USD (found by fuzzing)
    max_cost_usd: float | None = Field(default=None, ge=0, le=1e9, description="spending cap in USD")
    job: JobRef | None = Field(default=None, description="set on a job's subtasks by its coordinator")

    @model_validator(mode="after")
    def _fits_kind(self) -> TaskSubmitted:
        problems = _kind_problems(self)
        if problems:
            # a model-level error has no field location: the message itself names the fields
            raise ValueError("; ".join(problems))
        return self


class AnalyzerResult(Frozen):
    """One specialist's view of a task (Fractal-RMO analyzer swarm protocol)."""

    name: str
    confidence: float = Field(ge=0.0, le=1.0)
    issues: list[str] = Field(default_factory=list)
    recommendations: list[str] = Field(default_factory=list)
    action_items: list[str] = Field(default_factory=list)
    features: dict[str, Any] = Field(default_factory=dict)


class TaskFeatures(Frozen):
    """Routing features merged from the analyzers: they form part of the Q-learning state."""

    task_type: str
    complexity: Literal["low", "medium", "high"]


class TaskAnalyzed(Frozen):
    """The swarm's merged analysis. ``task`` carries the submitted task on (event-carried
    state transfer), so later stages need no lookup."""

    task_id: str
    analyses: list[AnalyzerResult]
    features: TaskFeatures
    action_items: list[str]
    task: TaskSubmitted | None = None


class ProviderSelected(Frozen):
    """The routing decision with its propensities (for offline policy evaluation)."""

    task_id: str
    state: str
    action: str
    providers: list[str]
    strategy: str
    policy: str
    epsilon: float
    explored: bool
    action_probabilities: dict[str, float]
    q_values: dict[str, float]
    skipped_open: list[str] = Field(default_factory=list)
    features: dict[str, str] = Field(default_factory=dict)
    """The analyzer's features the decision saw (``task_type``, ``complexity``): the
    context of offline policy evaluation."""


class FallbackSelected(Frozen):
    """The executor asks another provider because no provider asked so far answered the task
    (every call failed, after retries): SPEC §4 executor, agents/executor.py step 4.

    ``action`` is the routing action this falls back from ("none" when no action was
    admissible); it stays the task's action. ``from_providers`` lists the providers that gave
    no answer so far, in the order they were asked (the action's, then earlier fallbacks);
    ``to_provider`` is the provider asked now; ``attempt`` counts fallbacks from 1 (at most
    ``RMO_MAX_FALLBACKS``); ``reason`` names each earlier provider's failed calls by
    ``error_type``, e.g. ``"flaky: rate_limited, server_error, rate_limited"``."""

    task_id: str
    action: str
    from_providers: list[str]
    to_provider: str
    reason: str
    attempt: int = Field(ge=1)


class ProviderCall(Frozen):
    """Shared fields of a completed or failed provider call. Latency in ms, cost in USD."""

    task_id: str
    provider: str
    model: str
    attempt: int = Field(ge=0)
    latency_ms: float = Field(ge=0)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cost_usd: float = Field(ge=0)
    config_fingerprint: str | None = Field(default=None, description=(
        "agents.providers.registry.fingerprint of the provider's configuration the call ran "
        "under: an auth-tripped breaker closes when it changes (agents/breaker.py step 6)"))
    task_type: str | None = Field(default=None, description=(
        "the analyzer's task_type: the task_type:T budget scope the call pays into"))
    worker: bool = Field(default=False, description=(
        "an extra call of multi-provider consensus, paid by `workers` budget parts"))


class ProviderCallCompleted(ProviderCall):
    response_text: str


class ProviderCallFailed(ProviderCall):
    error_type: str
    http_status: int | None = None
    retry_after_s: float | None = None
    message: str = ""


class BreakerTransitioned(Frozen):
    """A breaker changed (agents/breaker.py). ``trigger``: machine tag of the cause (e.g.
    ``consecutive_failures``, ``failure_rate``, ``auth``, ``manual_close``); ``open_until``:
    the deadline when it is (still) open, far future while held open by auth or an operator."""

    provider: str
    from_state: Literal["closed", "open", "half_open"]
    to_state: Literal["closed", "open", "half_open"]
    reason: str
    failures: int
    successes: int
    trigger: str = ""
    open_until: datetime | None = None


class StageStalled(Frozen):
    """A worker's watchdog (streams/stall.py) saw a stall; on the system topic, keyed by
    ``worker``. Durations in ms.

    ``kind`` ``event_loop``: the worker's event loop did not run for ``stalled_ms``, over
    ``threshold_ms`` (``RMO_STALL_MS``); ``stack`` is where the loop's thread was while it was
    blocked (empty when the watchdog thread could not look: the loop held the GIL the whole
    time). ``consumer``: consumer ``stage`` had ``lag`` records to apply on ``topic`` /
    ``partition`` and applied none for ``stalled_ms``, over ``threshold_ms``
    (``RMO_STALL_S``); ``stack`` is where that consumer's task was waiting. ``tasks``: asyncio
    tasks alive when the stacks were taken (the worker's log has every task's stack)."""

    kind: Literal["event_loop", "consumer"]
    worker: str
    stalled_ms: float = Field(ge=0)
    threshold_ms: float = Field(ge=0)
    stage: str | None = None
    topic: str | None = None
    partition: int | None = Field(default=None, ge=0)
    lag: int | None = Field(default=None, ge=0)
    tasks: int = Field(default=0, ge=0)
    stack: str = ""


class BreakerCommand(Frozen):
    """An operator's ``rmo breaker open|close|reset PROVIDER``, on the calls topic keyed by
    provider so the breaker projection applies it in order with the provider's calls."""

    provider: str
    command: Literal["open", "close", "reset"]
    reason: str = ""
    operator: str = ""


class Candidate(Frozen):
    provider: str
    text: str


class TaskExecuted(Frozen):
    """The chosen answer and, carried on from the task (event-carried state transfer), what
    the validator checks it against: ``kind`` and its fields as in :class:`TaskSubmitted`
    (``json_schema`` is ``"schema"`` on the wire)."""

    model_config = _WIRE_ALIASES

    task_id: str
    state: str
    action: str
    candidates: list[Candidate]
    consensus_strategy: str
    chosen: str | None
    chosen_text: str | None
    agreement: float = Field(ge=0.0, le=1.0)
    cost_usd: float = Field(ge=0)
    tokens: int = Field(ge=0)
    kind: TaskKind = "code"
    entry_point: str | None = None
    test: str | None = None
    prompt: str = ""
    time_limit_ms: float = 5000.0
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema",
                                               description=_SCHEMA_DOC)
    expected: Any = Field(default=None, description=_EXPECTED_DOC)
    must_match: str | None = Field(default=None, description=_MUST_MATCH_DOC)
    must_contain: list[str] | None = Field(default=None, description=_MUST_CONTAIN_DOC)
    budget_scope: str | None = Field(default=None, description=(
        "set when no provider answered and a budget refused a call: the refusing budget "
        "line (e.g. global/all/total, or task for the task's own cap)"))
    job: JobRef | None = None  # TaskSubmitted.job, carried on


class ValidationLevel(Frozen):
    """One validator level's verdict. ``details`` summarizes the level (e.g. "1/7 asserts
    passed"); on a failed level ``error_type`` and ``message`` carry its first failure (e.g.
    ``"AssertionError"``, ``"test line 12: assert candidate(3) == 4"``), so a reader of this
    event alone can tell why the task failed."""

    level: str
    passed: bool
    details: str = ""
    error_type: str | None = None
    message: str = ""


class TaskValidated(Frozen):
    """The validator's verdict. ``verified`` is False when nothing could check the answer
    (a text task without ``expected``, ``must_match`` or ``must_contain``): then ``passed``
    is False too, the task completes ``unverified`` and ``levels`` is empty. Events written
    before the field existed were all verified (the default)."""

    task_id: str
    levels: list[ValidationLevel]
    passed: bool
    tests_passed: int = Field(ge=0)
    tests_total: int = Field(ge=0)
    duration_ms: float = Field(ge=0)
    state: str
    action: str
    provider: str | None
    cost_usd: float = Field(ge=0)
    tokens: int = Field(ge=0)
    verified: bool = True
    budget_scope: str | None = None  # TaskExecuted.budget_scope, carried on


ErrorCategory = Literal[
    "SYNTAX", "LOGIC", "RUNTIME", "TIMEOUT", "PERFORMANCE", "SECURITY", "PROVIDER", "BUDGET", "SCHEMA"
]


class ErrorLogged(Frozen):
    category: ErrorCategory
    error_type: str
    message: str
    agent_id: str
    task_id: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)


CompletionStatus = Literal["passed", "failed", "unverified", "rejected", "dead_lettered",
                           "budget_exceeded"]


class RewardComputed(Frozen):
    """reward = performance - cost_usd * cost_weight (Grokputer diagram 4). ``passed`` and
    ``verified`` are the validation's (see :class:`TaskValidated`); their combination is
    the task's final status, :attr:`completion_status`."""

    task_id: str
    state: str
    action: str
    next_state: str
    performance: float = Field(ge=0.0, le=1.0)
    cost_usd: float = Field(ge=0)
    cost_weight: float
    reward: float
    passed: bool
    provider: str | None
    tokens: int = Field(ge=0)
    verified: bool = True
    budget_scope: str | None = None  # TaskExecuted.budget_scope, carried on

    @property
    def completion_status(self) -> CompletionStatus:
        """The ``TaskCompleted.status`` this reward ends its task with: ``budget_exceeded``
        when a budget left it without an answer, ``unverified`` when nothing checked the
        answer, else ``passed`` or ``failed``."""
        return completion_status(self.passed, self.verified, self.budget_scope)


def completion_status(passed: bool, verified: bool, budget_scope: str | None) -> CompletionStatus:
    """A task's final status from its validation: ``budget_exceeded`` when a budget left it
    without an answer, ``unverified`` when nothing checked the answer, else ``passed`` or
    ``failed``."""
    if budget_scope is not None:
        return "budget_exceeded"
    if not verified:
        return "unverified"
    return "passed" if passed else "failed"


class PatternDetected(Frozen):
    """A recurring error crossed the pattern extractor's thresholds (agents/patterns.py; SPEC
    §4 learning, §7: at least 3 occurrences, confidence >= 0.7). On the learning topic, keyed
    by ``pattern``; emitted once per pattern.

    ``pattern`` is the key ``category|error_type|task_type|complexity|provider`` (``*``: any),
    its parts repeated as fields. ``occurrences``: distinct tasks that failed this way (those
whose outcome is recorded);
    ``opportunities``: the tasks that could have (validated answers of ``provider`` on
    ``task_type``, or every task of ``complexity``, counted so far); ``confidence`` =
    min(occurrences, opportunities) / (opportunities + 1). ``events``: the ErrorLogged events counted (a task may log several);
    ``truncated``: of them, SYNTAX errors of an answer that ends mid-statement;
    ``at_limit``: provider timeouts that ran to the executor's own limit. Times are the
    first and last matching error's event times."""

    pattern: str
    category: ErrorCategory
    error_type: str
    task_type: str
    complexity: str
    provider: str
    occurrences: int = Field(ge=0)
    opportunities: int = Field(ge=0)
    confidence: float = Field(ge=0.0, le=1.0)
    events: int = Field(ge=0)
    truncated: int = Field(default=0, ge=0)
    at_limit: int = Field(default=0, ge=0)
    first_seen: datetime
    last_seen: datetime


RuleKind = Literal["avoid_provider", "raise_timeout", "raise_max_output_tokens"]
"""What a protocol rule changes (agents/rules.py): the executor stops choosing a provider's
actions for a task type; multiplies the provider timeout for a complexity; multiplies the
output-token limit (proposed only: nothing in the log can test it)."""


class RuleEvidence(Frozen):
    """The figures a rule decision rests on (agents/rules.py), each None where the decision
    does not use it. Counts are tasks (validated answers), rates are fractions 0-1.

    ``confidence``, ``occurrences``, ``opportunities``: the pattern's when decided.
    ``provider_tasks`` / ``provider_failed``: recorded tasks of the rule's task type answered
    by the avoided provider, and how many failed; ``other_tasks`` / ``other_failed``: the same
    on the other providers. ``timeouts`` / ``timeouts_at_limit``: the pattern's provider
    timeouts, and those that ran to the executor's limit. ``estimated_effect``: the failure
    rate the rule would have avoided on the tasks it touches, from history.
    ``before_tasks`` / ``before_failed``: the touched scope (the task type, or complexity)
    when the rule was applied; ``routed_tasks`` / ``routed_failed``: of them, those that went
    the way the rule routes (for ``avoid_provider``: answered by another provider);
    ``after_tasks`` / ``after_failed``: tasks routed that way since; ``measured_effect``:
    before rate - after rate (negative: the rule made things worse)."""

    confidence: float | None = None
    occurrences: int | None = None
    opportunities: int | None = None
    provider_tasks: int | None = None
    provider_failed: int | None = None
    other_tasks: int | None = None
    other_failed: int | None = None
    timeouts: int | None = None
    timeouts_at_limit: int | None = None
    estimated_effect: float | None = None
    before_tasks: int | None = None
    before_failed: int | None = None
    routed_tasks: int | None = None
    routed_failed: int | None = None
    after_tasks: int | None = None
    after_failed: int | None = None
    measured_effect: float | None = None


class RuleChange(Frozen):
    """Shared fields of the protocol updater's events (agents/rules.py), on the learning topic
    keyed by ``rule_id`` so one rule's events stay in order. ``params``: ``avoid_provider``
    {task_type, provider}; ``raise_timeout`` {complexity, factor}; ``raise_max_output_tokens``
    {factor}. ``pattern``: the key of the PatternDetected that proposed it; ``reason``: the
    decision in words; ``evidence``: its figures."""

    rule_id: str
    kind: RuleKind
    params: dict[str, str | float]
    pattern: str
    reason: str
    evidence: RuleEvidence = Field(default_factory=RuleEvidence)


class ProtocolRuleProposed(RuleChange):
    """A rule suggested by a detected pattern; not yet in force."""


class ProtocolRuleApplied(RuleChange):
    """A proposed rule put in force: its pattern's confidence reached 0.8 (SPEC §7) and its
    evaluation on the recorded tasks it would have touched was positive. ``evidence`` holds
    the evaluation and the touched scope's figures at this moment (``before_*``)."""


class ProtocolRuleRejected(RuleChange):
    """A proposed rule that will not be applied: its evaluation on history found no benefit."""


class ProtocolRuleRolledBack(RuleChange):
    """An applied rule taken out of force: the failure rate of the tasks it touches rose
    after it was applied (``evidence``: before and after figures)."""


class BudgetExceeded(Frozen):
    """A provider call not made: a budget line (``line``, e.g. ``global/all/total``, or
    ``task``) could not admit its worst case (micro-USD, tokens). On the errors topic."""

    task_id: str
    provider: str
    line: str
    priority: int
    reserve_denied: bool = False
    """True when the global emergency reserve would have admitted it but the task's priority
    is below ``reserve_min_priority`` (Cortex: the reserve denies)."""
    worst_microusd: int = Field(ge=0)
    worst_tokens: int = Field(ge=0)


class ReserveGranted(Frozen):
    """A call of a task of ``priority`` admitted by dipping into the global emergency reserve
    (worst case in micro-USD and tokens). On the errors topic, keyed by task."""

    task_id: str
    provider: str
    priority: int
    worst_microusd: int = Field(ge=0)
    worst_tokens: int = Field(ge=0)


class TaskCompleted(Frozen):
    """A task's end. ``status``: ``passed`` / ``failed`` (validated), ``unverified`` (an
    answer nothing could check: a text task without checks), ``rejected``, ``dead_lettered``
    (an event of the task could not be processed; ``result`` is the reason),
    ``budget_exceeded`` (no answer because a budget refused its calls; ``result`` names
    the budget line)."""

    task_id: str
    status: CompletionStatus
    result: str | None = None
    provider: str | None = None
    action: str | None = None
    cost_usd: float = 0.0
    tokens: int = 0
    latency_ms: float = 0.0
    attempts: int = 1


class MetricsSnapshot(Frozen):
    window_start: datetime
    window_end: datetime
    counters: dict[str, int]
    gauges: dict[str, float]
    histograms: dict[str, dict[str, float]]


class DeadLettered(Frozen):
    """A record a stage could not process: reason, original bytes (base64) and its origin.

    ``original_size`` is the record's size in bytes; only records over the dead-letter limit
    (streams.stage.MAX_DEADLETTER_BYTES, 2 MiB) keep a truncated prefix
    (``original_truncated``), so that the dead letter itself stays producible."""

    reason: str
    error_type: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    original_key_b64: str | None
    original_value_b64: str
    original_size: int = Field(default=0, ge=0)
    original_truncated: bool = False


# --------------------------------------------------------------------------- envelopes


class Envelope(Frozen):
    """The record value every topic carries (SPEC §3). ``occurred_at`` is the event time (UTC)."""

    event_id: str = Field(min_length=1)
    event_type: str
    schema_version: int = SCHEMA_VERSION
    occurred_at: datetime
    correlation_id: str
    causation_id: str | None = None
    producer: str
    payload: Any
