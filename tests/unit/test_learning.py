"""agents/learning.py: performance and reward of a validated task (SPEC §4)."""

from __future__ import annotations

import pytest

from agents.learning import performance, reward
from models.events import TaskValidated, ValidationLevel


def validated(
    passed: bool, tests_passed: int, tests_total: int, cost_usd: float = 0.0
) -> TaskValidated:
    return TaskValidated(
        task_id="t1", levels=[ValidationLevel(level="tests", passed=passed)], passed=passed,
        tests_passed=tests_passed, tests_total=tests_total, duration_ms=3.0,
        state="none|code_generation|low", action="openai", provider="openai",
        cost_usd=cost_usd, tokens=10,
    )


@pytest.mark.parametrize(("tp", "tt"), [(5, 5), (0, 0), (2, 7), (0, 3)])
def test_passed_is_full_performance_whatever_the_counts(tp: int, tt: int) -> None:
    assert performance(validated(True, tp, tt)) == 1.0


@pytest.mark.parametrize(
    ("tp", "tt", "expected"),
    [(0, 4, 0.0), (1, 4, 0.25), (3, 4, 0.75), (2, 3, 2 / 3), (4, 4, 1.0), (1, 1000, 0.001)],
)
def test_failed_is_the_passed_fraction(tp: int, tt: int, expected: float) -> None:
    assert performance(validated(False, tp, tt)) == pytest.approx(expected)


def test_failed_without_tests_is_zero() -> None:
    assert performance(validated(False, 0, 0)) == 0.0


def test_performance_stays_in_the_unit_interval() -> None:
    for tt in range(12):
        for tp in range(tt + 1):
            for passed in (True, False):
                assert 0.0 <= performance(validated(passed, tp, tt)) <= 1.0


@pytest.mark.parametrize(
    ("perf", "cost", "weight", "expected"),
    [
        (1.0, 0.0, 10.0, 1.0),
        (1.0, 0.01, 10.0, 0.9),
        (0.5, 0.002, 100.0, 0.3),
        (0.0, 0.05, 10.0, -0.5),
        (0.75, 0.3, 0.0, 0.75),
        (0.25, 1.0, 1.0, -0.75),
    ],
)
def test_reward_is_performance_minus_weighted_cost(
    perf: float, cost: float, weight: float, expected: float
) -> None:
    assert reward(perf, cost, weight) == pytest.approx(expected)


def test_reward_decreases_with_cost_and_weight() -> None:
    assert reward(0.8, 0.02, 5.0) < reward(0.8, 0.01, 5.0) < reward(0.8, 0.0, 5.0)
    assert reward(0.8, 0.02, 10.0) < reward(0.8, 0.02, 5.0)


def test_reward_from_a_validated_task() -> None:
    v = validated(False, 3, 4, cost_usd=0.004)
    assert reward(performance(v), v.cost_usd, 25.0) == pytest.approx(0.75 - 0.1)
