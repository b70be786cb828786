"""The protocol updater (Fractal-RMO learning subsystem; SPEC §4 learning, §7): a detected
error pattern (agents/patterns.py) proposes a rule; the rule is applied only when the
pattern's confidence reaches :data:`APPLY_CONFIDENCE` (0.8) **and** its evaluation on the
recorded tasks it would have touched is positive; an applied rule changes what the executor
does (agents/executor.py, the lines marked ``# rules``) and is rolled back when its measured
effect turns negative.

Rules by pattern, and how each is evaluated on history:

- answers of provider P to task type T fail (SYNTAX, LOGIC, RUNTIME, ...):
  ``avoid_provider`` {task_type T, provider P}: the executor does not choose an action that
  calls P for T while another action is usable (a fallback, asked only when no provider
  of the action answered, may still be P). Evaluated by T's failure rate on P against
  its rate on the other providers; measured on the T tasks other providers answered since.
- provider calls of tasks of complexity C time out (PROVIDER ``timeout``): ``raise_timeout``
  {complexity C, factor 2}: those calls get twice the provider timeout. Evaluated by the
  share of those timeouts that ran to the executor's own limit; measured on C's tasks.
- SYNTAX failures of P on T, mostly answers cut off mid-statement, also propose
  ``raise_max_output_tokens`` {factor 2}, which cannot be evaluated (below).

``raise_max_output_tokens`` stays proposed: whether a cut-off answer hit the output limit is
not in any event (a call's ``output_tokens`` is recorded, the limit it ran under is not, and a
simulated or real model also stops mid-answer for other reasons), so no history can test it.

**Lifecycle**, all on the learning topic keyed by rule id, each transition's event id derived
from (rule id, transition), so it happens once however often or by whom it is decided:

1. :class:`ProtocolUpdater` (learning topic, live only): each ``PatternDetected`` proposes
   its rules (``ProtocolRuleProposed``) and evaluates them at once as in step 2. A rule id
   names its kind and parameters (``avoid_provider:string:gemini``), so two patterns asking
   for the same rule propose it once.
2. :class:`RuleMonitor` (rewards topic, after every batch of completed tasks and every
   :data:`RULES_TICK_S` in each worker, live only; the tick counts the outcomes of batches
   that ran while a proposal was still in flight when no task follows them): evaluates each
   proposed rule on the outcomes recorded so far (agents/outcomes.py):
   ``ProtocolRuleApplied`` (evidence: the evaluation and the touched scope's figures at that
   moment), ``ProtocolRuleRejected`` when the evaluation is conclusively not positive, or
   nothing yet (waiting for confidence or evidence). For each applied rule it measures the
   failure rate of the tasks it touches since application against the rate before; once at
   least :data:`MIN_AFTER` tasks are in, a rate that rose is ``ProtocolRuleRolledBack``.
3. :class:`RulesProjection` (learning topic): each rule's state and evidence, and the hash of
   rules in force that the executor reads once per batch (:class:`ActiveRules`).

A rule is proposed once per pattern and never re-proposed after a rejection or a rollback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import orjson

from agents.outcomes import ANY, OutcomeChanges, Outcomes, OutcomesProjection, Tally
from agents.patterns import (
    ANSWER_CATEGORIES,
    PatternCounts,
    PatternKey,
    confidence,
    detect,
    occurrences,
)
from models.codec import derive_event_id, make_event
from models.events import (
    Envelope,
    PatternDetected,
    ProtocolRuleApplied,
    ProtocolRuleProposed,
    ProtocolRuleRejected,
    ProtocolRuleRolledBack,
    RuleChange,
    RuleEvidence,
    RuleKind,
)
from streams.config import Settings
from streams.stage import Consumer, Tx

APPLY_CONFIDENCE = 0.8
"""The protocol updater's confidence threshold (SPEC §4, §7)."""
MIN_EVIDENCE = 5
"""Recorded tasks of the task type on other providers needed to compare with."""
MIN_AFTER = 20
"""Touched tasks after application before the measured effect can roll a rule back (fewer
would let the noise of a handful of tasks undo a rule)."""
TIMEOUT_FACTOR = 2.0
OUTPUT_TOKENS_FACTOR = 2.0
AT_LIMIT_MIN_SHARE = 0.5
"""A timeout pattern is worth a longer wait when at least this share of its timeouts ran to
the executor's limit (the others ended on the provider's side)."""
TRUNCATED_MIN_SHARE = 0.5
"""A SYNTAX pattern also suggests a larger output limit when at least this share of its
errors are answers cut off mid-statement."""

STAGES: dict[str, str] = {
    "ProtocolRuleProposed": "proposed", "ProtocolRuleApplied": "applied",
    "ProtocolRuleRejected": "rejected", "ProtocolRuleRolledBack": "rolled_back",
}
"""Rule event type -> the state it puts its rule in."""
CATCH_UP_POLLS = 20
CATCH_UP_POLL_S = 0.1
"""How long the updater waits (polls x seconds) for the outcomes a detection saw to be
committed before evaluating its rules; past that it evaluates what it reads."""
EVALUATED = frozenset({"avoid_provider", "raise_timeout"})
"""Rule kinds :func:`evaluate` can decide; any other stays proposed."""
RULES_TICK_S = 5.0
"""Seconds between the monitor's decisions that no batch causes (:meth:`RuleMonitor.tick`)."""
UPDATER = "learning.rules"
MONITOR = "learning.outcomes"

State = Literal["proposed", "applied", "rejected", "rolled_back"]


@dataclass(frozen=True)
class Rule:
    """A protocol rule: ``kind`` and ``params`` as in :class:`models.events.RuleChange`."""

    kind: RuleKind
    params: Mapping[str, str | float]

    @property
    def id(self) -> str:
        """``{kind}`` followed by its identifying parameters, e.g. ``avoid_provider:string:gemini``."""
        match self.kind:
            case "avoid_provider":
                return f"avoid_provider:{self.params['task_type']}:{self.params['provider']}"
            case "raise_timeout":
                return f"raise_timeout:{self.params['complexity']}"
        return self.kind

    def scope(self, outcomes: Outcomes) -> Tally:
        """The recorded tasks the rule touches: its task type, or its complexity."""
        if self.kind == "avoid_provider":
            return outcomes.of_type(str(self.params["task_type"]))
        if self.kind == "raise_timeout":
            return outcomes.of_complexity(str(self.params["complexity"]))
        return Tally()

    def routed(self, outcomes: Outcomes) -> Tally:
        """The tasks of :meth:`scope` that went the way the rule routes them: for
        ``avoid_provider`` those another provider answered (a task decided before the rule
        applied but finished after it is then counted only if it went that way too, so
        tasks in flight at the switch do not pass for the rule's), else the whole scope."""
        if self.kind == "avoid_provider":
            return outcomes.of_type(str(self.params["task_type"]),
                                    excluding=str(self.params["provider"]))
        return self.scope(outcomes)


def propose(p: PatternDetected) -> list[tuple[Rule, str]]:
    """The rules a detected pattern suggests, each with the reason in words (module table)."""
    out: list[tuple[Rule, str]] = []
    seen = f"{p.occurrences} of {p.opportunities} (confidence {p.confidence:.2f})"
    if p.category in ANSWER_CATEGORIES and p.provider != ANY:
        reason = (f"{p.category} failures of {p.provider}'s answers to {p.task_type} tasks in "
                  f"{seen}: route {p.task_type} tasks away from {p.provider}")
        out.append((Rule("avoid_provider", {"task_type": p.task_type, "provider": p.provider}),
                    reason))
        if p.category == "SYNTAX" and p.events and p.truncated / p.events >= TRUNCATED_MIN_SHARE:
            reason = (f"{p.truncated} of {p.events} SYNTAX errors are answers cut off "
                      f"mid-statement: a {OUTPUT_TOKENS_FACTOR:g}x output limit may let them "
                      "finish; proposed only: no event records whether an answer used its "
                      "whole output limit, so no history can test it")
            out.append((Rule("raise_max_output_tokens", {"factor": OUTPUT_TOKENS_FACTOR}), reason))
    elif p.category == "PROVIDER" and p.error_type == "timeout" and p.complexity != ANY:
        reason = (f"provider calls of {p.complexity}-complexity tasks timed out in {seen}: "
                  f"give them {TIMEOUT_FACTOR:g}x the provider timeout")
        out.append((Rule("raise_timeout", {"complexity": p.complexity, "factor": TIMEOUT_FACTOR}),
                    reason))
    return out


@dataclass(frozen=True)
class Verdict:
    """A decision on a rule: ``apply``, ``reject``, ``wait`` (proposed rules), ``rollback``
    or ``keep`` (applied rules), why, and the figures."""

    decision: Literal["apply", "reject", "wait", "rollback", "keep"]
    reason: str
    evidence: RuleEvidence


def _pct(t: Tally) -> str:
    return f"{t.failed}/{t.tasks} failed ({t.rate:.0%})"


def evaluate(rule: Rule, pattern: str, found: int, counts: PatternCounts,
             outcomes: Outcomes, timeout_s: float) -> Verdict:
    """Whether a proposed rule applies now, from its ``pattern`` (the key it was proposed
    for), that pattern's occurrences ``found`` (:func:`agents.patterns.occurrences`) and
    ``counts``, and the recorded ``outcomes``. ``timeout_s``: the executor's provider timeout
    (s), for the reason's words."""
    key = PatternKey.parse(pattern)
    opportunities = key.opportunities(outcomes)
    conf = confidence(found, opportunities)
    base = {"confidence": conf, "occurrences": found, "opportunities": opportunities}
    waiting = f"waiting: confidence {conf:.2f} < {APPLY_CONFIDENCE}"
    if rule.kind == "avoid_provider":
        task_type, provider = str(rule.params["task_type"]), str(rule.params["provider"])
        on, others = outcomes.on(task_type, provider), outcomes.of_type(task_type, excluding=provider)
        effect = on.rate - others.rate
        evidence = RuleEvidence(**base, provider_tasks=on.tasks, provider_failed=on.failed,
                                other_tasks=others.tasks, other_failed=others.failed,
                                estimated_effect=effect)
        if others.tasks < MIN_EVIDENCE:
            return Verdict("wait", f"waiting: {others.tasks} recorded {task_type} tasks on other "
                           f"providers, {MIN_EVIDENCE} needed to compare with", evidence)
        if effect <= 0:
            return Verdict("reject", f"{task_type} tasks fail as often on the other providers "
                           f"({_pct(others)}) as on {provider} ({_pct(on)}): avoiding "
                           f"{provider} would not help", evidence)
        if conf < APPLY_CONFIDENCE:
            return Verdict("wait", waiting, evidence)
        return Verdict("apply", f"{task_type} tasks on {provider}: {_pct(on)}; on the other "
                       f"providers: {_pct(others)}: routing them away avoids an estimated "
                       f"{effect:.0%} failure rate on the tasks {provider} would have answered",
                       evidence)
    if rule.kind == "raise_timeout":
        share = counts.at_limit / counts.events if counts.events else 0.0
        evidence = RuleEvidence(**base, timeouts=counts.events, timeouts_at_limit=counts.at_limit,
                                estimated_effect=share)
        if counts.events >= found and share < AT_LIMIT_MIN_SHARE:
            return Verdict("reject", f"{counts.at_limit} of {counts.events} timeouts ran to the "
                           f"executor's {timeout_s:g} s limit: the others ended on the provider's "
                           "side, where a longer wait does not help", evidence)
        if conf < APPLY_CONFIDENCE:
            return Verdict("wait", waiting, evidence)
        return Verdict("apply", f"{counts.at_limit} of {counts.events} timeouts ran to the "
                       f"executor's {timeout_s:g} s limit: {rule.params['factor']:g}x gives those "
                       "calls the time they lacked", evidence)
    return Verdict("wait", "proposed only: no event records whether an answer used its whole "
                   "output limit, so no history can test this rule", RuleEvidence(**base))


def measure(rule: Rule, applied: RuleEvidence, outcomes: Outcomes) -> Verdict:
    """The effect of an applied rule so far, from its ``ProtocolRuleApplied`` evidence
    (``applied``): the failure rate of the tasks it touched since (:meth:`Rule.routed`, less
    those counted then: ``routed_tasks``/``routed_failed``) against the rate of its whole scope
    before (``before_tasks``/``before_failed``). ``rollback`` once :data:`MIN_AFTER` tasks
    are in and the rate rose."""
    before = Tally(applied.before_tasks or 0, applied.before_failed or 0)
    after = rule.routed(outcomes) - Tally(applied.routed_tasks or 0, applied.routed_failed or 0)
    effect = before.rate - after.rate
    evidence = RuleEvidence(before_tasks=before.tasks, before_failed=before.failed,
                            after_tasks=after.tasks, after_failed=after.failed,
                            measured_effect=effect)
    if after.tasks < MIN_AFTER or effect >= 0:
        return Verdict("keep", f"measured: before {_pct(before)}, after {_pct(after)}", evidence)
    return Verdict("rollback", f"the failure rate of the tasks it touches rose from "
                   f"{before.rate:.0%} ({before.failed}/{before.tasks}) before to {after.rate:.0%} "
                   f"({after.failed}/{after.tasks}) after it was applied", evidence)


@dataclass(frozen=True)
class RuleState:
    """One rule's projected hash, read: its state and, per stage reached (``proposed``,
    ``applied``, ``rejected``, ``rolled_back``), when (RFC 3339), why and the evidence."""

    id: str
    rule: Rule
    pattern: str
    state: State
    stages: dict[str, tuple[str, str, RuleEvidence]] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, rule_id: str, h: Mapping[str, str]) -> RuleState:
        stages = {s: (h[f"{s}_at"], h.get(f"{s}_reason", ""),
                      RuleEvidence.model_validate(orjson.loads(h.get(f"{s}_evidence", "{}"))))
                  for s in STAGES.values() if f"{s}_at" in h}
        return cls(rule_id, Rule(h["kind"], orjson.loads(h["params"])), h["pattern"],
                   h["state"], stages)  # type: ignore[arg-type]

    @property
    def applied(self) -> RuleEvidence:
        """The evidence it was applied with (raises KeyError when it was not)."""
        return self.stages["applied"][2]


class RulesProjection:
    """From the learning topic (one partition, one order): ``{ns}:learn:detected`` (pattern
    key -> its first PatternDetected payload), ``{ns}:learn:rule:{id}`` (``kind``, ``params``
    JSON, ``pattern``, ``state``, and per stage reached ``{stage}_at``, ``{stage}_reason``,
    ``{stage}_evidence`` JSON), the ``{ns}:learn:rules`` index and ``{ns}:learn:active``
    (rule id -> ``{"kind", "params"}`` of each applied rule not rolled back)."""

    name = "rules"

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        detected: dict[str, str] = {}
        rules: dict[str, dict[str, str]] = {}
        active: list[tuple[str, str | None]] = []  # in event order: (rule id, value or None)
        for e in events:
            if e.event_type == "PatternDetected":
                detected.setdefault(e.payload.pattern, orjson.dumps(e.payload.model_dump(mode="json")).decode())
                continue
            stage = STAGES.get(e.event_type)
            if stage is None:
                continue
            c: RuleChange = e.payload
            fields = rules.setdefault(c.rule_id, {})
            if stage == "proposed":
                fields |= {"kind": c.kind, "params": orjson.dumps(c.params).decode(),
                           "pattern": c.pattern}
            fields |= {"state": stage, f"{stage}_at": e.occurred_at.isoformat(),
                       f"{stage}_reason": c.reason,
                       f"{stage}_evidence": c.evidence.model_dump_json(exclude_none=True)}
            if stage == "applied":
                active.append((c.rule_id, orjson.dumps({"kind": c.kind, "params": c.params}).decode()))
            elif stage == "rolled_back":
                active.append((c.rule_id, None))
        if not (detected or rules):
            return

        def write(pipe) -> None:
            k = tx.keys
            for pattern, value in detected.items():
                pipe.hsetnx(k.detected, pattern, value)
            for rule_id, fields in rules.items():
                pipe.sadd(k.rules, rule_id)
                pipe.hset(k.rule(rule_id), mapping=fields)
            for rule_id, value in active:
                if value is None:
                    pipe.hdel(k.active_rules, rule_id)
                else:
                    pipe.hset(k.active_rules, rule_id, value)

        tx.write(write)


@dataclass(frozen=True)
class ActiveRules:
    """The rules in force, as the executor reads them (``{ns}:learn:active``)."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> ActiveRules:
        parsed = (orjson.loads(v) for _, v in sorted(h.items()))
        return cls(tuple(Rule(d["kind"], d["params"]) for d in parsed))

    def avoided(self, task_type: str) -> frozenset[str]:
        """Providers whose actions the executor should not choose for ``task_type``."""
        return frozenset(str(r.params["provider"]) for r in self.rules
                         if r.kind == "avoid_provider" and r.params["task_type"] == task_type)

    def timeout_factor(self, complexity: str) -> float:
        """What the provider timeout is multiplied by for tasks of ``complexity`` (1.0: none)."""
        return max((float(r.params["factor"]) for r in self.rules
                    if r.kind == "raise_timeout" and r.params["complexity"] == complexity),
                   default=1.0)


def _rule_event(payload: RuleChange, producer: str, cause: Envelope | None, stage: str) -> Envelope:
    return make_event(payload, producer=producer, cause=cause, correlation_id=payload.rule_id,
                      event_id=derive_event_id(payload.rule_id, "learning.rule", 0, stage))


DECISIONS: dict[str, type[RuleChange]] = {"apply": ProtocolRuleApplied, "reject": ProtocolRuleRejected,
                                          "rollback": ProtocolRuleRolledBack}


def decision_event(rule: Rule, pattern: str, v: Verdict, outcomes: Outcomes, producer: str,
                   cause: Envelope | None) -> Envelope | None:
    """The event of a verdict (None for ``wait`` and ``keep``). An applied rule's evidence
    also records its touched scope's figures now (``before_*``), which its measurement
    compares with later."""
    kind = DECISIONS.get(v.decision)
    if kind is None:
        return None
    evidence = v.evidence
    if v.decision == "apply":
        scope, routed = rule.scope(outcomes), rule.routed(outcomes)
        evidence = evidence.model_copy(update={
            "before_tasks": scope.tasks, "before_failed": scope.failed,
            "routed_tasks": routed.tasks, "routed_failed": routed.failed})
    change = kind(rule_id=rule.id, kind=rule.kind, params=dict(rule.params), pattern=pattern,
                  reason=v.reason, evidence=evidence)
    return _rule_event(change, producer, cause, STAGES[kind.__name__])


class ProtocolUpdater(Consumer):
    """Consumer of the learning topic: projects rules (:class:`RulesProjection`) and, live,
    proposes the rules of each ``PatternDetected`` (module docstring, step 1) and evaluates
    them at once, so a rule whose evidence is already in need not wait for the next task."""

    name = UPDATER
    source = "learning"
    handles = frozenset({"PatternDetected"})
    projections = (RulesProjection(),)

    def __init__(self, settings: Settings) -> None:
        self.timeout_s = settings.provider_timeout_s

    async def handle(self, event: Envelope, tx: Tx) -> None:
        p: PatternDetected = event.payload
        k = tx.keys
        key = PatternKey.parse(p.pattern)
        # the detector counted outcomes of a batch it had not committed yet (it produces
        # before it commits, streams/stage.py): wait, briefly, to read at least what it saw
        for _ in range(CATCH_UP_POLLS):
            found, outcomes = await occurrences(tx.redis, k, [p.pattern])
            if key.opportunities(outcomes) >= p.opportunities:
                break
            await asyncio.sleep(CATCH_UP_POLL_S)
        counts = PatternCounts.from_hash(await tx.redis.hgetall(k.error_pattern(p.pattern)))
        evidence = RuleEvidence(confidence=p.confidence, occurrences=p.occurrences,
                                opportunities=p.opportunities)
        for rule, reason in propose(p):
            proposed = ProtocolRuleProposed(rule_id=rule.id, kind=rule.kind, params=dict(rule.params),
                                            pattern=p.pattern, reason=reason, evidence=evidence)
            tx.emit("learning", _rule_event(proposed, UPDATER, event, "proposed"), key=rule.id)
            verdict = evaluate(rule, p.pattern, found[p.pattern], counts, outcomes, self.timeout_s)
            decided = decision_event(rule, p.pattern, verdict, outcomes, UPDATER, event)
            if decided is not None:
                tx.emit("learning", decided, key=rule.id)


class RuleMonitor(Consumer):
    """Consumer of the rewards topic: projects task outcomes (agents/outcomes.py) and, live,
    after each batch of completed tasks, counting that batch too: detects the error patterns
    its outcomes complete (an error arrives before its task's outcome, so the last evidence
    of a pattern may be a reward; agents/patterns.py), decides on proposed rules and measures
    applied ones (module docstring, step 2); and every ``tick_s`` decides on what is recorded."""

    name = MONITOR
    source = "rewards"
    tick_s = RULES_TICK_S
    handles = frozenset({"RewardComputed"})
    projections = (OutcomesProjection(),)

    def __init__(self, settings: Settings) -> None:
        self.timeout_s = settings.provider_timeout_s
        # (rule id, decision) this process emitted: the projection may not show them yet
        self._decided: set[tuple[str, str]] = set()
        self._detected: set[str] = set()

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        k = tx.keys
        changes = OutcomesProjection.changes(events)
        touched = sorted(p for p in await tx.redis.smembers(k.error_patterns)
                         if PatternKey.parse(p).scope in changes.members)
        self._detected.update(await detect(tx, touched, events[-1], outcomes=changes,
                                           skip=self._detected))
        await self._decide(tx, changes, events[-1], remember=True)

    async def tick(self, tx: Tx) -> None:
        """Decide again on the outcomes recorded so far, caused by no event (module
        docstring, step 2). A batch's outcomes committed while a rule's proposal was in
        flight (not projected yet) are counted by the next batch, or by this when none
        follows. What it emits is not remembered in ``_decided``: if its production fails,
        the next tick emits it again (same event ids)."""
        await self._decide(tx, OutcomeChanges(), None, remember=False)

    async def _decide(self, tx: Tx, changes: OutcomeChanges, cause: Envelope | None, *,
                      remember: bool) -> None:
        """Evaluate each proposed rule and measure each applied one (module docstring, step
        2) on the recorded outcomes plus ``changes`` (a batch not committed yet), skipping
        the decisions this process emitted; ``remember``: record the ones emitted now."""
        k = tx.keys
        ids = sorted(await tx.redis.smembers(k.rules))
        if not ids:
            return
        pipe = tx.redis.pipeline(transaction=False)
        for rule_id in ids:
            pipe.hgetall(k.rule(rule_id))
        states = [RuleState.from_hash(i, h) for i, h in zip(ids, await pipe.execute()) if h]
        # a proposed-only rule (evaluate's last case) always waits: no need to read its pattern
        proposed = [s for s in states if s.state == "proposed" and s.rule.kind in EVALUATED]
        pipe = tx.redis.pipeline(transaction=False)
        for s in proposed:
            pipe.hgetall(k.error_pattern(s.pattern))
        counts = await pipe.execute() if proposed else []
        found, outcomes = await occurrences(tx.redis, k, sorted({s.pattern for s in proposed}),
                                            outcomes=changes)
        verdicts = [(s, evaluate(s.rule, s.pattern, found[s.pattern], PatternCounts.from_hash(h),
                                 outcomes, self.timeout_s))
                    for s, h in zip(proposed, counts)]
        verdicts += [(s, measure(s.rule, s.applied, outcomes)) for s in states if s.state == "applied"]
        for s, v in verdicts:
            if (s.id, v.decision) in self._decided:
                continue
            decided = decision_event(s.rule, s.pattern, v, outcomes, MONITOR, cause)
            if decided is not None:
                tx.emit("learning", decided, key=s.id)
                if remember:
                    self._decided.add((s.id, v.decision))
