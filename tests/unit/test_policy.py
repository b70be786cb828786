"""agents/policy: routing policies, their propensities, batch-size invariance and the cascade."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents import qlearning
from agents.executor import ExecutorStage, build_actions
from agents.policy import make_policy, policy_names
from agents.policy.bandit import ThompsonPolicy, parse_stats
from agents.policy.base import Context, Snapshot, draw, with_floor
from agents.policy.fixed import FixedActionPolicy, RandomPolicy, RoundRobinPolicy
from models.events import TaskSubmitted
from streams.config import Settings
from tests.unit.test_executor_fallback import Harness, Scripted, h, of, redis, task  # noqa: F401

ACTIONS = ["a:single", "b:single", "c:single", "cascade"]


def ctx(index: int = 0, task_type: str = "math") -> Context:
    return Context(task_type, "low", f"{task_type}|low", index)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6).filter(lambda xs: sum(xs) > 0),
       st.floats(0.0, 0.5))
def test_with_floor_keeps_a_distribution_and_lifts_every_action(weights, floor) -> None:
    total = sum(weights)
    probs = {f"x{i}": w / total for i, w in enumerate(weights)}
    out = with_floor(probs, floor)
    assert sum(out.values()) == pytest.approx(1.0)
    assert min(out.values()) >= min(floor, 1 / len(probs)) - 1e-12
    if min(probs.values()) >= floor:
        assert out == probs


def test_draw_follows_the_probabilities() -> None:
    rng = random.Random(1)
    picks = [draw({"a": 0.7, "b": 0.2, "c": 0.1}, rng) for _ in range(5000)]
    assert picks.count("a") / 5000 == pytest.approx(0.7, abs=0.03)
    assert picks.count("c") / 5000 == pytest.approx(0.1, abs=0.02)


def stats(rows: dict[tuple[str, str], tuple[int, int, float]]) -> dict:
    """Bandit statistics from (task_type, action) -> (tasks, passes, cost USD per task)."""
    fields: dict[str, str] = {}
    for (tt, a), (n, p, c) in rows.items():
        fields |= {f"{tt}\t{a}\tn": str(n), f"{tt}\t{a}\tpasses": str(p),
                   f"{tt}\t{a}\tcost": str(round(n * c * 1e6))}
    return parse_stats(fields)


def test_thompson_prefers_the_action_that_passes_and_logs_exact_floored_propensities() -> None:
    pol = ThompsonPolicy(cost_weight=0.0, floor=0.02)
    snap = Snapshot(0, stats({("math", "a:single"): (40, 36, 0.001), ("math", "b:single"): (40, 12, 0.001),
                              ("math", "c:single"): (40, 20, 0.001), ("math", "cascade"): (40, 24, 0.001)}))
    choices = [pol.choose(ctx(i), ACTIONS, snap, qlearning.seeded_rng("e", i)) for i in range(300)]
    assert sum(c.action == "a:single" for c in choices) / 300 > 0.85
    for c in choices:
        assert sum(c.probabilities.values()) == pytest.approx(1.0)
        assert min(c.probabilities.values()) >= 0.02 - 1e-12
        assert c.q_values["a:single"] == max(c.q_values.values())
    # the same task (same rng seed) gets the same decision
    again = pol.choose(ctx(5), ACTIONS, snap, qlearning.seeded_rng("e", 5))
    assert again == choices[5]


def test_thompson_cost_weight_moves_traffic_to_the_cheaper_of_two_equal_actions() -> None:
    rows = {("math", "a:single"): (50, 45, 0.02), ("math", "b:single"): (50, 44, 0.0005)}
    acts = ["a:single", "b:single"]
    for weight, favourite in ((0.0, "a:single"), (50.0, "b:single")):
        pol = ThompsonPolicy(cost_weight=weight, floor=0.0)
        picks = [pol.choose(ctx(i), acts, Snapshot(0, stats(rows)), qlearning.seeded_rng("w", i)).action
                 for i in range(200)]
        assert picks.count(favourite) > (100 if weight == 0 else 190), (weight, picks.count(favourite))


def test_thompson_pools_a_new_task_type_towards_the_actions_overall_record() -> None:
    pol = ThompsonPolicy(cost_weight=0.0, prior_strength=2.0)
    s = stats({("math", "a:single"): (100, 95, 0.0), ("math", "b:single"): (100, 5, 0.0)})
    alpha, beta, _ = pol.posterior("string", ["a:single", "b:single"], s)  # never seen "string"
    means = alpha / (alpha + beta)
    assert means[0] > 0.6 and means[1] < 0.4
    assert alpha.sum() + beta.sum() == pytest.approx(2 * (2 + 2))  # 1 + 1 + k pseudo-counts each


def test_epsilon_greedy_explores_by_decision_index_with_a_floor() -> None:
    pol = make_policy("epsilon-greedy", ["a", "b"], Settings(propensity_floor=0.05,
                                                              epsilon_min=0.0))
    assert pol.epsilon(0, 4) == pytest.approx(0.97)
    assert pol.epsilon(100, 4) == pytest.approx(max(0.97 * 0.99**100, 0.2))
    assert pol.epsilon(10_000, 4) == pytest.approx(0.2)  # floor 0.05 x 4 actions
    c = pol.choose(ctx(10_000), ACTIONS, Snapshot(0, {"math|low": {"b:single": 1.0}}), random.Random(0))
    assert min(c.probabilities.values()) == pytest.approx(0.05)
    assert c.probabilities["b:single"] == pytest.approx(0.85) and c.epsilon == pytest.approx(0.2)


def test_fixed_baselines() -> None:
    snap = Snapshot(0)
    rr = RoundRobinPolicy()
    assert [rr.choose(ctx(i), ACTIONS, snap, random.Random(0)).action for i in range(4)] == \
        ["a:single", "b:single", "c:single", "a:single"]
    r = RandomPolicy().choose(ctx(), ACTIONS, snap, random.Random(0))
    assert r.probabilities == {"a:single": 1 / 3, "b:single": 1 / 3, "c:single": 1 / 3, "cascade": 0.0}
    fixed = FixedActionPolicy("b:single", "provider:b")
    assert fixed.choose(ctx(), ACTIONS, snap, random.Random(0)).action == "b:single"
    away = fixed.choose(ctx(), ["a:single", "c:single"], snap, random.Random(0))
    assert away.explored and away.action in ("a:single", "c:single")


def test_make_policy_names_every_policy_and_rejects_others() -> None:
    names = policy_names(["a", "b"])
    assert names == ["thompson", "epsilon-greedy", "random", "round-robin", "cascade",
                     "provider:a", "provider:b"]
    for n in names:
        assert make_policy(n, ["a", "b"], Settings()).name == n
    with pytest.raises(ValueError, match="RMO_POLICY='provider:z' is not a policy.*provider:a"):
        make_policy("provider:z", ["a", "b"], Settings())


def test_cascade_action_orders_providers_cheapest_first() -> None:
    acts = build_actions(["dear", "cheap", "mid"], ("single", "majority", "cascade"),
                         {"dear": 45.0, "cheap": 5.6, "mid": 9.0})
    assert [a.name for a in acts] == ["dear:single", "cheap:single", "mid:single", "all:majority", "cascade"]
    assert acts[-1].providers == ("cheap", "mid", "dear") and acts[-1].strategy == "cascade"
    assert [a.name for a in build_actions(["only"], ("single", "cascade"))] == ["only:single"]


async def test_decisions_do_not_depend_on_how_the_stream_is_batched(h: Harness) -> None:  # noqa: F811
    """20 tasks in one batch, or in two of 10 (the executor's counter advanced between them, as
    its projection does at commit): the same actions with the same propensities."""
    provs = [Scripted("a", "def f():\n    return 1\n"), Scripted("b", "def f():\n    return 1\n")]
    settings = {"policy": "epsilon-greedy", "propensity_floor": 0.02, "epsilon_start": 0.97,
                "epsilon_min": 0.05, "strategies": ("single",)}
    events = [task(i) for i in range(20)]
    whole = of(await h.run(h.stage(*provs, **settings), *events), "ProviderSelected")
    stage = h.stage(*provs, **settings)
    first = of(await h.run(stage, *events[:10]), "ProviderSelected")
    await h.redis.hincrby(h.keys.counters, "events:TaskAnalyzed", 10)
    second = of(await h.run(stage, *events[10:]), "ProviderSelected")
    assert [(d.action, d.action_probabilities, d.epsilon) for d in whole] == \
        [(d.action, d.action_probabilities, d.epsilon) for d in first + second]
    assert whole[0].epsilon > whole[-1].epsilon  # ε decays per decision, inside one batch too


WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"
PROMPT = 'def add(a, b):\n    """Sum.\n    >>> add(2, 3)\n    5\n    """\n'


@pytest.mark.parametrize(("cheap_answer", "asked"), [(WRONG, ["cheap", "dear"]), (RIGHT, ["cheap"])])
async def test_cascade_escalates_only_when_the_cheap_answer_fails_the_visible_examples(
        h: Harness, cheap_answer: str, asked: list[str]) -> None:  # noqa: F811
    cheap, dear = Scripted("cheap", cheap_answer), Scripted("dear", RIGHT)
    cheap.model, dear.model = "gemini-2.5-pro", "claude-opus-4"
    stage = h.stage(dear, cheap, policy="cascade", strategies=("single", "cascade"),
                    sandbox="subprocess")
    t = TaskSubmitted(task_id="t0", kind="code", prompt=PROMPT, entry_point="add")
    out = await h.run(stage, task(0, t))
    (ex,) = of(out, "TaskExecuted")
    assert [c.provider for c in ex.candidates] == asked
    assert ex.chosen == asked[-1] and ex.consensus_strategy == "cascade"
    assert [e.payload.provider for e in out if e.event_type == "ProviderCallCompleted"] == asked


def test_executor_rejects_an_unknown_policy_at_build_time() -> None:
    with pytest.raises(ValueError, match="is not a policy"):
        ExecutorStage({"a": Scripted("a", "x")}, Settings(policy="best"))


async def test_a_learning_policy_decides_at_most_a_window_ahead_of_its_feedback(h: Harness) -> None:  # noqa: F811
    stage = h.stage(Scripted("a", "x"), policy="thompson", feedback_window=16, feedback_wait_s=0.3)
    ctx = type("Ctx", (), {"redis": h.redis, "keys": h.keys})()
    assert await stage.admit(1000, ctx) == 16  # cold start: the window
    await h.redis.hset(h.keys.counters, mapping={"events:TaskAnalyzed": 100, "events:TaskCompleted": 90})
    assert await stage.admit(1000, ctx) == 90 - 10  # max(16, 90) completed, 10 still in flight
    assert await stage.admit(5, ctx) == 5
    await h.redis.hset(h.keys.counters, mapping={"events:TaskAnalyzed": 40, "events:TaskCompleted": 10})
    started = time.monotonic()
    assert await stage.admit(1000, ctx) == 16  # nothing allowed: waits feedback_wait_s, then the window
    assert time.monotonic() - started >= 0.3
    fixed = h.stage(Scripted("a", "x"), policy="provider:a", feedback_window=16)
    assert await fixed.admit(1000, ctx) == 1000


async def test_a_cascade_nobody_answers_leaves_the_task_without_an_answer(h: Harness) -> None:  # noqa: F811
    from tests.unit.test_executor_fallback import server_error

    a, b = Scripted("a", server_error()), Scripted("b", server_error())
    stage = h.stage(a, b, policy="cascade", strategies=("single", "cascade"), max_fallbacks=0)
    (ex,) = of(await h.run(stage, task(0)), "TaskExecuted")
    assert (ex.action, ex.consensus_strategy, ex.chosen, ex.candidates) == ("cascade", "cascade", None, [])
