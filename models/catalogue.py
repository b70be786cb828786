"""The event catalogue: every payload model by ``event_type``, its envelope model, and the
discriminated union that decodes any record (models/events.py: the task pipeline's events;
models/jobs.py: Cortex jobs'). ``rmo schema`` exports one JSON Schema per entry."""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Literal

from pydantic import Field

from models.events import (
    BreakerCommand,
    BreakerTransitioned,
    BudgetExceeded,
    DeadLettered,
    Envelope,
    ErrorLogged,
    FallbackSelected,
    Frozen,
    MetricsSnapshot,
    PatternDetected,
    ProtocolRuleApplied,
    ProtocolRuleProposed,
    ProtocolRuleRejected,
    ProtocolRuleRolledBack,
    ProviderCallCompleted,
    ProviderCallFailed,
    ProviderSelected,
    ReserveGranted,
    RewardComputed,
    StageStalled,
    TaskAnalyzed,
    TaskCompleted,
    TaskExecuted,
    TaskSubmitted,
    TaskValidated,
)
from models.jobs import JOB_PAYLOADS


def _envelope(name: str, payload_model: type[Frozen]) -> type[Envelope]:
    return type(
        f"{name}Event",
        (Envelope,),
        {
            "__annotations__": {"event_type": Literal[name], "payload": payload_model},  # type: ignore[valid-type]
            "__doc__": f"Envelope carrying a {name} payload.",
            "__module__": "models.events",
        },
    )


PAYLOADS: dict[str, type[Frozen]] = {
    cls.__name__: cls
    for cls in (
        TaskSubmitted,
        TaskAnalyzed,
        ProviderSelected,
        FallbackSelected,
        ProviderCallCompleted,
        ProviderCallFailed,
        BreakerTransitioned,
        BreakerCommand,
        StageStalled,
        TaskExecuted,
        TaskValidated,
        ErrorLogged,
        RewardComputed,
        PatternDetected,
        ProtocolRuleProposed,
        ProtocolRuleApplied,
        ProtocolRuleRejected,
        ProtocolRuleRolledBack,
        BudgetExceeded,
        ReserveGranted,
        TaskCompleted,
        MetricsSnapshot,
        DeadLettered,
        *JOB_PAYLOADS,
    )
}
"""event_type -> payload model."""

EVENT_TYPES: dict[str, type[Envelope]] = {name: _envelope(name, m) for name, m in PAYLOADS.items()}
"""event_type -> envelope model (what `rmo schema` exports)."""

AnyEvent = Annotated[reduce(operator.or_, EVENT_TYPES.values()), Field(discriminator="event_type")]  # type: ignore[valid-type]
"""Discriminated union of every envelope type; decode with ``models.codec``."""
