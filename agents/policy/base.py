"""The routing policy interface and what every policy shares.

A policy decides one task at a time (:meth:`Policy.choose`) from a :class:`Snapshot` of the
state it learned, read once per executor batch (:meth:`Policy.load`). Per-task quantities (ε,
round-robin position) come from the task's decision index: how many tasks the executor had
decided before it (the ``events:TaskAnalyzed`` counter the executor projects with its
checkpoint) plus its position in the batch. A decision therefore depends on the task's place in
the stream, never on how the stream was cut into batches; what a batch cannot see is only the
rewards of tasks that have not been validated yet (delayed feedback, inherent to a pipeline).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agents.qlearning import Choice


@dataclass(frozen=True)
class Context:
    """What a policy knows about one task: the analyzer's features, the routing state string
    (``task_type|complexity``, or the seed's ``previous|task_type|complexity``), its decision
    index (0-based position in the stream of decided tasks) and its prompt's size in tokens
    (estimated, for cost priors)."""

    task_type: str
    complexity: str
    state: str
    index: int
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A policy's learned state as read at the start of a batch: ``data`` is the policy's own
    (a Q-table, bandit statistics); ``decided`` the decision index of the batch's first task."""

    decided: int
    data: Any = None


class Policy(Protocol):
    """A routing policy. ``name`` is what ``ProviderSelected.policy`` records."""

    name: str

    async def load(self, redis, keys) -> Any:
        """The policy's learned state from Redis (``Snapshot.data``); None if it has none."""
        ...

    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        """One decision among ``actions`` (non-empty, in registry order): the action, whether
        it was an exploratory draw, every action's probability (summing to 1) and the scores
        the policy ranked them by (``q_values``)."""
        ...

    def learned(self, data: Any) -> dict[str, tuple[str, float]]:
        """What it learned, for people: state -> (best action, its score); {} if nothing."""
        ...


def with_floor(probs: Mapping[str, float], floor: float) -> dict[str, float]:
    """``probs`` mixed with the uniform distribution just enough that every action has at
    least ``floor`` (capped at 1/n): ``(1 - g) * p + g / n`` with the smallest such ``g``.
    Keeps logged propensities away from 0, so inverse-propensity estimates stay bounded
    (their weights are at most 1/floor)."""
    n = len(probs)
    floor = min(floor, 1.0 / n)
    low = min(probs.values())
    if low >= floor:
        return dict(probs)
    g = (floor - low) / (1.0 / n - low)
    return {a: (1 - g) * p + g / n for a, p in probs.items()}


def draw(probs: Mapping[str, float], rng: random.Random) -> str:
    """One action drawn from ``probs`` (in their order) with ``rng``."""
    u = rng.random()
    acc = 0.0
    last = ""
    for a, p in probs.items():
        acc += p
        last = a
        if u < acc:
            return a
    return last
