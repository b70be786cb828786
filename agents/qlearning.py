"""Tabular Q-learning with epsilon-greedy exploration and experience replay.

Source: Grokputer RL optimizer (diagram 4): state (previous provider, task_type, complexity),
action (provider choice, consensus strategy), reward = performance - cost * weight,
epsilon starting at 0.970, experience replay over the latest 1000 experiences with random
minibatches. The update rule is Watkins' Q-learning (Sutton & Barto, eq. 6.8):
``Q(s,a) += alpha * (r + gamma * max_a' Q(s',a') - Q(s,a))``.

Everything here is pure and deterministic given its inputs (randomness comes from a
``random.Random`` the caller seeds from event ids), so replaying the rewards topic in order
rebuilds the Q-table bit for bit.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

QTable = dict[str, dict[str, float]]
"""state -> action -> value. Missing entries are 0.0."""

SEP = "\t"


@dataclass(frozen=True)
class QConfig:
    alpha: float = 0.1
    gamma: float = 0.1
    epsilon_start: float = 0.97
    epsilon_min: float = 0.05
    epsilon_decay: float = 0.99
    experience_size: int = 1000
    minibatch: int = 4


@dataclass(frozen=True)
class Choice:
    """A routing decision: the action, whether it was an exploratory draw, every admissible
    action's probability (the logged propensities), the scores the policy ranked actions by
    (Q-values, posterior means) and the ε it explored with (0 for policies without one)."""

    action: str
    explored: bool
    probabilities: dict[str, float]
    q_values: dict[str, float]
    epsilon: float = 0.0


def make_state(previous_provider: str | None, task_type: str, complexity: str) -> str:
    """The routing state string ``previous|task_type|complexity``."""
    return f"{previous_provider or 'none'}|{task_type}|{complexity}"


def feature_state(task_type: str, complexity: str) -> str:
    """The routing state string ``task_type|complexity`` (no previous provider)."""
    return f"{task_type}|{complexity}"


def next_state(state: str, provider: str | None) -> str:
    """The state a router is in after choosing ``provider`` for a task of the same features:
    the seed's state remembers the provider; a features-only state is unchanged."""
    parts = state.split("|", 2)
    if len(parts) < 3:
        return state
    return make_state(provider, parts[1], parts[2])


def epsilon(updates: int, cfg: QConfig) -> float:
    """Exploration rate after ``updates`` rewards: ``max(min, start * decay**updates)``."""
    return max(cfg.epsilon_min, cfg.epsilon_start * cfg.epsilon_decay**updates)


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from sha256 of the parts (e.g. event id and run seed)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def minibatch(event_id: str, size: int, k: int) -> list[int]:
    """``k`` indices into an experience buffer of ``size``, uniform with replacement, drawn
    from sha256 of ``event_id``: the same reward replays the same experiences on every replay.
    (Cheaper than seeding a ``random.Random`` per reward, which dominated the learner.)"""
    if size <= 0 or k <= 0:
        return []
    digest = hashlib.sha256(event_id.encode()).digest()
    while len(digest) < 8 * k:
        digest += hashlib.sha256(digest).digest()
    return [int.from_bytes(digest[8 * i:8 * i + 8], "big") % size for i in range(k)]


def select(state: str, actions: Sequence[str], q: QTable, eps: float, rng: random.Random) -> Choice:
    """Epsilon-greedy choice among ``actions`` (ties go to the earliest action).

    Raises:
        ValueError: ``actions`` is empty.
    """
    if not actions:
        raise ValueError("no actions available")
    row = q.get(state, {})
    values = {a: row.get(a, 0.0) for a in actions}
    greedy = max(actions, key=lambda a: (values[a], -actions.index(a)))
    n = len(actions)
    probs = {a: eps / n + (1.0 - eps if a == greedy else 0.0) for a in actions}
    if rng.random() < eps:
        return Choice(actions[rng.randrange(n)], True, probs, values, eps)
    return Choice(greedy, False, probs, values, eps)


def update(q: QTable, state: str, action: str, reward: float, s_next: str, cfg: QConfig) -> float:
    """Apply one Q-learning update in place and return the new Q(state, action)."""
    row = q.setdefault(state, {})
    nxt = q.get(s_next, {})
    best_next = max(nxt.values()) if nxt else 0.0
    old = row.get(action, 0.0)
    new = old + cfg.alpha * (reward + cfg.gamma * best_next - old)
    row[action] = new
    return new


def greedy_policy(q: QTable) -> dict[str, tuple[str, float]]:
    """state -> (greedy action, its value): what the router has learned."""
    return {s: max(row.items(), key=lambda kv: kv[1]) for s, row in sorted(q.items()) if row}


def to_fields(q: QTable, touched: set[tuple[str, str]]) -> Mapping[str, str]:
    """Redis hash fields for the touched (state, action) pairs; floats as repr (exact)."""
    return {f"{s}{SEP}{a}": repr(q[s][a]) for s, a in touched}


def from_fields(h: Mapping[str, str]) -> QTable:
    q: QTable = {}
    for field, value in h.items():
        s, a = field.split(SEP, 1)
        q.setdefault(s, {})[a] = float(value)
    return q
