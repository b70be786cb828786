"""Off-policy evaluation: what another routing policy would have scored on logged traffic.

Every routing decision is logged with the behaviour policy's propensity of every action it
could take (``ProviderSelected.action_probabilities``), so the value of a *target* policy
``π_e`` can be estimated from rounds collected under the *behaviour* policy ``π_b``. Per
logged round ``i``: context ``x_i``, logged action ``a_i``, propensity ``p_i = π_b(a_i|x_i)``,
outcome ``r_i`` (here a pass, 0/1, or a cost in USD), and the target's probabilities
``π_e(·|x_i)``; the importance weight is ``w_i = π_e(a_i|x_i) / p_i``.

- **IPS** (inverse propensity scoring, the Horvitz–Thompson estimator: Horvitz & Thompson,
  "A generalization of sampling without replacement from a finite universe", JASA 1952):
  ``mean(w_i r_i)``. Unbiased when every action the target may take has ``p > 0``.
- **SNIPS** (self-normalised IPS: Swaminathan & Joachims, "The self-normalized estimator for
  counterfactual learning", NeurIPS 2015): ``Σ w_i r_i / Σ w_i``. Slightly biased,
  consistent, and far less variable when weights are large; equals IPS when ``mean(w) = 1``.
- **DR** (doubly robust: Dudík, Langford & Li, "Doubly robust policy evaluation and
  learning", ICML 2011): ``mean(Σ_a π_e(a|x_i) q̂(x_i,a) + w_i (r_i − q̂(x_i,a_i)))`` with a
  reward model ``q̂`` fitted on the log (:func:`cell_mean_model`). Unbiased if either the
  propensities or ``q̂`` are right; ``q̂`` is cross-fitted (each round predicted by a model
  that never saw it: Chernozhukov et al., "Double/debiased machine learning", Econometrics
  Journal 2018; Narita, Yasui & Yata, AAAI 2019, for OPE) so the correction term stays
  unbiased.

The formulas are those of the Open Bandit Pipeline's ``obp.ope`` (``InverseProbability
Weighting``, ``SelfNormalizedInverseProbabilityWeighting``, ``DoublyRobust``); the tests
check equality with it. Confidence intervals are percentile bootstrap intervals over rounds
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13). The effective
sample size ``(Σw)² / Σw²`` is Kish's ("Survey Sampling", 1965), as used for importance
sampling diagnostics (Owen, "Monte Carlo theory, methods and examples", 2013, §9.3).

Everything here is pure numpy over arrays: ``n`` rounds, ``K`` actions indexed 0..K-1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BOOTSTRAP = 1000
"""Bootstrap resamples (B) of the confidence intervals."""
DEFAULT_ALPHA = 0.05
"""1 − confidence level of the intervals (95 %)."""
DEFAULT_MIN_PROPENSITY = 0.01
"""Below this, a propensity the target relies on is flagged: its weight (up to 1/p = 100 for
a deterministic target) lets one round move the estimate by 100/n."""
DEFAULT_MIN_ESS_FRACTION = 0.1
"""An effective sample size below this fraction of the rounds is flagged."""
DEFAULT_PRIOR_STRENGTH = 2.0
"""Pseudo-observations of :func:`cell_mean_model`'s shrinkage toward the parent mean."""
DEFAULT_FOLDS = 2
"""Cross-fitting folds of the reward model."""
ESTIMATORS = ("ips", "snips", "dr")

_BOOTSTRAP_CELLS = 2_000_000
"""Resampled indices held at once (B chunk × n): bounds the bootstrap's memory (~16 MB)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval ``[low, high]`` (same unit as
    the outcome: a pass rate in [0, 1], or USD per task). ``low``/``high`` are NaN when no
    resample defines the estimator (SNIPS with every weight 0)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Diagnostics:
    """How far the log can be trusted for one target.

    ``n``: rounds; ``ess``: effective sample size ``(Σw)²/Σw²`` (0 when every weight is 0);
    ``min_propensity``: the smallest ``p_i`` among rounds with ``w_i > 0`` (None when there
    are none); ``max_weight``: the largest ``w_i``; ``unsupported_mass``: the mean over rounds
    of the target's probability on actions whose logged propensity is 0 (IPS and SNIPS cannot
    see it, DR only through ``q̂``); ``never_logged``: (context, action index) pairs the
    target would take at least once in expectation (``Σ π_e(a|x_i) >= 1`` over the context's
    rounds) but no round of that context logged; ``warnings``: one sentence per problem."""

    n: int
    ess: float
    min_propensity: float | None
    max_weight: float
    unsupported_mass: float
    never_logged: list[tuple[Hashable, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def importance_weights(target_logged: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """``w_i = π_e(a_i|x_i) / p_i``, shape (n,).

    Raises:
        ValueError: a propensity is not in (0, 1], or the shapes differ.
    """
    target_logged = np.asarray(target_logged, dtype=float)
    propensity = np.asarray(propensity, dtype=float)
    if target_logged.shape != propensity.shape:
        raise ValueError(f"shapes differ: target {target_logged.shape}, "
                         f"propensity {propensity.shape}")
    if propensity.size and (propensity.min() <= 0 or propensity.max() > 1):
        raise ValueError("propensities must be in (0, 1]: a logged action had probability "
                         f"{propensity.min() if propensity.min() <= 0 else propensity.max()}")
    return target_logged / propensity


def ips(reward: np.ndarray, weights: np.ndarray) -> float:
    """Inverse propensity scoring (Horvitz–Thompson): ``mean(w r)``; NaN for no rounds."""
    return float(np.mean(weights * reward)) if len(reward) else float("nan")


def snips(reward: np.ndarray, weights: np.ndarray) -> float:
    """Self-normalised IPS (Swaminathan & Joachims 2015): ``Σ w r / Σ w``; NaN when Σw = 0."""
    total = float(np.sum(weights))
    return float(np.sum(weights * reward)) / total if total > 0 else float("nan")


def dr_terms(reward: np.ndarray, weights: np.ndarray, q_logged: np.ndarray,
             q_target: np.ndarray) -> np.ndarray:
    """The per-round doubly robust terms ``q̂(x_i, π_e) + w_i (r_i − q̂(x_i, a_i))``, shape
    (n,): ``q_logged[i] = q̂(x_i, a_i)``, ``q_target[i] = Σ_a π_e(a|x_i) q̂(x_i, a)``."""
    return q_target + weights * (reward - q_logged)


def doubly_robust(reward: np.ndarray, weights: np.ndarray, q_logged: np.ndarray,
                  q_target: np.ndarray) -> float:
    """Doubly robust estimate (Dudík, Langford & Li 2011): the mean of :func:`dr_terms`."""
    if not len(reward):
        return float("nan")
    return float(np.mean(dr_terms(reward, weights, q_logged, q_target)))


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(Σw)² / Σw²`` (n for equal weights; 0 for all zero)."""
    sq = float(np.sum(np.square(weights)))
    return float(np.sum(weights)) ** 2 / sq if sq > 0 else 0.0


def cell_mean_model(contexts: Sequence[Hashable], actions: np.ndarray, outcome: np.ndarray,
                    n_actions: int, *, prior_strength: float = DEFAULT_PRIOR_STRENGTH,
                    folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """The direct-method reward model ``q̂(x_i, a)`` for every round and action, shape
    (n, n_actions), cross-fitted over ``folds`` folds (1: fitted on every round).

    ``q̂(x, a)`` is the mean outcome of the training rounds of context ``x`` that logged
    ``a``, shrunk toward the action's mean, itself shrunk toward the global mean: with ``κ =
    prior_strength`` pseudo-observations at each level,
    ``m = mean(r)``, ``m_a = (S_a + κ m) / (N_a + κ)``, ``q̂(x,a) = (S_xa + κ m_a) / (N_xa + κ)``
    (``S`` sums and ``N`` counts the training outcomes of the cell). For 0/1 outcomes this is
    the posterior mean under a Beta prior of strength κ centred on the parent mean: partial
    pooling (Gelman et al., "Bayesian Data Analysis", 3rd ed., §5.3). A cell never logged
    gets its action's mean, an action never logged the global mean. Fold membership is a
    permutation drawn from ``seed``; each fold is predicted by the model of the other folds
    (Chernozhukov et al. 2018), so no round's outcome enters its own prediction.

    Raises:
        ValueError: ``folds`` < 1, or the inputs' lengths differ.
    """
    n = len(outcome)
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if len(contexts) != n or len(actions) != n:
        raise ValueError(f"lengths differ: {len(contexts)} contexts, {len(actions)} actions, "
                         f"{n} outcomes")
    outcome = np.asarray(outcome, dtype=float)
    q = np.zeros((n, n_actions))
    if n == 0:
        return q
    folds = min(folds, n)
    fold = np.empty(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    ctx_index = _index(contexts)
    for k in range(folds):
        train = fold != k if folds > 1 else np.ones(n, dtype=bool)
        predict = fold == k if folds > 1 else train
        q[predict] = _fit_cells(ctx_index, actions, outcome, train, n_actions,
                                prior_strength)[ctx_index[predict]]
    return q


def _index(contexts: Sequence[Hashable]) -> np.ndarray:
    """Each context's position among the distinct contexts (first-seen order), shape (n,)."""
    seen: dict[Hashable, int] = {}
    return np.array([seen.setdefault(c, len(seen)) for c in contexts], dtype=int)


def _fit_cells(ctx: np.ndarray, actions: np.ndarray, outcome: np.ndarray, train: np.ndarray,
               n_actions: int, kappa: float) -> np.ndarray:
    """q̂ for every (context index, action), shape (n_contexts, n_actions), from ``train``."""
    n_ctx = int(ctx.max()) + 1
    c, a, r = ctx[train], actions[train], outcome[train]
    m = float(r.mean()) if len(r) else 0.0
    n_a = np.bincount(a, minlength=n_actions).astype(float)
    s_a = np.bincount(a, weights=r, minlength=n_actions)
    if kappa > 0:
        m_a = (s_a + kappa * m) / (n_a + kappa)
    else:
        m_a = np.where(n_a > 0, s_a / np.maximum(n_a, 1), m)
    cell = c * n_actions + a
    n_xa = np.bincount(cell, minlength=n_ctx * n_actions).reshape(n_ctx, n_actions).astype(float)
    s_xa = np.bincount(cell, weights=r, minlength=n_ctx * n_actions).reshape(n_ctx, n_actions)
    if kappa > 0:
        return (s_xa + kappa * m_a) / (n_xa + kappa)
    return np.where(n_xa > 0, s_xa / np.maximum(n_xa, 1), m_a)


def bootstrap_intervals(reward: np.ndarray, weights: np.ndarray, q_logged: np.ndarray,
                        q_target: np.ndarray, *, n_bootstrap: int = DEFAULT_BOOTSTRAP,
                        alpha: float = DEFAULT_ALPHA, seed: int = 0) -> dict[str, Interval]:
    """IPS, SNIPS and DR point estimates with percentile bootstrap intervals: ``n_bootstrap``
    resamples of the rounds with replacement (numpy ``default_rng(seed)``, so the same seed
    and ``n`` resample the same rounds for every outcome), the ``alpha/2`` and ``1 − alpha/2``
    percentiles of each estimator over them. The reward model is held fixed across resamples
    (as obp's ``estimate_interval`` does): the intervals are conditional on ``q̂``.

    Raises:
        ValueError: ``n_bootstrap`` < 1 or ``alpha`` not in (0, 1).
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    reward, weights = np.asarray(reward, dtype=float), np.asarray(weights, dtype=float)
    wr = weights * reward
    terms = dr_terms(reward, weights, q_logged, q_target)
    point = {"ips": ips(reward, weights), "snips": snips(reward, weights),
             "dr": doubly_robust(reward, weights, q_logged, q_target)}
    n = len(reward)
    if n == 0:
        return {k: Interval(v, float("nan"), float("nan")) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    samples = {k: np.empty(n_bootstrap) for k in ESTIMATORS}
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        sum_w = weights[idx].sum(axis=1)
        sum_wr = wr[idx].sum(axis=1)
        samples["ips"][start:start + b] = sum_wr / n
        with np.errstate(invalid="ignore", divide="ignore"):
            samples["snips"][start:start + b] = np.where(sum_w > 0, sum_wr / sum_w, np.nan)
        samples["dr"][start:start + b] = terms[idx].mean(axis=1)
    out = {}
    for k in ESTIMATORS:
        s = samples[k][~np.isnan(samples[k])]
        low, high = (np.percentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(s)
                     else (float("nan"), float("nan")))
        out[k] = Interval(point[k], float(low), float(high))
    return out


def diagnose(contexts: Sequence[Hashable], actions: np.ndarray, behaviour: np.ndarray,
             target: np.ndarray, *, action_names: Sequence[str] | None = None,
             min_propensity: float = DEFAULT_MIN_PROPENSITY,
             min_ess_fraction: float = DEFAULT_MIN_ESS_FRACTION) -> Diagnostics:
    """Effective sample size, propensity and support checks of a target on a log.

    ``behaviour`` and ``target``: shape (n, K), ``π_b(a|x_i)`` and ``π_e(a|x_i)``; ``actions``:
    the logged action indices, shape (n,). Warns when a propensity the target relies on is
    below ``min_propensity``, when the ESS is below ``min_ess_fraction`` of n, when the target
    puts probability on actions of zero propensity (support deficiency: IPS is then biased
    low, Sachdeva, Su & Joachims, "Off-policy bandits with deficient support", KDD 2020), and
    when it would take an action (once or more, in expectation) that no round of its context
    logged. ``action_names`` name the actions in the warnings (default: their indices).
    """
    n = len(actions)
    names = (list(action_names) if action_names is not None
             else [str(k) for k in range(target.shape[1])])
    rows = np.arange(n)
    p = behaviour[rows, actions]
    w = target[rows, actions] / p if n else np.zeros(0)
    ess = effective_sample_size(w)
    relied = w > 0
    min_p = float(p[relied].min()) if relied.any() else None
    max_w = float(w.max()) if n else 0.0
    unsupported = (float(np.mean(np.sum(np.where(behaviour <= 0, target, 0.0), axis=1)))
                   if n else 0.0)
    logged = {(c, int(a)) for c, a in zip(contexts, actions)}
    expected: dict[Hashable, np.ndarray] = defaultdict(lambda: np.zeros(target.shape[1]))
    for c, row in zip(contexts, target):
        expected[c] += row
    # a pair counts once the target would have taken it about once or more in that context:
    # a spread-out target over many rare contexts misses some pairs by chance alone
    never = sorted(((c, int(a)) for c, exp in expected.items()
                    for a in np.flatnonzero(exp >= 1.0 - 1e-9) if (c, int(a)) not in logged),
                   key=lambda ca: (str(ca[0]), ca[1]))
    warnings = []
    if min_p is not None and min_p < min_propensity:
        small = int(np.sum(relied & (p < min_propensity)))
        warnings.append(f"{small} round(s) the target relies on have a logged propensity below "
                        f"{min_propensity:g} (min {min_p:.4g}, weight up to {max_w:.4g}): a few "
                        "rounds dominate IPS; prefer SNIPS/DR and check the intervals")
    if n and ess < min_ess_fraction * n:
        warnings.append(f"effective sample size {ess:.1f} is {ess / n:.1%} of {n} rounds (below "
                        f"{min_ess_fraction:.0%}): the target rarely does what the log did, so "
                        "the estimates rest on few rounds")
    if unsupported > 0:
        warnings.append(f"{unsupported:.1%} of the target's probability is on actions the logged "
                        "policy could not take (propensity 0): IPS and SNIPS are biased low there, "
                        "DR fills it in from its reward model only")
    if never:
        shown = ", ".join(f"{_show(c)} {names[a]}" for c, a in never[:5])
        more = f" and {len(never) - 5} more" if len(never) > 5 else ""
        warnings.append(f"target actions never logged in their context: {shown}{more}: no "
                        "observation of them there, only the reward model's guess (DR)")
    return Diagnostics(n=n, ess=ess, min_propensity=min_p, max_weight=max_w,
                       unsupported_mass=unsupported, never_logged=never, warnings=warnings)


def _show(context: Hashable) -> str:
    return "/".join(map(str, context)) if isinstance(context, tuple) else str(context)
