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


def _uniform(choices: Sequence[str], actions: Sequence[str]) -> dict[str, float]:
    return {a: (1.0 / len(choices) if a in choices else 0.0) for a in actions}


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
        if self.action in actions:
            return Choice(self.action, False, {a: float(a == self.action) for a in actions}, {})
        others = _singles(actions)
        return Choice(others[rng.randrange(len(others))], True, _uniform(others, actions), {})


@dataclass(frozen=True)
class RandomPolicy(_Stateless):
    """A uniformly random single-provider action per task."""

    name: str = "random"


    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        singles = _singles(actions)
        return Choice(singles[rng.randrange(len(singles))], True, _uniform(singles, actions), {})


@dataclass(frozen=True)
class RoundRobinPolicy(_Stateless):
    """The single-provider actions in turn, by the task's decision index."""

    name: str = "round-robin"


    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        singles = _singles(actions)
        pick = singles[ctx.index % len(singles)]
        return Choice(pick, False, {a: float(a == pick) for a in actions}, {})
