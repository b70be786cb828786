"""agents/qlearning.py: tabular Q-learning with epsilon-greedy selection."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from agents.qlearning import (
    QConfig,
    QTable,
    epsilon,
    from_fields,
    greedy_policy,
    make_state,
    next_state,
    seeded_rng,
    select,
    to_fields,
    update,
)

CFG = QConfig()
S = "none|code_generation|medium"
S2 = "openai|code_generation|medium"
ACTIONS = ["openai", "claude", "gemini", "openai+claude:vote"]


# --------------------------------------------------------------------------- update


def test_update_from_empty_table() -> None:
    q: QTable = {}
    cfg = QConfig(alpha=0.5, gamma=0.9)
    new = update(q, S, "openai", 1.0, S2, cfg)
    # 0 + 0.5 * (1.0 + 0.9 * 0 - 0) = 0.5
    assert new == pytest.approx(0.5)
    assert q == {S: {"openai": pytest.approx(0.5)}}
    assert S2 not in q  # looking at the next state does not create it


def test_update_uses_max_of_next_state_and_old_value() -> None:
    cfg = QConfig(alpha=0.1, gamma=0.1)
    q: QTable = {S: {"openai": 0.4, "claude": 2.0}, S2: {"a": 0.3, "b": 0.8, "c": -1.0}}
    new = update(q, S, "openai", 0.7, S2, cfg)
    # 0.4 + 0.1 * (0.7 + 0.1 * 0.8 - 0.4) = 0.4 + 0.1 * 0.38 = 0.438
    assert new == pytest.approx(0.438, abs=1e-12)
    assert q[S]["openai"] == new
    assert q[S]["claude"] == 2.0  # other actions untouched
    assert q[S2] == {"a": 0.3, "b": 0.8, "c": -1.0}


def test_update_missing_action_in_existing_row_counts_as_zero() -> None:
    cfg = QConfig(alpha=0.25, gamma=0.5)
    q: QTable = {S: {"claude": 5.0}, S2: {"x": 2.0}}
    new = update(q, S, "openai", -1.0, S2, cfg)
    # 0 + 0.25 * (-1.0 + 0.5 * 2.0 - 0) = 0.0
    assert new == pytest.approx(0.0, abs=1e-15)
    assert set(q[S]) == {"claude", "openai"}


def test_update_with_negative_reward_and_self_loop() -> None:
    cfg = QConfig(alpha=0.2, gamma=0.5)
    q: QTable = {S: {"openai": 1.0}}
    new = update(q, S, "openai", -0.5, S, cfg)
    # s' == s: max Q(s') = 1.0 (read before the write) -> 1.0 + 0.2 * (-0.5 + 0.5 - 1.0) = 0.8
    assert new == pytest.approx(0.8)


def test_repeated_updates_converge_to_fixed_point() -> None:
    # a terminal-like next state with no entries: Q -> r
    cfg = QConfig(alpha=0.5, gamma=0.9)
    q: QTable = {}
    for _ in range(60):
        update(q, S, "openai", 0.3, "terminal|x|y", cfg)
    assert q[S]["openai"] == pytest.approx(0.3, rel=1e-12)
    # a self-loop: Q -> r / (1 - gamma)
    q = {}
    for _ in range(600):
        update(q, S, "openai", 0.3, S, cfg)
    assert q[S]["openai"] == pytest.approx(0.3 / (1 - 0.9), rel=1e-9)


def test_update_sequence_matches_hand_computation() -> None:
    cfg = QConfig(alpha=0.1, gamma=0.1)
    q: QTable = {}
    expected: dict[tuple[str, str], float] = {}
    steps = [(S, "a", 1.0, S2), (S2, "b", 0.5, S), (S, "a", -0.2, S2), (S2, "a", 0.0, S)]
    for s, a, r, s_next in steps:
        nxt = [v for (ss, _), v in expected.items() if ss == s_next]
        best = max(nxt) if nxt else 0.0
        old = expected.get((s, a), 0.0)
        expected[(s, a)] = old + 0.1 * (r + 0.1 * best - old)
        assert update(q, s, a, r, s_next, cfg) == pytest.approx(expected[(s, a)], abs=1e-15)
    assert q[S]["a"] == pytest.approx(expected[(S, "a")])
    # spot-check the first two steps by hand: 0.1; then 0 + 0.1*(0.5 + 0.1*0.1) = 0.051
    assert expected[(S2, "b")] == pytest.approx(0.051)


# --------------------------------------------------------------------------- epsilon


def test_epsilon_starts_at_configured_value_and_decays_geometrically() -> None:
    assert epsilon(0, CFG) == pytest.approx(0.97)
    assert epsilon(1, CFG) == pytest.approx(0.97 * 0.99)
    assert epsilon(10, CFG) == pytest.approx(0.97 * 0.99**10)
    values = [epsilon(n, CFG) for n in range(1_000)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_epsilon_floors_at_minimum() -> None:
    n_floor = math.ceil(math.log(CFG.epsilon_min / CFG.epsilon_start) / math.log(CFG.epsilon_decay))
    assert epsilon(n_floor - 1, CFG) > CFG.epsilon_min
    assert epsilon(n_floor, CFG) == CFG.epsilon_min
    assert epsilon(10_000, CFG) == CFG.epsilon_min
    assert epsilon(10**7, CFG) == CFG.epsilon_min  # no underflow trouble


def test_epsilon_custom_config() -> None:
    cfg = QConfig(epsilon_start=0.5, epsilon_min=0.2, epsilon_decay=0.5)
    assert [epsilon(n, cfg) for n in range(4)] == pytest.approx([0.5, 0.25, 0.2, 0.2])


# --------------------------------------------------------------------------- select


def test_select_greedy_with_eps_zero() -> None:
    q: QTable = {S: {"openai": 0.1, "claude": 0.9, "gemini": -0.3}}
    for seed in range(50):
        c = select(S, ACTIONS, q, 0.0, random.Random(seed))
        assert c.action == "claude"
        assert c.explored is False
    assert c.q_values == {"openai": 0.1, "claude": 0.9, "gemini": -0.3, "openai+claude:vote": 0.0}


def test_select_ties_go_to_the_earliest_action() -> None:
    rng = random.Random(0)
    assert select(S, ACTIONS, {}, 0.0, rng).action == "openai"
    q: QTable = {S: {"claude": 0.5, "gemini": 0.5}}
    assert select(S, ACTIONS, q, 0.0, rng).action == "claude"
    assert select(S, list(reversed(ACTIONS)), q, 0.0, rng).action == "gemini"
    # all known values negative: an unseen action (0.0) wins, earliest among unseen
    q = {S: {"openai": -1.0, "claude": -0.5}}
    assert select(S, ACTIONS, q, 0.0, rng).action == "gemini"


def test_select_ignores_q_entries_for_unavailable_actions() -> None:
    q: QTable = {S: {"gemini": 10.0, "openai": 0.2, "claude": 0.1}}
    c = select(S, ["claude", "openai"], q, 0.0, random.Random(1))
    assert c.action == "openai"
    assert set(c.probabilities) == set(c.q_values) == {"claude", "openai"}


def test_select_ignores_other_states() -> None:
    q: QTable = {S2: {"gemini": 10.0}}
    assert select(S, ACTIONS, q, 0.0, random.Random(1)).action == "openai"


def test_select_with_eps_one_explores_uniformly() -> None:
    q: QTable = {S: {"claude": 100.0}}
    rng = random.Random(12345)
    n = 20_000
    choices = [select(S, ACTIONS, q, 1.0, rng) for _ in range(n)]
    assert all(c.explored for c in choices)
    counts = Counter(c.action for c in choices)
    assert set(counts) == set(ACTIONS)
    expected = n / len(ACTIONS)
    chi2 = sum((counts[a] - expected) ** 2 / expected for a in ACTIONS)
    # chi-square, 3 degrees of freedom: P(chi2 > 16.27) = 0.001
    assert chi2 < 16.27


def test_select_exploration_rate_matches_epsilon() -> None:
    rng = random.Random(7)
    n, eps = 20_000, 0.3
    q: QTable = {S: {"gemini": 1.0}}
    choices = [select(S, ACTIONS, q, eps, rng) for _ in range(n)]
    explored = sum(c.explored for c in choices) / n
    assert explored == pytest.approx(eps, abs=0.02)
    greedy_share = sum(c.action == "gemini" for c in choices) / n
    assert greedy_share == pytest.approx(eps / len(ACTIONS) + 1 - eps, abs=0.02)
    assert all(c.action == "gemini" for c in choices if not c.explored)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 0.97, 1.0])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_probabilities_sum_to_one_and_match_formula(eps: float, n: int) -> None:
    actions = ACTIONS[:n]
    q: QTable = {S: {actions[-1]: 0.7}}
    c = select(S, actions, q, eps, random.Random(3))
    assert sum(c.probabilities.values()) == pytest.approx(1.0)
    greedy = actions[-1]
    assert c.probabilities[greedy] == pytest.approx(eps / n + (1 - eps))
    for a in actions:
        if a != greedy:
            assert c.probabilities[a] == pytest.approx(eps / n)
    assert list(c.probabilities) == actions


def test_single_action_is_always_chosen() -> None:
    rng = random.Random(0)
    for _ in range(100):
        c = select(S, ["only"], {}, 0.97, rng)
        assert c.action == "only"
        assert c.probabilities == {"only": pytest.approx(1.0)}


def test_select_rejects_empty_actions() -> None:
    with pytest.raises(ValueError):
        select(S, [], {}, 0.5, random.Random(0))


def test_select_does_not_mutate_the_table() -> None:
    q: QTable = {S2: {"a": 1.0}}
    select(S, ACTIONS, q, 0.5, random.Random(0))
    assert q == {S2: {"a": 1.0}}


def test_select_is_deterministic_given_a_seeded_rng() -> None:
    q: QTable = {S: {"claude": 0.4}}
    a = [select(S, ACTIONS, q, 0.5, seeded_rng("evt", i)).action for i in range(200)]
    b = [select(S, ACTIONS, q, 0.5, seeded_rng("evt", i)).action for i in range(200)]
    assert a == b
    assert len(set(a)) > 1


# --------------------------------------------------------------------------- rng


def test_seeded_rng_is_deterministic_and_sensitive_to_parts() -> None:
    draws = [seeded_rng("event-1", 42).random() for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    rng_a, rng_b = seeded_rng("event-1", 42), seeded_rng("event-1", 42)
    assert [rng_a.random() for _ in range(10)] == [rng_b.random() for _ in range(10)]
    assert seeded_rng("event-2", 42).random() != draws[0]
    assert seeded_rng("event-1", 43).random() != draws[0]
    assert seeded_rng("event-1").random() != draws[0]


# --------------------------------------------------------------------------- states


def test_make_state() -> None:
    assert make_state("openai", "code_generation", "high") == "openai|code_generation|high"
    assert make_state(None, "text", "low") == "none|text|low"
    assert make_state("", "text", "low") == "none|text|low"


def test_next_state_replaces_the_previous_provider_only() -> None:
    s = make_state(None, "code_generation", "medium")
    assert next_state(s, "claude") == "claude|code_generation|medium"
    assert next_state(next_state(s, "claude"), "gemini") == "gemini|code_generation|medium"
    assert next_state(s, None) == s


def test_next_state_keeps_pipes_inside_the_last_field() -> None:
    s = "openai|code|weird|complexity"
    assert next_state(s, "claude") == "claude|code|weird|complexity"


# --------------------------------------------------------------------------- persistence


def test_fields_roundtrip_floats_exactly() -> None:
    values = [0.1 + 0.2, 1 / 3, -2.5e-310, 1e300, -0.0, 0.0, math.pi, 123456789.123456789,
              float("inf"), 5e-324]
    q: QTable = {S: {}, S2: {}}
    touched: set[tuple[str, str]] = set()
    for i, v in enumerate(values):
        st = S if i % 2 else S2
        q[st][f"act{i}"] = v
        touched.add((st, f"act{i}"))
    fields = to_fields(q, touched)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    back = from_fields(fields)
    assert back == q
    for st, row in q.items():
        for a, v in row.items():
            assert math.copysign(1.0, back[st][a]) == math.copysign(1.0, v)  # keeps -0.0


def test_to_fields_writes_only_touched_pairs() -> None:
    q: QTable = {S: {"a": 0.1, "b": 0.2}, S2: {"a": 0.3}}
    fields = to_fields(q, {(S, "b")})
    assert from_fields(fields) == {S: {"b": 0.2}}


def test_from_fields_splits_on_the_first_separator_only() -> None:
    q: QTable = {S: {"openai\tvote": 0.25}}
    assert from_fields(to_fields(q, {(S, "openai\tvote")})) == q


def test_from_fields_merges_many_fields_per_state() -> None:
    q: QTable = {}
    for i in range(20):
        update(q, f"p{i % 3}|t|low", f"a{i % 5}", i / 7, f"p{(i + 1) % 3}|t|low", CFG)
    touched = {(s, a) for s, row in q.items() for a in row}
    assert from_fields(to_fields(q, touched)) == q
    assert from_fields({}) == {}


# --------------------------------------------------------------------------- policy


def test_greedy_policy() -> None:
    q: QTable = {
        S2: {"a": -1.0, "b": -0.5},
        S: {"x": 0.1, "y": 0.9, "z": 0.9},
        "empty|t|low": {},
    }
    policy = greedy_policy(q)
    assert policy == {S: ("y", 0.9), S2: ("b", -0.5)}
    assert list(policy) == sorted(policy)
    assert greedy_policy({}) == {}
