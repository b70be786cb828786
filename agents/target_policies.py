"""Target policies for offline policy evaluation (``rmo evaluate-policy --policy NAME``).

A target policy says, for one logged routing decision, with what probability it would have
taken each action that was available then (the keys of ``ProviderSelected.action_probabilities``:
actions whose providers' breakers admitted them), or that it cannot act in that round (its
action was unavailable). :mod:`streams.policy_eval` weighs the logged outcomes by these
probabilities (agents/ope.py) and leaves the rounds a target cannot act in out of the
estimate, counting them.

Names (:func:`resolve`): ``provider:ID`` (always ``ID:single``), ``random`` (uniform over the
available actions), ``greedy`` (the argmax of the logged ``q_values``, ties to the earliest
action: under ε-greedy the behaviour's exploit policy, as agents/qlearning.select computes it;
under other policies the argmax of the scores they logged, e.g. posterior means), ``logged``
(the behaviour policy itself: its estimate is the on-policy mean, a sanity check). A YAML
mapping file (:func:`load_policy_file`) routes by task type. :func:`register` adds a kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class UnknownPolicy(ValueError):
    """A policy name no registered kind accepts, or an invalid policy file. The message
    names the known kinds or the file and field."""


@dataclass(frozen=True)
class Decision:
    """What a target policy sees of one logged decision: the ``available`` actions in the
    router's order, the behaviour's propensities and Q-values of each (``behaviour``,
    ``q_values``), and the task's features."""

    available: tuple[str, ...]
    behaviour: Mapping[str, float]
    q_values: Mapping[str, float]
    task_type: str
    complexity: str


class TargetPolicy(Protocol):
    """``probabilities(d)``: action -> probability over ``d.available`` (summing to 1), or
    None when the policy cannot act in that round. ``name`` identifies it in reports."""

    name: str

    def probabilities(self, d: Decision) -> dict[str, float] | None: ...


@dataclass(frozen=True)
class Deterministic:
    """Always ``action`` (None where it is unavailable); ``provider:ID`` is ``ID:single``."""

    name: str
    action: str

    def probabilities(self, d: Decision) -> dict[str, float] | None:
        return {self.action: 1.0} if self.action in d.available else None


@dataclass(frozen=True)
class Uniform:
    """Every available action with probability 1/|available|."""

    name: str = "random"

    def probabilities(self, d: Decision) -> dict[str, float] | None:
        return {a: 1.0 / len(d.available) for a in d.available} if d.available else None


@dataclass(frozen=True)
class Greedy:
    """The available action of highest logged score (``q_values``; missing: 0.0), ties to the
    earliest."""

    name: str = "greedy"

    def probabilities(self, d: Decision) -> dict[str, float] | None:
        if not d.available:
            return None
        order = {a: i for i, a in enumerate(d.available)}
        best = max(d.available, key=lambda a: (d.q_values.get(a, 0.0), -order[a]))
        return {best: 1.0}


@dataclass(frozen=True)
class Logged:
    """The behaviour policy's own propensities."""

    name: str = "logged"

    def probabilities(self, d: Decision) -> dict[str, float] | None:
        return {a: d.behaviour[a] for a in d.available} if d.available else None


@dataclass(frozen=True)
class ByTaskType:
    """A fixed route per task type (``rules``), ``default`` for the others (None: the
    policy does not act on them and those rounds are left out)."""

    name: str
    rules: Mapping[str, str]
    default: str | None

    def probabilities(self, d: Decision) -> dict[str, float] | None:
        action = self.rules.get(d.task_type, self.default)
        return {action: 1.0} if action is not None and action in d.available else None


Factory = Callable[[str | None], TargetPolicy]
"""Builds a policy from the text after ``kind:`` in its name (None when there is none)."""

_REGISTRY: dict[str, tuple[Factory, str]] = {}


def register(kind: str, factory: Factory, usage: str) -> None:
    """Make ``--policy kind`` (or ``kind:ARG``) build ``factory(ARG)``; ``usage`` is how the
    error message for an unknown name shows it (e.g. ``provider:ID``)."""
    _REGISTRY[kind] = (factory, usage)


def _no_argument(kind: str, build: Callable[[], TargetPolicy]) -> Factory:
    def factory(arg: str | None) -> TargetPolicy:
        if arg is not None:
            raise UnknownPolicy(f"policy {kind!r} takes no argument (got {kind}:{arg})")
        return build()
    return factory


def _provider(arg: str | None) -> TargetPolicy:
    if not arg:
        raise UnknownPolicy("policy provider needs a provider id: provider:ID")
    return Deterministic(name=f"provider:{arg}", action=f"{arg}:single")


register("provider", _provider, "provider:ID")
register("random", _no_argument("random", Uniform), "random")
register("greedy", _no_argument("greedy", Greedy), "greedy")
register("logged", _no_argument("logged", Logged), "logged")


def known() -> list[str]:
    """The usages of every registered kind, e.g. ``["provider:ID", "random", ...]``."""
    return [usage for _, usage in _REGISTRY.values()]


def resolve(name: str) -> TargetPolicy:
    """The policy ``name`` stands for: ``kind`` or ``kind:ARG`` of a registered kind.

    Raises:
        UnknownPolicy: no registered kind, or the kind's argument is missing or extra.
    """
    kind, sep, arg = name.partition(":")
    if kind not in _REGISTRY:
        raise UnknownPolicy(f"unknown policy {name!r}; known: {', '.join(known())}, "
                            "or --policy-file FILE")
    return _REGISTRY[kind][0](arg if sep else None)


class PolicyFile(BaseModel):
    """The YAML of ``--policy-file``::

        name: cheap-math            # optional; default: the file name
        default: claude:single      # optional; tasks of other types (omitted: left out)
        task_types:
          math: gemini:single
          string: all:majority
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    default: str | None = Field(default=None, min_length=1)
    task_types: dict[str, str] = Field(default_factory=dict)


def load_policy_file(path: Path) -> ByTaskType:
    """The task-type routing of ``path`` (:class:`PolicyFile`).

    Raises:
        UnknownPolicy: the file is unreadable, not YAML, or not a :class:`PolicyFile` (the
            message names the file and the field).
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UnknownPolicy(f"{path}: {exc}".splitlines()[0]) from None
    try:
        spec = PolicyFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise UnknownPolicy(f"{path}: " + "; ".join(
            f"field '{'.'.join(map(str, e['loc'])) or '(root)'}': {e['msg']}"
            for e in exc.errors()[:3])) from None
    if not spec.task_types and spec.default is None:
        raise UnknownPolicy(f"{path}: no route: give task_types (task type -> action) "
                            "and/or default")
    return ByTaskType(name=spec.name or f"file:{path.name}", rules=spec.task_types,
                      default=spec.default)
