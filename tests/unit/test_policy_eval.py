"""streams/policy_eval.py and agents/target_policies.py: rounds joined from logged events, the
target policies, and the estimate's bookkeeping (no broker: events built in memory)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agents import target_policies as tp
from models.codec import make_event
from models.events import FallbackSelected, ProviderSelected, RewardComputed
from streams.policy_eval import NoDecisions, NothingToEvaluate, estimate, join

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACTIONS = ["a:single", "b:single", "all:majority"]


def decision(task_id: str, action: str, probs: dict[str, float], *, features: bool = True,
             q: dict[str, float] | None = None, t: int = 0, task_type: str = "math"):
    state = f"none|{task_type}|low"
    return make_event(ProviderSelected(
        task_id=task_id, state=state, action=action, providers=[action.split(":")[0]],
        strategy=action.split(":")[1], policy="epsilon-greedy", epsilon=0.5, explored=True,
        action_probabilities=probs, q_values=q or {a: 0.0 for a in probs},
        features={"task_type": task_type, "complexity": "low"} if features else {}),
        producer="executor.policy", occurred_at=T0 + timedelta(seconds=t))


def reward(task_id: str, action: str, passed: bool, cost: float):
    return make_event(RewardComputed(
        task_id=task_id, state="none|math|low", action=action, next_state="a|math|low",
        performance=float(passed), cost_usd=cost, cost_weight=10.0, reward=float(passed) - cost,
        passed=passed, provider=action.split(":")[0], tokens=10), producer="learning.reward")


def uniform_log(n: int, seed: int = 0):
    """n uniformly routed tasks over ACTIONS; a passes 80 %, b 40 %, all:majority 60 %."""
    rng = np.random.default_rng(seed)
    rate = {"a:single": 0.8, "b:single": 0.4, "all:majority": 0.6}
    cost = {"a:single": 0.01, "b:single": 0.002, "all:majority": 0.012}
    probs = {a: 1 / 3 for a in ACTIONS}
    decisions, rewards = [], []
    for i in range(n):
        a = ACTIONS[int(rng.integers(3))]
        decisions.append(decision(f"t{i}", a, probs, t=i,
                                  task_type=("math", "string")[i % 2]))
        rewards.append(reward(f"t{i}", a, bool(rng.random() < rate[a]), cost[a]))
    return decisions, rewards


def test_join_uses_the_first_decision_and_outcome_and_parses_old_states() -> None:
    probs = {"a:single": 0.6, "b:single": 0.4}
    first = decision("t1", "a:single", probs, t=2)
    again = decision("t1", "b:single", probs, t=3)  # a re-decided copy: ignored, counted
    old = decision("t2", "b:single", probs, features=False, t=1, task_type="string")
    pending = decision("t3", "a:single", probs, t=4)  # no reward yet
    fallback = make_event(FallbackSelected(task_id="t2", action="b:single", from_providers=["b"],
                                           to_provider="a", reason="b: server_error", attempt=1),
                          producer="executor.fallback")
    log = join([first, again, old, pending, fallback],
               [reward("t1", "a:single", True, 0.01), reward("t1", "a:single", False, 0.5),
                reward("t2", "b:single", False, 0.02)])
    assert (log.decisions, log.no_outcome, log.duplicate_decisions) == (3, 1, 1)
    assert [r.task_id for r in log.rounds] == ["t2", "t1"]  # by decision time
    t2, t1 = log.rounds
    assert (t2.task_type, t2.complexity, t2.fallback) == ("string", "low", True)
    assert (t1.action, t1.passed, t1.cost_usd, t1.fallback) == ("a:single", True, 0.01, False)


def test_join_takes_the_copy_whose_outcome_was_recorded() -> None:
    probs = {"a:single": 0.5, "b:single": 0.5}
    log = join([decision("t", "a:single", probs, t=1), decision("t", "b:single", probs, t=2)],
               [reward("t", "b:single", True, 0.01)])
    assert [(r.action, r.occurred_at) for r in log.rounds] == \
        [("b:single", T0 + timedelta(seconds=2))]
    assert log.duplicate_decisions == 1


def test_a_round_without_a_logged_propensity_is_left_out() -> None:
    decisions, rewards = uniform_log(30)
    decisions.append(decision("odd", "b:single", {"a:single": 1.0, "b:single": 0.0}, t=99))
    rewards.append(reward("odd", "b:single", True, 0.002))
    est = estimate("ns", join(decisions, rewards), tp.resolve("random"), n_bootstrap=20)
    assert est.rounds == 30 and est.excluded["no_propensity"] == 1
    assert any("no positive logged propensity" in w for w in est.warnings)


def test_target_policies() -> None:
    d = tp.Decision(available=("a:single", "b:single", "all:majority"),
                    behaviour={"a:single": 0.1, "b:single": 0.8, "all:majority": 0.1},
                    q_values={"a:single": 0.5, "b:single": 0.7, "all:majority": 0.7},
                    task_type="math", complexity="low")
    assert tp.resolve("provider:a").probabilities(d) == {"a:single": 1.0}
    assert tp.resolve("provider:zzz").probabilities(d) is None
    assert tp.resolve("random").probabilities(d) == pytest.approx({a: 1 / 3 for a in d.available})
    assert tp.resolve("greedy").probabilities(d) == {"b:single": 1.0}  # tie: the earlier one
    assert tp.resolve("logged").probabilities(d) == d.behaviour
    for bad, match in (("nosuch", "known: provider:ID, random, greedy, logged"),
                       ("provider", "provider:ID"), ("random:3", "no argument")):
        with pytest.raises(tp.UnknownPolicy, match=match):
            tp.resolve(bad)


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "route.yaml"
    path.write_text("default: all:majority\ntask_types:\n  math: a:single\n  string: zzz:single\n")
    policy = tp.load_policy_file(path)
    base = {"available": tuple(ACTIONS), "behaviour": {a: 1 / 3 for a in ACTIONS},
            "q_values": {}, "complexity": "low"}
    assert policy.name == "file:route.yaml"
    assert policy.probabilities(tp.Decision(task_type="math", **base)) == {"a:single": 1.0}
    assert policy.probabilities(tp.Decision(task_type="list", **base)) == {"all:majority": 1.0}
    assert policy.probabilities(tp.Decision(task_type="string", **base)) is None
    path.write_text("task_types: {math: a:single}\nroutes: 3\n")
    with pytest.raises(tp.UnknownPolicy, match="route.yaml: field 'routes'"):
        tp.load_policy_file(path)
    path.write_text("name: nothing\n")
    with pytest.raises(tp.UnknownPolicy, match="no route"):
        tp.load_policy_file(path)


def test_logged_policy_estimate_is_the_on_policy_mean() -> None:
    log = join(*uniform_log(300))
    est = estimate("ns", log, tp.resolve("logged"), n_bootstrap=200)
    # IPS and SNIPS are the sample mean exactly; DR is not: its reward model removes the noise
    # of which action each round drew, so it is compared with the value routing uniformly has
    for outcome, truth in ((est.pass_rate, 0.6), (est.cost_usd, 0.008)):
        assert outcome.ips.value == pytest.approx(outcome.on_policy, abs=1e-12)
        assert outcome.snips.value == pytest.approx(outcome.on_policy, abs=1e-12)
        assert outcome.dr.low <= truth <= outcome.dr.high
    assert est.ess == pytest.approx(300) and est.warnings == []
    assert est.pass_rate.on_policy == pytest.approx(np.mean([r.passed for r in log.rounds]))


def test_provider_estimate_is_near_its_measured_rate() -> None:
    log = join(*uniform_log(900, seed=1))
    est = estimate("ns", log, tp.resolve("provider:a"), n_bootstrap=300)
    measured = {a.action: a for a in est.per_action}["a:single"]
    assert est.pass_rate.snips.value == pytest.approx(measured.pass_rate, abs=1e-12)
    assert est.cost_usd.snips.value == pytest.approx(0.01)
    assert est.pass_rate.ips.low <= 0.8 <= est.pass_rate.ips.high
    # weights 3 on the rounds that logged a, 0 elsewhere: (3m)^2 / (9m) = m
    assert est.ess == pytest.approx(measured.rounds)


def test_rounds_the_target_cannot_act_in_are_left_out_and_reported() -> None:
    decisions, rewards = uniform_log(60)
    only_b = {"b:single": 1.0}  # a's breaker open: b was the only action
    decisions += [decision(f"x{i}", "b:single", only_b, t=100 + i) for i in range(6)]
    rewards += [reward(f"x{i}", "b:single", False, 0.002) for i in range(6)]
    est = estimate("ns", join(decisions, rewards), tp.resolve("provider:a"), n_bootstrap=50)
    assert est.rounds == 60
    assert est.excluded == {"no_outcome": 0, "no_propensity": 0, "target_unavailable": 6}
    assert any("6 of 66 rounds left out" in w for w in est.warnings)
    doc = json.loads(json.dumps(est.to_dict()))
    assert doc["excluded"]["target_unavailable"] == 6 and doc["pass_rate"]["dr"]["value"] > 0
    text = "\n".join(est.render())
    assert "policy provider:a on namespace ns: 60 of 66 logged rounds (6 target unavailable)" \
        in text
    assert "warning: 6 of 66 rounds left out" in text


def test_nothing_to_evaluate() -> None:
    with pytest.raises(NoDecisions, match="namespace ns"):
        estimate("ns", join([], []), tp.resolve("random"))
    decisions, _ = uniform_log(5)
    with pytest.raises(NothingToEvaluate, match="none of the 5 decisions has an outcome"):
        estimate("ns", join(decisions, []), tp.resolve("random"))
    with pytest.raises(NothingToEvaluate, match="provider:zzz cannot act in any of the 5"):
        estimate("ns", join(*uniform_log(5)), tp.resolve("provider:zzz"))
