"""A contextual bandit router: Thompson sampling on the analyzer's ``task_type``.

Thompson sampling (Thompson 1933; Chapelle & Li, "An Empirical Evaluation of Thompson
Sampling", NIPS 2011): keep a posterior over each action's pass probability, draw one sample
per action, pick the best sample. LiteLLM's adaptive router does the same on the request type.
Here the objective of an action is ``pass probability - cost_weight * expected cost (USD)``,
the expected reward of agents/learning.py, so cost counts as much as the learning stage says.

Model, per (task_type, action), from the :class:`BanditProjection` statistics (tasks n, passes,
cost in micro-USD):

- pass probability ~ Beta(1 + k·p̄ + passes, 1 + k·(1 - p̄) + failures), where p̄ = (P + 1) /
  (N + 2) is the action's pass rate over every task type: a task type borrows ``k``
  (``thompson_prior_strength``) pseudo-observations from the action's overall record, so a
  new task type starts from what the action does elsewhere (partial pooling);
- expected cost = (cost + k·c̄) / (n + k), c̄ the action's mean cost over every type, or
  before its first task the cost its providers' list prices give this prompt (``prices``: input
  and output USD per million tokens summed over the providers the action calls first; output
  taken as half the prompt's tokens), so an expensive action is not explored as if it were free.

Propensities are exact: the policy *is* "sample ``samples`` posterior draws, take the share of
draws each action wins, mix in the uniform floor (agents/policy/base.py :func:`with_floor`),
draw the action from that": the logged probabilities are the ones the action was drawn with.
The samples come from numpy's PCG64 seeded by the task's event id, so a decision is
reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agents.policy.base import Context, Snapshot, draw, with_floor
from agents.qlearning import Choice
from models.events import Envelope, RewardComputed

SEP = "\t"
Stats = dict[tuple[str, str], list[int]]
"""(task_type, action) -> [tasks, passes, cost in micro-USD]; task type :data:`ALL` holds each
action's totals over every type (summed once, when the statistics are read)."""
ALL = "*"


def task_type_of(state: str) -> str:
    """The task_type part of a routing state (``[previous|]task_type|complexity``)."""
    return state.rsplit("|", 2)[-2]


def parse_stats(h: dict[str, str]) -> Stats:
    """The :class:`BanditProjection` hash as :data:`Stats`."""
    out: Stats = {}
    for f, v in h.items():
        task_type, action, what = f.split(SEP)
        i, n = ("n", "passes", "cost").index(what), int(v)
        out.setdefault((task_type, action), [0, 0, 0])[i] = n
        out.setdefault((ALL, action), [0, 0, 0])[i] += n
    return out


@dataclass(frozen=True)
class ThompsonPolicy:
    """Thompson sampling over :data:`Stats` (``Snapshot.data``); see the module docstring."""

    cost_weight: float
    floor: float = 0.02
    samples: int = 256
    prior_strength: float = 2.0
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    name: str = "thompson"

    async def load(self, redis, keys) -> Stats:
        return parse_stats(await redis.hgetall(keys.bandit))

    def price_prior(self, action: str, prompt_tokens: int) -> float:
        """USD the action's list prices give a prompt of ``prompt_tokens`` (module docstring)."""
        p_in, p_out = self.prices.get(action, (0.0, 0.0))
        return (p_in * prompt_tokens + p_out * prompt_tokens / 2) / 1e6

    def posterior(self, task_type: str, actions: Sequence[str], stats: Stats,
                  prompt_tokens: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(alpha, beta, cost_usd)`` arrays over ``actions`` for ``task_type``."""
        k = self.prior_strength
        alpha, beta, cost = [], [], []
        for a in actions:
            gn, gp, gc = stats.get((ALL, a), (0, 0, 0))
            pbar = (gp + 1) / (gn + 2)
            n, p, c = stats.get((task_type, a), (0, 0, 0))
            alpha.append(1 + k * pbar + p)
            beta.append(1 + k * (1 - pbar) + n - p)
            prior = gc / gn / 1e6 if gn else self.price_prior(a, prompt_tokens)
            cost.append((c / 1e6 + k * prior) / (n + k) if n + k else prior)
        return np.array(alpha), np.array(beta), np.array(cost)

    def learned(self, data: Stats | None) -> dict[str, tuple[str, float]]:
        """task_type -> (action of the highest posterior mean score, that score), over the
        actions tried on that type."""
        out = {}
        for task_type in sorted({tt for tt, _ in data or {}} - {ALL}):
            actions = sorted(a for tt, a in data if tt == task_type)
            alpha, beta, cost = self.posterior(task_type, actions, data)
            mean = alpha / (alpha + beta) - self.cost_weight * cost
            best = int(mean.argmax())
            out[task_type] = (actions[best], float(mean[best]))
        return out

    def choose(self, ctx: Context, actions: Sequence[str], snap: Snapshot,
               rng: random.Random) -> Choice:
        alpha, beta, cost = self.posterior(ctx.task_type, actions, snap.data or {}, ctx.prompt_tokens)
        gen = np.random.Generator(np.random.PCG64(rng.getrandbits(64)))
        scores = gen.beta(alpha, beta, size=(self.samples, len(actions))) - self.cost_weight * cost
        wins = np.bincount(scores.argmax(axis=1), minlength=len(actions)) / self.samples
        probs = with_floor({a: float(w) for a, w in zip(actions, wins)}, self.floor)
        mean = alpha / (alpha + beta) - self.cost_weight * cost
        action = draw(probs, rng)
        return Choice(action, action != actions[int(mean.argmax())], probs,
                      {a: float(m) for a, m in zip(actions, mean)})


class BanditProjection:
    """``{ns}:bandit`` hash of :data:`Stats` from the rewards topic: per (task_type, action)
    fields ``n``, ``passes``, ``cost`` (micro-USD), integer increments only, so it is order-free
    and replay rebuilds it exactly. Rewards of tasks a budget left unanswered are skipped (the
    budget, not the action, decided them), as in the Q-table."""

    name = "bandit"

    async def apply(self, events: Sequence[Envelope], tx) -> None:
        incr: dict[str, int] = {}
        for e in events:
            if e.event_type != "RewardComputed":
                continue
            r: RewardComputed = e.payload
            if r.budget_scope is not None:
                continue
            base = f"{task_type_of(r.state)}{SEP}{r.action}{SEP}"
            for what, n in (("n", 1), ("passes", int(r.passed)), ("cost", round(r.cost_usd * 1e6))):
                incr[base + what] = incr.get(base + what, 0) + n
        if incr:
            def write(pipe) -> None:
                for f, n in incr.items():
                    pipe.hincrby(tx.keys.bandit, f, n)

            tx.write(write)
