"""streams/study.py: the oracle, the table, the floors, the hull and the plots, on synthetic runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from streams.study import Outcome, Run, figures, floors, oracle, plot, regret, table, upper_hull

EPOCHS = 2
N = 60  # tasks per epoch


def run(policy: str, seed: int, pass_p: float, cost: float, rng: random.Random) -> Run:
    r = Run(policy, seed, f"ns-{policy}-{seed}")
    for e in range(1, EPOCHS + 1):
        for i in range(N):
            r.outcomes.append(Outcome(e, (e - 1) * N + i, f"t{i}#e{e}", rng.random() < pass_p, cost))
    return r


@pytest.fixture
def runs() -> list[Run]:
    rng = random.Random(7)
    out = []
    for seed in (0, 1):
        out += [run("provider:dear", seed, 0.9, 0.005, rng), run("provider:cheap", seed, 0.7, 0.0005, rng),
                run("random", seed, 0.8, 0.00275, rng), run("thompson", seed, 0.92, 0.0015, rng)]
    return out


def test_oracle_takes_the_cheapest_passing_provider_per_task(runs) -> None:
    seed0 = [r for r in runs if r.seed == 0]
    o = oracle(seed0)
    dear, cheap = seed0[0], seed0[1]
    for od, d, c in zip(o.outcomes, dear.outcomes, cheap.outcomes):
        assert od.passed == (d.passed or c.passed)
        assert od.cost_usd == (0.0005 if c.passed or not d.passed else 0.005)
    assert oracle([r for r in seed0 if not r.policy.startswith("provider:")]) is None


def test_figures_and_regret() -> None:
    outs = [Outcome(1, i, f"t{i}", i % 2 == 0, 0.01) for i in range(10)]
    f = figures(outs, 1)
    assert f == {"pass_rate": 0.5, "cost_usd": pytest.approx(0.1), "passes": 5, "pass_per_usd": pytest.approx(50)}
    best = Run("oracle", 0, "", [Outcome(1, i, f"t{i}", True, 0.0) for i in range(10)])
    assert regret(Run("x", 0, "", outs), best)[-1] == 5


def test_table_medians_over_seeds_and_oracle_share(runs) -> None:
    t = table(runs, EPOCHS)
    assert set(t) == {"provider:dear", "provider:cheap", "random", "thompson", "oracle"}
    assert t["oracle"]["all_oracle_share"] == pytest.approx(1.0)
    for p in ("provider:dear", "thompson"):
        r = t[p]
        assert r["all_pass_per_usd"] == pytest.approx(r["all_passes"] / r["all_cost_usd"])
        assert {k for k in r if k.startswith("regret_e")} == {"regret_e1", "regret_e2"}
        assert r["regret_e2"] >= r["regret_e1"] >= 0


def test_floors_compare_the_default_with_the_best_single_and_random(runs) -> None:
    t = table(runs, EPOCHS)
    f = floors(t, "thompson")
    assert f["last epoch cost <= 50% of provider:dear"]["ok"]
    assert f["all epochs cost < random"]["ok"]
    assert f["last epoch cost <= 50% of provider:dear"]["bound"] == pytest.approx(0.5 * t["provider:dear"]["last_cost_usd"], abs=1e-4)
    worse = floors(t, "random")
    assert not worse["last epoch cost <= 50% of provider:dear"]["ok"]


def test_upper_hull_keeps_only_points_mixing_cannot_beat() -> None:
    pts = [(0.1, 0.7), (0.3, 0.75), (0.5, 0.9), (0.8, 0.85), (0.2, 0.5)]
    assert upper_hull(pts) == [(0.1, 0.7), (0.5, 0.9)]  # (0.3, 0.75) lies under the chord


def test_plots_are_written_and_not_empty(runs, tmp_path: Path) -> None:
    paths = plot(runs, table(runs, EPOCHS), ["thompson"], tmp_path)
    assert [p.name for p in paths] == ["cost_quality.png", "learning_curve.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
