"""The wire contract (SPEC §3): the envelope and every event type, as frozen pydantic v2 models.

Every Kafka record value is one JSON object, the envelope. Each event type is a subclass of
:class:`Envelope` whose ``event_type`` is a literal and whose ``payload`` is the type's payload
model, so a single discriminated union (:data:`AnyEvent`) decodes any record and
``rmo schema`` exports a JSON Schema per type for producers in other languages.
"""

from __future__ import annotations

import operator
from datetime import datetime
from functools import reduce
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Frozen(BaseModel):
    """Base of every wire model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- payloads


class TaskSubmitted(Frozen):
    """A task enters the pipeline. ``test`` is HumanEval-style: it defines ``check(candidate)``."""

    task_id: str = Field(min_length=1, max_length=256)
    kind: Literal["code", "text"]
    prompt: str
    entry_point: str | None = None
    test: str | None = None
    priority: int = Field(default=3, ge=1, le=5)
    budget_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


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


class ProviderCallCompleted(ProviderCall):
    response_text: str


class ProviderCallFailed(ProviderCall):
    error_type: str
    http_status: int | None = None
    retry_after_s: float | None = None
    message: str = ""


class BreakerTransitioned(Frozen):
    provider: str
    from_state: Literal["closed", "open", "half_open"]
    to_state: Literal["closed", "open", "half_open"]
    reason: str
    failures: int
    successes: int


class Candidate(Frozen):
    provider: str
    text: str


class TaskExecuted(Frozen):
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
    kind: Literal["code", "text"] = "code"
    entry_point: str | None = None
    test: str | None = None
    prompt: str = ""
    time_limit_ms: float = 5000.0


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


class RewardComputed(Frozen):
    """reward = performance - cost_usd * cost_weight (Grokputer diagram 4)."""

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


class TaskCompleted(Frozen):
    task_id: str
    status: Literal["passed", "failed", "rejected", "dead_lettered"]
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


def _envelope(name: str, payload_model: type[Frozen]) -> type[Envelope]:
    return type(
        f"{name}Event",
        (Envelope,),
        {
            "__annotations__": {"event_type": Literal[name], "payload": payload_model},  # type: ignore[valid-type]
            "__doc__": f"Envelope carrying a {name} payload.",
            "__module__": __name__,
        },
    )


PAYLOADS: dict[str, type[Frozen]] = {
    cls.__name__: cls
    for cls in (
        TaskSubmitted,
        TaskAnalyzed,
        ProviderSelected,
        ProviderCallCompleted,
        ProviderCallFailed,
        BreakerTransitioned,
        TaskExecuted,
        TaskValidated,
        ErrorLogged,
        RewardComputed,
        TaskCompleted,
        MetricsSnapshot,
        DeadLettered,
    )
}
"""event_type -> payload model."""

EVENT_TYPES: dict[str, type[Envelope]] = {name: _envelope(name, m) for name, m in PAYLOADS.items()}
"""event_type -> envelope model (what `rmo schema` exports)."""

AnyEvent = Annotated[reduce(operator.or_, EVENT_TYPES.values()), Field(discriminator="event_type")]  # type: ignore[valid-type]
"""Discriminated union of every envelope type; decode with ``models.codec``."""
