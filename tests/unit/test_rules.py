"""Error patterns and protocol rules (agents/patterns.py, agents/rules.py, agents/outcomes.py).

The consumers run on a real Redis without a broker: a Context without a producer keeps what
they emit in ``tx.emitted``, and :func:`commit` applies a transaction's queued projection
writes the way the stage runner's step 7 does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from redis.asyncio import Redis

from agents.executor import ExecutorStage
from agents.outcomes import Outcomes, Tally
from agents.patterns import (
    DETECT_CONFIDENCE,
    PatternCounts,
    PatternExtractor,
    PatternKey,
    confidence,
    is_truncated,
    pattern_key,
)
from agents.providers.base import Provider, ProviderRequest, ProviderResponse
from agents.rules import (
    MIN_AFTER,
    ActiveRules,
    ProtocolUpdater,
    Rule,
    RuleMonitor,
    RulesProjection,
    RuleState,
    evaluate,
    measure,
    propose,
)
from models.codec import make_event
from models.events import (
    Envelope,
    ErrorLogged,
    PatternDetected,
    ProtocolRuleApplied,
    ProtocolRuleProposed,
    ProtocolRuleRolledBack,
    RewardComputed,
    RuleEvidence,
    TaskAnalyzed,
    TaskFeatures,
    TaskSubmitted,
)
from streams.config import Settings
from streams.keys import Keys
from streams.stage import Context, Tx
from streams.topics import load_topics

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SYNTAX_GEMINI = "SYNTAX|*|string|*|gemini"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


@pytest.fixture
def settings(namespace: str) -> Settings:
    return Settings(namespace=namespace)


def new_tx(settings: Settings, redis: Redis) -> Tx:
    return Tx(Context(settings=settings, keys=Keys(settings.namespace),
                      topics=load_topics(settings.namespace), redis=redis, producer=None))


async def commit(tx: Tx) -> None:
    async with tx.redis.pipeline(transaction=True) as pipe:
        for write in tx.writes:
            write(pipe)
        await pipe.execute()


async def run(consumer, events: Sequence[Envelope], settings: Settings, redis: Redis) -> list[Envelope]:
    """One batch of ``consumer``, live: stage logic, then its projections, committed.
    Returns the emitted events."""
    tx = new_tx(settings, redis)
    handled = [e for e in events if e.event_type in consumer.handles]
    if handled:
        await consumer.process(handled, tx)
    assert not tx.failed, tx.failed
    for projection in consumer.projections:
        await projection.apply(list(events), tx)
    await commit(tx)
    return [e for _, _, e in tx.emitted]


def error(task_id: str, category: str = "SYNTAX", *, provider: str = "gemini",
          task_type: str = "string", complexity: str = "low", minutes: int = 0,
          error_type: str = "SyntaxError", **context: object) -> Envelope:
    err = ErrorLogged(category=category, error_type=error_type, message="line 3: '(' was never closed",
                      agent_id="validator", task_id=task_id,
                      context={"provider": provider, "action": f"{provider}:single",
                               "task_type": task_type, "complexity": complexity, **context})
    return make_event(err, producer="validator", occurred_at=T0 + timedelta(minutes=minutes))


def reward(task_id: str, provider: str | None, passed: bool, task_type: str = "string",
           complexity: str = "low") -> Envelope:
    r = RewardComputed(task_id=task_id, state=f"none|{task_type}|{complexity}", action="a",
                       next_state="s", performance=float(passed), cost_usd=0.0, cost_weight=1.0,
                       reward=float(passed), passed=passed, provider=provider, tokens=1)
    return make_event(r, producer="learning.reward", occurred_at=T0)


# --------------------------------------------------------------------------- extractor


def test_answer_failures_key_by_task_type_and_provider_timeouts_by_complexity() -> None:
    assert pattern_key(error("t1").payload) == PatternKey("SYNTAX", "*", "string", "*", "gemini")
    timeout = ErrorLogged(category="PROVIDER", error_type="timeout", message="no answer",
                          agent_id="executor.provider.grok", task_id="t1",
                          context={"provider": "grok", "complexity": "high", "task_type": "math"})
    assert pattern_key(timeout).id == "PROVIDER|timeout|*|high|*"
    limited = timeout.model_copy(update={"error_type": "rate_limited"})
    assert pattern_key(limited) is None  # the breaker's business
    untyped = error("t1").payload.model_copy(update={"context": {"provider": "gemini"}})
    assert pattern_key(untyped) is None  # no task type: nothing a rule could act on
    assert PatternKey.parse(SYNTAX_GEMINI).id == SYNTAX_GEMINI


def test_confidence_rises_with_frequency_and_falls_with_opportunities() -> None:
    assert [round(confidence(n, n), 3) for n in (3, 4, 9)] == [0.75, 0.8, 0.9]
    assert confidence(3, 10) == pytest.approx(3 / 11)
    # outcomes trail the errors: an occurrence counts once its task's outcome is in
    assert confidence(4, 1) == confidence(1, 1) == 0.5
    assert confidence(3, 0) == 0.0


def test_truncated_means_the_answer_stops_mid_statement() -> None:
    assert is_truncated("def f(x):\n    return (x +")
    assert is_truncated('def f(x):\n    """doc\n')
    assert not is_truncated("def f(x):\n    return x +* 2\n")  # wrong, not cut off
    assert not is_truncated("def f(x):\n    return x\n")
    assert not is_truncated(None)


async def test_a_pattern_is_detected_at_three_tasks_and_confidence_07(settings, redis) -> None:
    extractor = PatternExtractor(settings)
    outcomes = [reward(f"t{i}", "gemini", False) for i in range(3)]
    await run(RuleMonitor(settings), outcomes, settings, redis)
    # two tasks (one of them logs twice): below MIN_OCCURRENCES
    assert await run(extractor, [error("t0"), error("t0", minutes=1), error("t1", minutes=2)],
                     settings, redis) == []
    (detected,) = await run(extractor, [error("t2", minutes=3)], settings, redis)
    p = detected.payload
    assert (detected.event_type, p.pattern, p.occurrences, p.opportunities, p.events) == \
        ("PatternDetected", SYNTAX_GEMINI, 3, 3, 4)
    assert p.confidence == pytest.approx(0.75) and p.confidence >= DETECT_CONFIDENCE
    assert (p.first_seen, p.last_seen) == (T0, T0 + timedelta(minutes=3))
    assert detected.causation_id is not None and detected.correlation_id == SYNTAX_GEMINI
    # once detected, never again
    assert await run(extractor, [error("t3", minutes=4)], settings, redis) == []


async def test_the_detection_id_is_the_same_whoever_detects_it(settings, redis, namespace) -> None:
    """A re-run (a fresh process) and a different tipping error make the same event id, so
    the rules consumer drops the duplicate."""
    await run(RuleMonitor(settings), [reward(f"t{i}", "gemini", False) for i in range(3)],
              settings, redis)
    first = [error("t0"), error("t1"), error("t2")]
    tx = new_tx(settings, redis)
    await PatternExtractor(settings).process(first, tx)
    again = new_tx(settings, redis)
    await PatternExtractor(settings).process(first, again)  # the crash-and-re-run case
    other = new_tx(settings, redis)
    await PatternExtractor(settings).process([error("t1"), error("t2"), error("t3")], other)
    ids = {e.event_id for tx_ in (tx, again, other) for _, _, e in tx_.emitted}
    assert len(ids) == 1


async def test_a_frequent_error_that_is_rare_for_its_opportunities_is_no_pattern(settings, redis) -> None:
    outcomes = [reward(f"t{i}", "gemini", i < 3) for i in range(10)]
    await run(RuleMonitor(settings), outcomes, settings, redis)
    errors = [error(f"t{i}") for i in range(3, 6)]  # 3 of 10: confidence 3/11
    assert await run(PatternExtractor(settings), errors, settings, redis) == []
    h = await redis.hgetall(Keys(settings.namespace).error_pattern(SYNTAX_GEMINI))
    assert PatternCounts.from_hash(h).events == 3


async def test_pattern_counts_do_not_depend_on_partition_order(settings, redis, namespace) -> None:
    """The projection only sums, unions and takes min/max: two orders, one state."""
    errs = [error(f"t{i}", minutes=m, truncated=True) for i, m in enumerate((5, 1, 9, 3))]
    other = Settings(namespace=f"{namespace}-b")
    extractor = PatternExtractor(settings)
    for batch in (errs[:2], errs[2:]):
        await run(extractor, batch, settings, redis)
    for batch in (errs[3:], errs[:3]):
        await run(PatternExtractor(other), batch, other, redis)
    for keys in (Keys(settings.namespace), Keys(other.namespace)):
        h = await redis.hgetall(keys.error_pattern(SYNTAX_GEMINI))
        assert (int(h["events"]), int(h["truncated"]), int(h["first_seen_ms"]), int(h["last_seen_ms"])) == \
            (4, 4, int((T0 + timedelta(minutes=1)).timestamp() * 1000),
             int((T0 + timedelta(minutes=9)).timestamp() * 1000))
    async for key in redis.scan_iter(Keys(other.namespace).pattern()):
        await redis.delete(key)


# --------------------------------------------------------------------------- outcomes


async def test_outcomes_count_verified_tasks_per_type_provider_and_complexity(settings, redis) -> None:
    rewards = [reward("a", "gemini", False), reward("b", "gemini", True), reward("c", "claude", False),
               reward("d", None, False), reward("e", "claude", True, complexity="high")]
    unverified = RewardComputed(**{**rewards[0].payload.model_dump(), "task_id": "u", "verified": False})
    features_only = RewardComputed(**{**rewards[4].payload.model_dump(), "task_id": "f",
                                      "state": "string|high"})  # agents/qlearning.feature_state
    rewards += [make_event(x, producer="learning.reward") for x in (unverified, features_only)]
    await run(RuleMonitor(settings), rewards, settings, redis)
    o = Outcomes.from_hash(await redis.hgetall(Keys(settings.namespace).outcomes))
    assert o.on("string", "gemini") == Tally(2, 1)
    assert o.of_type("string", excluding="gemini") == Tally(3, 1)  # claude only: "-" answered nothing
    assert o.of_type("string") == Tally(6, 3)
    assert (o.of_complexity("low"), o.of_complexity("high")) == (Tally(4, 3), Tally(2, 0))


# --------------------------------------------------------------------------- updater decisions


def outcomes(on: tuple[int, int], others: tuple[int, int]) -> Outcomes:
    return Outcomes({"type\tstring\tgemini\ttasks": on[0], "type\tstring\tgemini\tfailed": on[1],
                     "type\tstring\tclaude\ttasks": others[0], "type\tstring\tclaude\tfailed": others[1]})


AVOID = Rule("avoid_provider", {"task_type": "string", "provider": "gemini"})


def test_avoid_provider_applies_at_confidence_08_when_the_others_fail_less() -> None:
    v = evaluate(AVOID, SYNTAX_GEMINI, 5, PatternCounts(events=5), outcomes((5, 5), (20, 3)), 30.0)
    assert v.decision == "apply"
    ev = v.evidence
    assert (ev.provider_tasks, ev.provider_failed, ev.other_tasks, ev.other_failed) == (5, 5, 20, 3)
    assert ev.confidence == pytest.approx(5 / 6) and ev.estimated_effect == pytest.approx(1 - 3 / 20)


def test_avoid_provider_waits_below_confidence_08_or_without_enough_comparison() -> None:
    # 3 of 3: confidence 0.75 is enough to detect, not to apply
    assert evaluate(AVOID, SYNTAX_GEMINI, 3, PatternCounts(), outcomes((3, 3), (20, 3)), 30.0).decision == "wait"
    few = evaluate(AVOID, SYNTAX_GEMINI, 9, PatternCounts(), outcomes((9, 9), (4, 0)), 30.0)
    assert few.decision == "wait" and "5 needed" in few.reason


def test_avoid_provider_is_rejected_when_the_others_fail_as_often() -> None:
    v = evaluate(AVOID, SYNTAX_GEMINI, 9, PatternCounts(), outcomes((9, 9), (10, 10)), 30.0)
    assert v.decision == "reject" and "would not help" in v.reason


def test_raise_timeout_needs_timeouts_that_ran_to_our_limit() -> None:
    rule = Rule("raise_timeout", {"complexity": "high", "factor": 2.0})
    o = Outcomes({"complexity\thigh\ttasks": 5, "complexity\thigh\tfailed": 5})
    pattern = "PROVIDER|timeout|*|high|*"
    assert evaluate(rule, pattern, 5, PatternCounts(events=6, at_limit=6), o, 30.0).decision == "apply"
    rejected = evaluate(rule, pattern, 5, PatternCounts(events=6, at_limit=1), o, 30.0)
    assert rejected.decision == "reject" and "provider's side" in rejected.reason


def test_the_output_limit_rule_is_proposed_only() -> None:
    p = PatternDetected(pattern=SYNTAX_GEMINI, category="SYNTAX", error_type="*", task_type="string",
                        complexity="*", provider="gemini", occurrences=4, opportunities=4,
                        confidence=0.8, events=4, truncated=3, first_seen=T0, last_seen=T0)
    kinds = [r.kind for r, _ in propose(p)]
    assert kinds == ["avoid_provider", "raise_max_output_tokens"]
    limit = next(r for r, _ in propose(p) if r.kind == "raise_max_output_tokens")
    v = evaluate(limit, SYNTAX_GEMINI, 40, PatternCounts(events=40, truncated=40),
                 outcomes((40, 40), (40, 0)), 30.0)
    assert v.decision == "wait"
    assert [r.kind for r, _ in propose(p.model_copy(update={"truncated": 1}))] == ["avoid_provider"]


def test_an_applied_rule_is_rolled_back_when_the_touched_failure_rate_rises() -> None:
    # applied with 20 string tasks, 4 failed (20 %), 10 of them (2 failed) on other providers
    applied = RuleEvidence(before_tasks=20, before_failed=4, routed_tasks=10, routed_failed=2)
    # since: half the others' tasks failed; gemini finished two it was given before the switch
    worse = outcomes((12, 4), (10 + MIN_AFTER, 2 + MIN_AFTER // 2))
    v = measure(AVOID, applied, worse)
    assert v.decision == "rollback"
    assert (v.evidence.after_tasks, v.evidence.after_failed) == (MIN_AFTER, MIN_AFTER // 2)
    assert v.evidence.measured_effect == pytest.approx(0.2 - 0.5)
    better = outcomes((12, 4), (10 + MIN_AFTER, 2))
    assert measure(AVOID, applied, better).decision == "keep"
    too_early = outcomes((10, 2), (10 + MIN_AFTER - 1, 2 + MIN_AFTER - 1))
    assert measure(AVOID, applied, too_early).decision == "keep"


# --------------------------------------------------------------------------- lifecycle


def rule_event(kind, stage: str, **evidence: int) -> Envelope:
    change = kind(rule_id="avoid_provider:string:gemini", kind="avoid_provider",
                  params={"task_type": "string", "provider": "gemini"}, pattern=SYNTAX_GEMINI,
                  reason=stage, evidence=RuleEvidence(**evidence))
    return make_event(change, producer="test", event_id=f"{stage}-event")


async def test_the_rules_projection_tracks_state_and_the_rules_in_force(settings, redis) -> None:
    keys = Keys(settings.namespace)
    projection = RulesProjection()

    async def apply(*events: Envelope) -> None:
        tx = new_tx(settings, redis)
        await projection.apply(list(events), tx)
        await commit(tx)

    await apply(rule_event(ProtocolRuleProposed, "proposed"),
                rule_event(ProtocolRuleApplied, "applied", before_tasks=20, before_failed=4))
    assert ActiveRules.from_hash(await redis.hgetall(keys.active_rules)).avoided("string") == {"gemini"}
    state = RuleState.from_hash("avoid_provider:string:gemini",
                                await redis.hgetall(keys.rule("avoid_provider:string:gemini")))
    assert (state.state, list(state.stages)) == ("applied", ["proposed", "applied"])
    assert (state.applied.before_tasks, state.applied.before_failed) == (20, 4)
    await apply(rule_event(ProtocolRuleRolledBack, "rolled_back"))
    assert await redis.hgetall(keys.active_rules) == {}
    assert (await redis.hget(keys.rule("avoid_provider:string:gemini"), "state")) == "rolled_back"


async def test_a_detected_pattern_is_proposed_applied_then_rolled_back(settings, redis) -> None:
    """The updater proposes and, with the evidence already in, applies at once; the monitor
    rolls the rule back when the string tasks fail more afterwards."""
    monitor, updater, keys = RuleMonitor(settings), ProtocolUpdater(settings), Keys(settings.namespace)
    history = [reward(f"g{i}", "gemini", False) for i in range(5)] + \
              [reward(f"c{i}", "claude", i >= 2) for i in range(10)]
    await run(monitor, history, settings, redis)
    (detected,) = await run(PatternExtractor(settings), [error(f"g{i}") for i in range(5)], settings, redis)
    emitted = await run(updater, [detected], settings, redis)
    assert [e.event_type for e in emitted] == ["ProtocolRuleProposed", "ProtocolRuleApplied"]
    ev = emitted[1].payload.evidence
    assert (ev.before_tasks, ev.before_failed, ev.routed_tasks, ev.routed_failed) == (15, 7, 10, 2)
    await run(updater, emitted, settings, redis)  # the learning topic delivers them back
    assert ActiveRules.from_hash(await redis.hgetall(keys.active_rules)).avoided("string") == {"gemini"}
    # after: string tasks on claude fail more than the 7/15 before; gemini's last task, decided
    # before the switch, is not the rule's doing and is not counted
    straggler = reward("g9", "gemini", False)
    assert await run(monitor, [straggler] + [reward(f"a{i}", "claude", i % 4 != 0)
                                             for i in range(MIN_AFTER)], settings, redis) == []
    worse = [reward(f"b{i}", "claude", False) for i in range(MIN_AFTER)]
    (rolled,) = await run(monitor, worse, settings, redis)  # its own batch counts
    assert rolled.event_type == "ProtocolRuleRolledBack"
    assert rolled.payload.evidence.after_tasks == 2 * MIN_AFTER
    assert rolled.payload.evidence.measured_effect < 0
    await run(updater, [rolled], settings, redis)
    assert await redis.hgetall(keys.active_rules) == {}
    # a rolled-back rule is no longer measured
    assert await run(monitor, [reward("y", "claude", False)], settings, redis) == []


async def test_outcomes_committed_while_a_proposal_was_in_flight_are_decided_on_a_tick(
        settings, redis) -> None:
    """The monitor's last batch ran before the rule it would apply was projected, and no task
    follows it: the tick decides on what is recorded, caused by no event."""
    monitor, updater, keys = RuleMonitor(settings), ProtocolUpdater(settings), Keys(settings.namespace)
    await run(monitor, [reward(f"g{i}", "gemini", False) for i in range(3)]
              + [reward(f"c{i}", "claude", i >= 2) for i in range(10)], settings, redis)
    (detected,) = await run(PatternExtractor(settings), [error(f"g{i}") for i in range(3)],
                            settings, redis)
    proposed = await run(updater, [detected], settings, redis)
    assert [e.event_type for e in proposed] == ["ProtocolRuleProposed"]  # 3 of 3: waiting
    # the rest of gemini's failures land while the proposal is in flight
    await run(PatternExtractor(settings), [error(f"g{i}") for i in range(3, 6)], settings, redis)
    assert await run(monitor, [reward(f"g{i}", "gemini", False) for i in range(3, 6)],
                     settings, redis) == []
    await run(updater, proposed, settings, redis)  # now projected: proposed
    assert monitor.tick_s is not None and monitor.tick_s > 0
    tx = new_tx(settings, redis)
    await monitor.tick(tx)
    assert not tx.writes
    (applied,) = [e for _, _, e in tx.emitted]
    assert applied.event_type == "ProtocolRuleApplied" and applied.causation_id is None
    assert applied.payload.rule_id == proposed[0].payload.rule_id
    # not remembered: until the decision is projected, a tick emits it again, with the same id
    again = new_tx(settings, redis)
    await monitor.tick(again)
    assert [e.event_id for _, _, e in again.emitted] == [applied.event_id]
    await run(updater, [applied], settings, redis)
    assert ActiveRules.from_hash(await redis.hgetall(keys.active_rules)).avoided("string") == {"gemini"}
    done = new_tx(settings, redis)
    await monitor.tick(done)
    assert done.emitted == []


# --------------------------------------------------------------------------- executor


class Answers(Provider):
    """Answers every call after ``hang_s`` seconds; records the requests."""

    kind = "fake"

    def __init__(self, pid: str, hang_s: float = 0.0) -> None:
        self.id, self.model, self.hang_s = pid, "grok-4", hang_s
        self.requests: list[ProviderRequest] = []

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        self.requests.append(request)
        await asyncio.sleep(self.hang_s)
        return ProviderResponse(text="def f():\n    return 1\n", model=self.model, input_tokens=1,
                                output_tokens=1, cost_usd=0.0, latency_ms=self.hang_s * 1000)


def analyzed(i: int, task_type: str, complexity: str = "low") -> Envelope:
    task = TaskSubmitted(task_id=f"x{i}", kind="code", prompt="def f():\n", entry_point="f")
    a = TaskAnalyzed(task_id=task.task_id, analyses=[], action_items=[], task=task,
                     features=TaskFeatures(task_type=task_type, complexity=complexity))
    return make_event(a, producer="analyzer", cause=make_event(task, producer="test"))


async def execute(settings: Settings, redis: Redis, providers: list[Provider],
                  events: list[Envelope], rules: list[Rule]) -> list[Envelope]:
    keys = Keys(settings.namespace)
    await redis.delete(keys.active_rules)
    if rules:
        await redis.hset(keys.active_rules, mapping={
            r.id: orjson.dumps({"kind": r.kind, "params": dict(r.params)}).decode() for r in rules})
    stage = ExecutorStage({p.id: p for p in providers}, settings)
    tx = new_tx(settings, redis)
    await stage.process(events, tx)
    assert not tx.failed, tx.failed
    return [e for _, _, e in tx.emitted]


def chosen(events: list[Envelope]) -> dict[str, str]:
    return {e.payload.task_id: e.payload.action for e in events if e.event_type == "ProviderSelected"}


@pytest.fixture
def exploring(namespace: str) -> Settings:
    """Every usable action equally likely, so a provider a rule does not remove gets chosen."""
    return Settings(namespace=namespace, sandbox="off", strategies=("single",), policy="random",
                    propensity_floor=0.0)


async def test_the_executor_does_not_choose_an_avoided_provider_for_that_task_type(exploring, redis) -> None:
    providers = [Answers("gemini"), Answers("claude")]
    strings = [analyzed(i, "string") for i in range(30)]
    maths = [analyzed(100 + i, "math") for i in range(30)]
    without = chosen(await execute(exploring, redis, providers, strings, []))
    assert "gemini:single" in without.values()  # the policy does pick it when allowed
    with_rule = chosen(await execute(exploring, redis, providers, strings + maths, [AVOID]))
    assert {with_rule[f"x{i}"] for i in range(30)} == {"claude:single"}
    assert "gemini:single" in {with_rule[f"x{100 + i}"] for i in range(30)}  # other types keep it


async def test_a_rule_that_would_leave_no_action_is_ignored(exploring, redis) -> None:
    out = await execute(exploring, redis, [Answers("gemini")], [analyzed(0, "string")], [AVOID])
    assert chosen(out) == {"x0": "gemini:single"}


async def test_raise_timeout_gives_that_complexity_longer(exploring, redis) -> None:
    s = exploring.model_copy(update={"provider_timeout_s": 0.2, "max_attempts": 1, "max_fallbacks": 0})
    slow = Rule("raise_timeout", {"complexity": "high", "factor": 3.0})
    events = [analyzed(0, "math", "high"), analyzed(1, "math", "low")]
    out = await execute(s, redis, [Answers("grok", hang_s=0.3)], events, [slow])
    answered = {e.payload.task_id: e.payload.chosen for e in out if e.event_type == "TaskExecuted"}
    assert answered == {"x0": "grok", "x1": None}
    (timeout,) = [e.payload for e in out if e.event_type == "ErrorLogged"]
    assert (timeout.error_type, timeout.context["complexity"], timeout.context["task_type"]) == \
        ("timeout", "low", "math")


async def test_an_occurrence_counts_once_its_outcome_is_recorded(settings, redis) -> None:
    """Errors arrive before their tasks' rewards: three errors without outcomes are no
    evidence; once the outcomes are in, the next error detects 3 of 3, its own not counted."""
    extractor = PatternExtractor(settings)
    assert await run(extractor, [error(f"t{i}") for i in range(3)], settings, redis) == []
    await run(RuleMonitor(settings), [reward(f"t{i}", "gemini", False) for i in range(3)],
              settings, redis)
    (detected,) = await run(extractor, [error("t3")], settings, redis)
    assert (detected.payload.occurrences, detected.payload.opportunities) == (3, 3)


async def test_the_outcome_that_completes_a_pattern_detects_it(settings, redis) -> None:
    """The errors came first and were too few with their outcomes missing; the batch of
    rewards that brings their outcomes detects the pattern (nothing else may follow it)."""
    assert await run(PatternExtractor(settings), [error(f"t{i}") for i in range(4)],
                     settings, redis) == []
    (detected,) = await run(RuleMonitor(settings), [reward(f"t{i}", "gemini", False) for i in range(4)],
                            settings, redis)
    p = detected.payload
    assert (detected.event_type, p.pattern, p.occurrences, p.opportunities) == \
        ("PatternDetected", SYNTAX_GEMINI, 4, 4)
    assert detected.causation_id is not None
