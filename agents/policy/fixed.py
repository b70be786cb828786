"""Fixed baselines: one provider or one action (the cascade), uniformly random, round-robin (RouterBench's reference
routers). They learn nothing; their decisions are logged like any other, with exact
propensities (1 for a deterministic choice)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from agents.policy.base import Context, Snapshot
from agents.qlearning import Choice


def _singles(actions: Sequence[str]) -> list[str]:
    """The single-provider actions (``{provider}:single``), else every action."""
    singles = [a for a in actions if a.endswith(":single")]
    return singles or list(actions)


def _certain(pick: str, actions: Sequence[str]) -> Choice:
    """``pick`` with probability 1."""
    return Choice(pick, False, {a: float(a == pick) for a in actions}, {})


def _random_single(actions: Sequence[str], rng: random.Random) -> Choice:
    """A uniformly random single-provider action (explored), with its propensities."""
    singles = _singles(actions)
    probs = {a: (1.0 / len(singles) if a in singles else 0.0) for a in actions}
    return Choice(singles[rng.randrange(len(singles))], True, probs, {})


class _Stateless:
    """A policy that learns nothing: no state to load, nothing learned to show."""

    async def load(self, redis, keys) -> None:
        return None

    def learned(self, data: None) -> dict[str, tuple[str, float]]:
        return {}


@dataclass(frozen=True)
class FixedActionPolicy(_Stateless):
    """Always ``action`` (``provider:ID`` is ``ID:single``; ``cascade`` the cascade action).
    When a breaker keeps it out, a uniformly random single-provider action (recorded as
    explored)."""

    action: str
    name: str

    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        return _certain(self.action, actions) if self.action in actions else _random_single(actions, rng)


@dataclass(frozen=True)
class RandomPolicy(_Stateless):
    """A uniformly random single-provider action per task."""

    name: str = "random"

    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        return _random_single(actions, rng)


@dataclass(frozen=True)
class RoundRobinPolicy(_Stateless):
    """The single-provider actions in turn, by the task's decision index."""

    name: str = "round-robin"

    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        singles = _singles(actions)
        return _certain(singles[ctx.index % len(singles)], actions)
