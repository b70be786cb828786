"""Offline policy evaluation on the log (``rmo evaluate-policy``, SPEC §1 "evaluate a new
routing policy on old traffic"): the logged rounds, joined from the decisions and rewards
topics, and a target policy's estimated pass rate and cost per task.

A **round** is one task's ``ProviderSelected`` joined by task id with its first
``RewardComputed``. A redelivered batch re-logs the task's decision; of several, the round uses
the first whose action is the reward's (the decision whose outcome was recorded), else the
first, and counts the others in ``duplicate_decisions``. A round has: its context (task_type,
complexity: the decision's ``features``, or for logs written before that field the last two
``|``-separated parts of ``state``), the logged action
and its propensity, the behaviour's propensities of every available action (actions missing
from ``action_probabilities`` had probability 0, e.g. their breaker was open), the logged
Q-values, and the outcome: ``passed`` (0/1) and ``cost_usd`` (USD, every call of the task).
When no provider of the logged action answered, the executor fell back to another provider
(``FallbackSelected``); the outcome is still the logged action's, as the router experienced
it: the router chose "ask these providers, falling back if none answers" (agents/executor.py,
"Learning"), and the estimate of a target is the value of routing like it under the same
fallback rule. Rounds answered by a fallback are counted in ``fallback_rounds``.

Rounds are ordered by (decision time, task id), so the same log gives the same estimate
however its partitions interleave when read. A round whose task has no reward yet (in flight,
or dead-lettered after the decision) is left out (``excluded["no_outcome"]``); so is a round in
which the target cannot act (its action was unavailable: ``excluded["target_unavailable"]``):
the estimate is the target's value on the rounds where it could have acted, and a warning
says how many were left out. A round whose logged action has no positive logged propensity
cannot be weighed at all and is left out too (``excluded["no_propensity"]``; the executor never
writes one). The estimators, intervals and diagnostics are agents/ope.py's.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np

from agents import ope
from agents.target_policies import Decision, TargetPolicy
from models.codec import CodecError, decode
from models.events import Envelope
from streams.client import read_topic
from streams.config import Settings
from streams.topics import TopicRegistry


class NoDecisions(LookupError):
    """The namespace's decisions topic holds no ``ProviderSelected`` (in the range read)."""


class NothingToEvaluate(LookupError):
    """No logged round has an outcome the target can be weighed on (the message says why)."""


@dataclass(frozen=True)
class Round:
    """One logged routing decision with its outcome (module docstring)."""

    task_id: str
    occurred_at: datetime
    action: str
    behaviour: dict[str, float]
    q_values: dict[str, float]
    task_type: str
    complexity: str
    passed: bool
    cost_usd: float
    fallback: bool


@dataclass(frozen=True)
class JoinedLog:
    """The rounds (ordered), how many distinct tasks had a decision, the decisions left out
    because their task has no reward (``no_outcome``), and re-logged decisions ignored."""

    rounds: list[Round]
    decisions: int
    no_outcome: int
    duplicate_decisions: int


def join(decisions: Iterable[Envelope], rewards: Iterable[Envelope]) -> JoinedLog:
    """Rounds from decisions-topic events (``ProviderSelected``, ``FallbackSelected``; others
    ignored) and rewards-topic events (``RewardComputed``), each in log order."""
    selected: dict[str, list[Envelope]] = defaultdict(list)
    fell_back: set[str] = set()
    for e in decisions:
        if e.event_type == "ProviderSelected":
            selected[e.payload.task_id].append(e)
        elif e.event_type == "FallbackSelected":
            fell_back.add(e.payload.task_id)
    outcome: dict[str, Any] = {}
    for e in rewards:
        if e.event_type == "RewardComputed":
            outcome.setdefault(e.payload.task_id, e.payload)
    rounds = []
    for task_id, copies in selected.items():
        r = outcome.get(task_id)
        if r is None:
            continue
        chosen = next((c for c in copies if c.payload.action == r.action), copies[0])
        p = chosen.payload
        task_type, complexity = _context(p.features, p.state)
        rounds.append(Round(task_id=task_id, occurred_at=chosen.occurred_at, action=p.action,
                            behaviour=dict(p.action_probabilities), q_values=dict(p.q_values),
                            task_type=task_type, complexity=complexity, passed=r.passed,
                            cost_usd=r.cost_usd, fallback=task_id in fell_back))
    rounds.sort(key=lambda x: (x.occurred_at, x.task_id))
    return JoinedLog(rounds=rounds, decisions=len(selected), no_outcome=len(selected) - len(rounds),
                     duplicate_decisions=sum(len(c) - 1 for c in selected.values()))


def _context(features: dict[str, str], state: str) -> tuple[str, str]:
    if "task_type" in features and "complexity" in features:
        return features["task_type"], features["complexity"]
    parts = state.split("|")
    return (parts[-2], parts[-1]) if len(parts) >= 2 else (state, "")


@dataclass(frozen=True)
class OutcomeEstimate:
    """One outcome (a pass rate in [0, 1], or USD per task) under the target: each
    estimator's value and interval, and the mean the logged policy measured on the same rounds."""

    ips: ope.Interval
    snips: ope.Interval
    dr: ope.Interval
    on_policy: float


@dataclass(frozen=True)
class ActionFigures:
    """What one logged action measured over every round that logged it: rounds, pass rate,
    mean cost (USD per task)."""

    action: str
    rounds: int
    pass_rate: float
    cost_usd: float


@dataclass(frozen=True)
class PolicyEstimate:
    """``rmo evaluate-policy``'s result for one target policy on one namespace's log.

    ``rounds``: rounds the estimate uses, out of ``decisions`` (distinct tasks with a
    decision); ``excluded``: rounds left out by reason (``no_outcome``, ``no_propensity``,
    ``target_unavailable``); ``pass_rate`` and ``cost_usd`` (USD per task): IPS, SNIPS and DR
    with ``1 - alpha`` percentile bootstrap intervals (``bootstrap`` resamples, ``seed``);
    ``ess``: effective sample size (``ess_fraction`` of ``rounds``); ``min_propensity`` among
    rounds the target weighs (None: none), ``max_weight``; ``unsupported_mass``: mean target
    probability on zero-propensity actions; ``never_logged``: (task_type, complexity, action)
    the target uses but no round logged; ``per_action``: every logged action's measured
    figures over all joined rounds; ``warnings``: one sentence each.
    """

    namespace: str
    policy: str
    rounds: int
    decisions: int
    excluded: dict[str, int]
    duplicate_decisions: int
    fallback_rounds: int
    pass_rate: OutcomeEstimate
    cost_usd: OutcomeEstimate
    ess: float
    ess_fraction: float
    min_propensity: float | None
    max_weight: float
    unsupported_mass: float
    never_logged: list[dict[str, str]]
    per_action: list[ActionFigures]
    warnings: list[str]
    bootstrap: int
    alpha: float
    seed: int
    reward_model: str
    from_offset: int | None = None
    from_time: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: numbers as numbers, NaN (an undefined estimate) as null, the time
        as RFC 3339."""
        d = _finite(asdict(self))
        d["from_time"] = self.from_time.isoformat() if self.from_time else None
        return d

    def render(self) -> list[str]:
        """The plain-text form: a header, a table (pass rate and cost per task by IPS, SNIPS
        and DR with their intervals, and the logged policy's mean on the same rounds), the
        diagnostics, the logged actions' measured figures, then the warnings."""
        left = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.excluded.items()
                         if n)
        lines = [f"policy {self.policy} on namespace {self.namespace}: {self.rounds} of "
                 f"{self.decisions} logged rounds" + (f" ({left})" if left else "")]
        table = [["", "IPS", "SNIPS", "DR", "logged"]]
        for label, est, fmt in (("pass rate", self.pass_rate, _rate),
                                ("cost/task", self.cost_usd, _usd)):
            table.append([label, *(f"{fmt(i.value)} [{fmt(i.low)}, {fmt(i.high)}]"
                                   for i in (est.ips, est.snips, est.dr)), fmt(est.on_policy)])
        widths = [max(len(row[c]) for row in table) + 3 for c in range(len(table[0]))]
        lines += ["  " + "".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                  for row in table]
        min_p = "-" if self.min_propensity is None else f"{self.min_propensity:.4g}"
        lines += [(f"  intervals: {1 - self.alpha:.0%} percentile bootstrap, {self.bootstrap} "
                   f"resamples (seed {self.seed}); USD per task"),
                  (f"  effective sample size {self.ess:.1f} ({self.ess_fraction:.1%} of "
                   f"{self.rounds}), min propensity {min_p}, max weight {self.max_weight:.4g}, "
                   f"{self.fallback_rounds} round(s) answered by a fallback"),
                  f"  reward model (DR): {self.reward_model}",
                  "  measured per logged action (every round that logged it):"]
        lines += [f"    {a.action:24} {a.rounds:6} rounds   pass rate {_rate(a.pass_rate)}   "
                  f"cost/task {_usd(a.cost_usd)}" for a in self.per_action]
        lines += [f"  warning: {w}" for w in self.warnings]
        return lines


def _rate(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def _usd(x: float) -> str:
    return "-" if math.isnan(x) else f"${x:.6f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def estimate(namespace: str, log: JoinedLog, target: TargetPolicy, *,
             n_bootstrap: int = ope.DEFAULT_BOOTSTRAP, alpha: float = ope.DEFAULT_ALPHA,
             seed: int = 0, min_propensity: float = ope.DEFAULT_MIN_PROPENSITY,
             min_ess_fraction: float = ope.DEFAULT_MIN_ESS_FRACTION,
             prior_strength: float = ope.DEFAULT_PRIOR_STRENGTH,
             folds: int = ope.DEFAULT_FOLDS) -> PolicyEstimate:
    """``target``'s pass rate and cost per task on ``log``, with every estimator, interval
    and diagnostic (agents/ope.py; ``seed`` drives the bootstrap and the cross-fitting folds).

    Raises:
        NoDecisions: ``log`` has no decision.
        NothingToEvaluate: no round has an outcome, or the target acts in none of them.
        ValueError: ``target`` returned an action that was not available, or probabilities
            that do not sum to 1.
    """
    if not log.decisions:
        raise NoDecisions(f"namespace {namespace}: no routing decision (ProviderSelected) in the "
                          "log: run tasks through a worker first")
    if not log.rounds:
        raise NothingToEvaluate(f"namespace {namespace}: none of the {log.decisions} decisions has "
                                "an outcome (RewardComputed) yet")
    names: dict[str, int] = {}
    for r in log.rounds:
        for a in (*r.behaviour, r.action):
            names.setdefault(a, len(names))
    kept: list[tuple[Round, dict[str, float]]] = []
    weighable = [r for r in log.rounds if r.behaviour.get(r.action, 0.0) > 0]
    if not weighable:
        raise NothingToEvaluate(f"namespace {namespace}: none of the {len(log.rounds)} rounds "
                                "logs a positive propensity for its action")
    for r in weighable:
        probs = target.probabilities(Decision(
            available=tuple(r.behaviour), behaviour=r.behaviour, q_values=r.q_values,
            task_type=r.task_type, complexity=r.complexity))
        if probs is not None:
            _check(target, r, probs)
            kept.append((r, probs))
    unavailable = len(weighable) - len(kept)
    if not kept:
        raise NothingToEvaluate(f"namespace {namespace}: policy {target.name} cannot act in any of "
                                f"the {len(weighable)} logged rounds (its actions were never "
                                f"available; logged actions: {', '.join(names)})")
    n, k = len(kept), len(names)
    contexts = [(r.task_type, r.complexity) for r, _ in kept]
    actions = np.array([names[r.action] for r, _ in kept], dtype=int)
    behaviour, target_p = np.zeros((n, k)), np.zeros((n, k))
    for i, (r, probs) in enumerate(kept):
        for a, p in r.behaviour.items():
            behaviour[i, names[a]] = p
        for a, p in probs.items():
            target_p[i, names[a]] = p
    rows = np.arange(n)
    weights = ope.importance_weights(target_p[rows, actions], behaviour[rows, actions])
    outcomes = {"pass_rate": np.array([float(r.passed) for r, _ in kept]),
                "cost_usd": np.array([r.cost_usd for r, _ in kept])}
    result: dict[str, OutcomeEstimate] = {}
    for name, y in outcomes.items():
        q = ope.cell_mean_model(contexts, actions, y, k, prior_strength=prior_strength,
                                folds=folds, seed=seed)
        iv = ope.bootstrap_intervals(y, weights, q[rows, actions], np.sum(q * target_p, axis=1),
                                     n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)
        result[name] = OutcomeEstimate(iv["ips"], iv["snips"], iv["dr"], float(y.mean()))
    diag = ope.diagnose(contexts, actions, behaviour, target_p, action_names=list(names),
                        min_propensity=min_propensity, min_ess_fraction=min_ess_fraction)
    warnings = list(diag.warnings)
    if unavailable:
        warnings.append(f"{unavailable} of {len(weighable)} rounds left out: policy {target.name} "
                        "could not act in them (its action was unavailable, e.g. a breaker was "
                        "open); the estimate covers the other rounds")
    if len(weighable) < len(log.rounds):
        warnings.append(f"{len(log.rounds) - len(weighable)} round(s) left out: their logged "
                        "action has no positive logged propensity, so they cannot be weighed")
    action_names = list(names)
    return PolicyEstimate(
        namespace=namespace, policy=target.name, rounds=n, decisions=log.decisions,
        excluded={"no_outcome": log.no_outcome, "no_propensity": len(log.rounds) - len(weighable),
                  "target_unavailable": unavailable},
        duplicate_decisions=log.duplicate_decisions,
        fallback_rounds=sum(r.fallback for r, _ in kept),
        pass_rate=result["pass_rate"], cost_usd=result["cost_usd"],
        ess=diag.ess, ess_fraction=diag.ess / n, min_propensity=diag.min_propensity,
        max_weight=diag.max_weight, unsupported_mass=diag.unsupported_mass,
        never_logged=[{"task_type": c[0], "complexity": c[1], "action": action_names[a]}
                      for c, a in diag.never_logged],
        per_action=_per_action(log.rounds), warnings=warnings, bootstrap=n_bootstrap,
        alpha=alpha, seed=seed,
        reward_model=(f"cell means per (task_type, complexity, action), shrunk toward the "
                      f"action's then the global mean with {prior_strength:g} pseudo-observations, "
                      f"{folds}-fold cross-fitted"))


def _check(target: TargetPolicy, r: Round, probs: dict[str, float]) -> None:
    stray = set(probs) - set(r.behaviour)
    if stray:
        raise ValueError(f"policy {target.name} chose unavailable action(s) {sorted(stray)} for "
                         f"task {r.task_id} (available: {list(r.behaviour)})")
    if not math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9):
        raise ValueError(f"policy {target.name}: probabilities for task {r.task_id} sum to "
                         f"{sum(probs.values())}, not 1")


def _per_action(rounds: list[Round]) -> list[ActionFigures]:
    count: Counter[str] = Counter()
    passed: dict[str, int] = defaultdict(int)
    cost: dict[str, float] = defaultdict(float)
    for r in rounds:
        count[r.action] += 1
        passed[r.action] += r.passed
        cost[r.action] += r.cost_usd
    return [ActionFigures(a, n, passed[a] / n, cost[a] / n) for a, n in sorted(count.items())]


async def read_log(settings: Settings, registry: TopicRegistry, *, from_offset: int | None = None,
                   from_time: datetime | None = None) -> JoinedLog:
    """Read the decisions topic (from ``from_offset`` in every partition, or only decisions
    that occurred at or after ``from_time``) and the whole rewards topic, and :func:`join`
    them. Records that do not decode are skipped (the stages dead-lettered them).

    Raises:
        ValueError: no Kafka broker is resolved in ``settings``.
        LookupError: a topic does not exist (``rmo topics create``).
        TimeoutError: a partition reports no high watermark.
    """
    bootstrap = settings.require_kafka()
    start = ({p: from_offset for p in range(registry.specs["decisions"].partitions)}
             if from_offset is not None else None)

    async def events(role: str, start: dict[int, int] | None) -> list[Envelope]:
        out = []
        async for rec in read_topic(bootstrap, registry.name(role), start=start):
            try:
                e = decode(rec.value, max_bytes=None)
            except CodecError:
                continue
            out.append(e)
        return out

    decisions, rewards = await asyncio.gather(events("decisions", start), events("rewards", None))
    if from_time is not None:
        decisions = [e for e in decisions if e.occurred_at >= from_time]
    return join(decisions, rewards)

