"""agents/ope.py: IPS, SNIPS and DR against the Open Bandit Pipeline (obp.ope) and against the
ground truth of a synthetic log; the reward model, intervals, ESS and warnings."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from agents import ope

CONTEXTS = [("math", "low"), ("math", "high"), ("string", "low"), ("list", "medium")]
CONTEXT_P = np.array([0.4, 0.2, 0.25, 0.15])
ACTIONS = ["a:single", "b:single", "c:single", "all:majority"]
# true pass probability per (context, action): every context has another best action
MU = np.array([[0.80, 0.55, 0.30, 0.70],
               [0.40, 0.75, 0.20, 0.60],
               [0.35, 0.50, 0.90, 0.65],
               [0.60, 0.30, 0.45, 0.85]])
COST = np.array([0.010, 0.002, 0.005, 0.017])  # mean USD per task of each action
GREEDY = [1, 0, 3, 2]  # the behaviour's exploit action per context: rarely the best one


@dataclass
class Log:
    ctx: np.ndarray  # (n,) context index
    contexts: list[tuple[str, str]]
    actions: np.ndarray  # (n,)
    behaviour: np.ndarray  # (n, K)
    passed: np.ndarray  # (n,) 0/1
    cost: np.ndarray  # (n,) USD

    @property
    def propensity(self) -> np.ndarray:
        return self.behaviour[np.arange(len(self.actions)), self.actions]


def synthetic_log(n: int, eps: float, seed: int) -> Log:
    """ε-greedy behaviour: eps/K on every action (the floor) plus 1 - eps on GREEDY[x]."""
    rng = np.random.default_rng(seed)
    k = len(ACTIONS)
    ctx = rng.choice(len(CONTEXTS), size=n, p=CONTEXT_P)
    behaviour = np.full((n, k), eps / k)
    behaviour[np.arange(n), np.array(GREEDY)[ctx]] += 1 - eps
    actions = np.array([rng.choice(k, p=row) for row in behaviour])
    passed = (rng.random(n) < MU[ctx, actions]).astype(float)
    cost = COST[actions] * rng.uniform(0.5, 1.5, size=n)
    return Log(ctx, [CONTEXTS[c] for c in ctx], actions, behaviour, passed, cost)


def deterministic(per_context: list[int], ctx: np.ndarray) -> np.ndarray:
    target = np.zeros((len(ctx), len(ACTIONS)))
    target[np.arange(len(ctx)), np.array(per_context)[ctx]] = 1.0
    return target


TARGETS = {
    "provider b": lambda ctx: deterministic([1, 1, 1, 1], ctx),
    "random": lambda ctx: np.full((len(ctx), len(ACTIONS)), 1 / len(ACTIONS)),
    "by context": lambda ctx: deterministic([0, 1, 2, 3], ctx),  # the best action everywhere
}


def true_value(table: np.ndarray, name: str) -> float:
    """V(π_e) = Σ_x P(x) Σ_a π_e(a|x) table[x, a] (table: pass probability or mean cost)."""
    per_context = TARGETS[name](np.arange(len(CONTEXTS)))
    return float(np.sum(CONTEXT_P * np.sum(per_context * table, axis=1)))


def estimates(log: Log, target: np.ndarray, outcome: np.ndarray, **kwargs):
    rows = np.arange(len(log.actions))
    w = ope.importance_weights(target[rows, log.actions], log.propensity)
    q = ope.cell_mean_model(log.contexts, log.actions, outcome, len(ACTIONS), seed=1)
    return w, q, ope.bootstrap_intervals(outcome, w, q[rows, log.actions],
                                         np.sum(q * target, axis=1), **kwargs)


@pytest.fixture(scope="module")
def obp_ope() -> types.ModuleType:
    """``obp.ope`` (obp 0.4.1, installed with --no-deps by scripts/setup.sh).

    obp imports torch at module level (for its neural policy learner and the Tensor variants
    of its estimators), which the numpy estimators compared here never call; where torch is
    not installed (it is gigabytes), the names those imports bind are stand-ins, removed
    from sys.modules again once obp is imported."""
    if importlib.util.find_spec("torch") is not None:
        import obp.ope
        return obp.ope
    stubs = {name: types.ModuleType(name)
             for name in ("torch", "torch.nn", "torch.optim", "torch.utils", "torch.utils.data")}
    torch = stubs["torch"]
    torch.Tensor = type("Tensor", (), {})
    torch.nn, torch.optim = stubs["torch.nn"], stubs["torch.optim"]
    torch.utils = stubs["torch.utils"]
    torch.utils.data = stubs["torch.utils.data"]
    torch.utils.data.Dataset = type("Dataset", (), {})
    torch.utils.data.DataLoader = type("DataLoader", (), {})
    sys.modules.update(stubs)
    try:
        import obp.ope
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return obp.ope


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_point_estimates_equal_obp(obp_ope, name: str) -> None:
    log = synthetic_log(3000, eps=0.3, seed=7)
    target = TARGETS[name](log.ctx)
    for outcome in (log.passed, log.cost):
        _, q, ours = estimates(log, target, outcome, n_bootstrap=10)
        feedback = {"reward": outcome, "action": log.actions, "pscore": log.propensity,
                    "action_dist": target[:, :, None]}
        theirs = {
            "ips": obp_ope.InverseProbabilityWeighting().estimate_policy_value(**feedback),
            "snips": obp_ope.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(
                **feedback),
            "dr": obp_ope.DoublyRobust().estimate_policy_value(
                **feedback, estimated_rewards_by_reg_model=q[:, :, None]),
        }
        for k in ope.ESTIMATORS:
            assert ours[k].value == pytest.approx(theirs[k], abs=1e-9), k


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_estimates_cover_the_true_value(name: str) -> None:
    log = synthetic_log(4000, eps=0.3, seed=11)
    target = TARGETS[name](log.ctx)
    for outcome, table in ((log.passed, MU), (log.cost, np.broadcast_to(COST, MU.shape))):
        truth = true_value(table, name)
        _, _, iv = estimates(log, target, outcome, n_bootstrap=400, alpha=0.01)
        for k in ope.ESTIMATORS:
            assert iv[k].low <= truth <= iv[k].high, (k, truth, iv[k])
            assert iv[k].low <= iv[k].value <= iv[k].high


def test_dr_is_tighter_than_ips_and_logged_weights_are_one() -> None:
    log = synthetic_log(4000, eps=0.3, seed=3)
    _, _, iv = estimates(log, TARGETS["provider b"](log.ctx), log.passed, n_bootstrap=300)
    assert iv["dr"].high - iv["dr"].low < iv["ips"].high - iv["ips"].low
    w, _, on_policy = estimates(log, log.behaviour, log.passed, n_bootstrap=50)
    assert np.all(w == 1.0) and ope.effective_sample_size(w) == pytest.approx(len(w))
    assert on_policy["ips"].value == on_policy["snips"].value == pytest.approx(log.passed.mean())


def test_bootstrap_is_seeded() -> None:
    log = synthetic_log(500, eps=0.5, seed=5)
    target = TARGETS["random"](log.ctx)
    _, _, a = estimates(log, target, log.passed, n_bootstrap=200, seed=4)
    _, _, b = estimates(log, target, log.passed, n_bootstrap=200, seed=4)
    _, _, c = estimates(log, target, log.passed, n_bootstrap=200, seed=5)
    assert a == b and a != c and a["ips"].value == c["ips"].value


def test_ess_of_a_deterministic_target_under_uniform_logging() -> None:
    # uniform over K actions, target always one of them: weights K on 1/K of the rounds
    log = synthetic_log(8000, eps=1.0, seed=2)
    target = TARGETS["provider b"](log.ctx)
    w = ope.importance_weights(target[np.arange(len(log.actions)), log.actions], log.propensity)
    assert ope.effective_sample_size(w) == pytest.approx(len(w) / len(ACTIONS), rel=0.05)
    diag = ope.diagnose(log.contexts, log.actions, log.behaviour, target, action_names=ACTIONS)
    assert diag.warnings == [] and diag.min_propensity == pytest.approx(0.25)
    assert diag.max_weight == pytest.approx(4.0) and diag.unsupported_mass == 0.0


def test_tiny_propensities_and_small_ess_warn() -> None:
    log = synthetic_log(4000, eps=0.004, seed=9)  # floor 0.001 per action
    target = TARGETS["by context"](log.ctx)  # mostly not the greedy action
    diag = ope.diagnose(log.contexts, log.actions, log.behaviour, target, action_names=ACTIONS)
    assert diag.min_propensity == pytest.approx(0.001)
    assert any("propensity below 0.01" in w for w in diag.warnings)
    assert any("effective sample size" in w for w in diag.warnings)
    assert diag.ess < 0.1 * len(log.actions)


def test_support_deficiency_warns() -> None:
    log = synthetic_log(2000, eps=0.4, seed=13)
    behaviour = log.behaviour.copy()
    # action c was unavailable in every "string" round: no propensity, never logged there
    string = log.ctx == 2
    behaviour[string, 2] = 0.0
    behaviour[string] /= behaviour[string].sum(axis=1, keepdims=True)
    actions = np.array([a if not s or a != 2 else 0 for a, s in zip(log.actions, string)])
    target = TARGETS["by context"](log.ctx)
    diag = ope.diagnose(log.contexts, actions, behaviour, target, action_names=ACTIONS)
    assert diag.unsupported_mass == pytest.approx(string.mean())
    assert diag.never_logged == [(("string", "low"), 2)]
    assert any("could not take" in w for w in diag.warnings)
    assert any("string/low c:single" in w for w in diag.warnings)


def test_cell_means_shrink_toward_parents() -> None:
    contexts = [("x",), ("x",), ("x",), ("y",), ("y",)]
    actions = np.array([0, 0, 1, 1, 1])
    outcome = np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    kappa = 2.0
    q = ope.cell_mean_model(contexts, actions, outcome, 3, prior_strength=kappa, folds=1)
    m = outcome.mean()
    m0 = (2 + kappa * m) / (2 + kappa)  # action 0: two passes
    m1 = (1 + kappa * m) / (3 + kappa)  # action 1: one pass in three
    assert q[0, 0] == pytest.approx((2 + kappa * m0) / (2 + kappa))  # cell (x, 0)
    assert q[0, 1] == pytest.approx((0 + kappa * m1) / (1 + kappa))  # cell (x, 1)
    assert q[3, 0] == pytest.approx(m0)  # (y, 0) never logged: the action's mean
    assert q[3, 2] == pytest.approx(m)  # action 2 never logged: the global mean
    raw = ope.cell_mean_model(contexts, actions, outcome, 3, prior_strength=0.0, folds=1)
    assert raw[0, 0] == 1.0 and raw[3, 1] == 0.5


def test_cross_fitting_keeps_a_rounds_outcome_out_of_its_prediction() -> None:
    log = synthetic_log(200, eps=0.5, seed=17)
    q = ope.cell_mean_model(log.contexts, log.actions, log.passed, len(ACTIONS), folds=2, seed=3)
    flipped = log.passed.copy()
    flipped[0] = 1 - flipped[0]
    q2 = ope.cell_mean_model(log.contexts, log.actions, flipped, len(ACTIONS), folds=2, seed=3)
    assert np.array_equal(q[0], q2[0])  # round 0's own row is predicted without it
    assert not np.array_equal(q, q2)  # the other fold's predictions use it


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="propensities"):
        ope.importance_weights(np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match="n_bootstrap"):
        ope.bootstrap_intervals(np.ones(2), np.ones(2), np.ones(2), np.ones(2), n_bootstrap=0)
    with pytest.raises(ValueError, match="folds"):
        ope.cell_mean_model([1], np.array([0]), np.array([1.0]), 1, folds=0)
