"""The seed's ε-greedy Q-learning as a routing policy (Grokputer diagram 4; agents/qlearning.py).

ε is per decision: ``max(epsilon_min, epsilon_start * epsilon_decay ** index)`` at the task's
decision index (agents/policy/base.py), so the exploration schedule is the same however the
tasks are batched. The effective ε is at least ``floor * n`` for n admissible actions, so every
action keeps a propensity of at least ``floor``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from agents import qlearning
from agents.policy.base import Context, Snapshot
from agents.qlearning import Choice


@dataclass(frozen=True)
class EpsilonGreedyPolicy:
    """ε-greedy over the Q-table (``Snapshot.data``: state -> action -> value)."""

    config: qlearning.QConfig
    floor: float = 0.02
    name: str = "epsilon-greedy"

    async def load(self, redis, keys) -> qlearning.QTable:
        return qlearning.from_fields(await redis.hgetall(keys.qtable))

    def epsilon(self, index: int, n_actions: int) -> float:
        """ε of the decision at ``index`` among ``n_actions`` actions (floor included)."""
        eps = qlearning.epsilon(index, self.config)
        return min(1.0, max(eps, self.floor * n_actions))

    def learned(self, data: qlearning.QTable | None) -> dict[str, tuple[str, float]]:
        """state -> (greedy action, Q-value)."""
        return qlearning.greedy_policy(data or {})

    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        return qlearning.select(ctx.state, actions, snap.data or {},
                                self.epsilon(ctx.index, len(actions)), rng)
