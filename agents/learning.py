"""Learning stage (SPEC §4): TaskValidated -> RewardComputed; the Q-table consumer applies
rewards in the rewards topic's total order and emits TaskCompleted.

reward = performance - cost_usd * cost_weight, performance 1.0 when every test passes, else
the passed fraction (Fractal-RMO learning subsystem; Grokputer diagram 4). An *unverified*
answer (a text task without checks: ``TaskValidated.verified`` False) is neither a pass nor
a failure: its performance is :data:`UNVERIFIED_PERFORMANCE`, halfway between the two, the
same for every provider, so such tasks teach the Q-table only what their cost says. The
value is a function of the event alone, so replay rebuilds the same Q-table.
"""

from __future__ import annotations

from agents import qlearning
from agents.policy.bandit import BanditProjection
from models.codec import make_event
from models.events import Envelope, RewardComputed, TaskValidated
from streams.config import Settings
from streams.projections import CountersProjection, QTableProjection, TaskStatusProjection
from streams.stage import Consumer, Tx

UNVERIFIED_PERFORMANCE = 0.5
"""Performance of an answer nothing checked: between a failure (0.0) and a pass (1.0)."""


def performance(v: TaskValidated) -> float:
    """1.0 when validation passed, :data:`UNVERIFIED_PERFORMANCE` when nothing verified the
    answer, else tests_passed / tests_total (0.0 without tests)."""
    if not v.verified:
        return UNVERIFIED_PERFORMANCE
    if v.passed:
        return 1.0
    return v.tests_passed / v.tests_total if v.tests_total else 0.0


def reward(perf: float, cost_usd: float, cost_weight: float) -> float:
    """performance - cost * weight (Grokputer: ``Reward: (performance - cost * weight)``)."""
    return perf - cost_usd * cost_weight


class RewardStage(Consumer):
    name = "learning"
    source = "validations"
    handles = frozenset({"TaskValidated"})
    projections = (TaskStatusProjection(), CountersProjection())

    def __init__(self, settings: Settings) -> None:
        self.cost_weight = settings.cost_weight

    async def handle(self, event: Envelope, tx: Tx) -> None:
        v: TaskValidated = event.payload
        perf = performance(v)
        r = RewardComputed(task_id=v.task_id, state=v.state, action=v.action,
                           next_state=qlearning.next_state(v.state, v.provider),
                           performance=perf, cost_usd=v.cost_usd, cost_weight=self.cost_weight,
                           reward=reward(perf, v.cost_usd, self.cost_weight), passed=v.passed,
                           verified=v.verified, provider=v.provider, tokens=v.tokens,
                           budget_scope=v.budget_scope)
        tx.emit("rewards", make_event(r, producer="learning.reward", cause=event), key="qtable")


class QTableConsumer(Consumer):
    """Projection-only consumer of the rewards topic (see QTableProjection)."""

    name = "learning.qtable"
    source = "rewards"

    def __init__(self, settings: Settings, config: qlearning.QConfig) -> None:
        self.projections = (QTableProjection(config), BanditProjection())
