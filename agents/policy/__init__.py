"""Routing policies: which action (providers + consensus strategy) a task gets (SPEC §4).

One interface (:class:`agents.policy.base.Policy`), several policies, chosen by
``RMO_POLICY`` (:func:`make_policy`):

- ``thompson`` (default): a contextual bandit, Thompson sampling on the analyzer's features
  (:mod:`agents.policy.bandit`; LiteLLM's adaptive router is Thompson sampling on the request
  type);
- ``epsilon-greedy``: the seed's tabular Q-learning (Grokputer diagram 4,
  :mod:`agents.policy.epsilon_greedy`);
- ``random``, ``round-robin``, ``cascade`` (always the cascade action: cheapest provider
  first, escalating while the answer fails the prompt's visible examples; FrugalGPT) and
  ``provider:ID``: fixed baselines (:mod:`agents.policy.fixed`).

Every policy returns its action's propensity and every other action's, and no admissible
action's propensity falls below ``propensity_floor`` (unless the policy is deterministic by
design: the fixed baselines), so the decision log stays usable for offline policy evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agents.policy.bandit import ThompsonPolicy
from agents.policy.base import Context, Policy, Snapshot
from agents.policy.epsilon_greedy import EpsilonGreedyPolicy
from agents.policy.fixed import FixedActionPolicy, RandomPolicy, RoundRobinPolicy

LEARNED = ("thompson", "epsilon-greedy")
BASELINES = ("random", "round-robin", "cascade")


def policy_names(provider_ids: Sequence[str]) -> list[str]:
    """Every policy name ``RMO_POLICY`` accepts for these providers."""
    return [*LEARNED, *BASELINES, *(f"provider:{p}" for p in provider_ids)]


def make_policy(name: str, provider_ids: Sequence[str], settings,
                prices: Mapping[str, tuple[float, float]] | None = None) -> Policy:
    """The policy called ``name`` (see :func:`policy_names`); ``prices``: action -> (input,
    output) USD per million tokens of the providers it calls first (the bandit's cost prior).

    Raises:
        ValueError: ``name`` is not a policy, or names a provider that is not configured.
    """
    floor = settings.propensity_floor
    if name == "thompson":
        return ThompsonPolicy(cost_weight=settings.cost_weight, floor=floor,
                              samples=settings.thompson_samples,
                              prior_strength=settings.thompson_prior_strength,
                              prices=dict(prices or {}))
    if name == "epsilon-greedy":
        from agents.executor import qconfig

        return EpsilonGreedyPolicy(qconfig(settings), floor=floor)
    if name == "random":
        return RandomPolicy()
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "cascade":
        return FixedActionPolicy("cascade", name)
    if name.startswith("provider:") and name.removeprefix("provider:") in provider_ids:
        return FixedActionPolicy(f"{name.removeprefix('provider:')}:single", name)
    raise ValueError(f"RMO_POLICY={name!r} is not a policy; choose one of "
                     f"{', '.join(policy_names(provider_ids))}")


__all__ = ["BASELINES", "LEARNED", "Context", "Policy", "Snapshot", "make_policy", "policy_names"]
