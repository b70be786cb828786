"""Consensus manager: combine several providers' candidates into one answer (SPEC §4).

The strategies are the Grokputer seed's (``single``, ``majority``, ``weighted``,
``first_valid``, ``unanimous``, ``best_of_n``). They are pure functions of
:class:`CandidateView` lists: the executor measures each candidate (does it compile, what
does it output on the visible examples, see :mod:`agents.examples`) and this module only
decides, so every decision can be recomputed from recorded events.

Candidates "agree" when they behave the same: equal behaviour ``signature`` (e.g. the JSON of
their outputs on the visible examples). A candidate whose behaviour is unknown
(``signature is None``) agrees only with candidates of identical normalised text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["STRATEGIES", "CandidateView", "ConsensusResult", "decide"]


@dataclass(frozen=True)
class CandidateView:
    """What consensus needs to know about one provider's answer.

    ``parses``: ``compile()`` succeeded (for text answers the caller decides, usually True).
    ``signature``: behaviour signature, None if unknown or the candidate failed to run.
    ``passes_examples``: None when the task has no visible examples.
    ``weight``: the provider's learned value or accuracy, used by ``weighted`` only.
    """

    provider: str
    text: str
    parses: bool
    signature: str | None
    passes_examples: bool | None
    weight: float = 1.0


@dataclass(frozen=True)
class ConsensusResult:
    """The decision. ``agreement`` in [0, 1] is the size of the chosen candidate's behaviour
    group over the number of candidates (1.0 for ``single``, 0.0 when nothing is chosen).
    ``escalate`` is set by ``unanimous`` when the candidates disagree."""

    chosen: CandidateView | None
    agreement: float
    strategy: str
    escalate: bool = False


def _normalise(text: str) -> str:
    """Text with line endings unified, trailing spaces and surrounding blank lines removed:
    differences no reader (or interpreter) would call a different answer."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _key(candidate: CandidateView) -> tuple[str, str]:
    """The behaviour group a candidate belongs to."""
    if candidate.signature is not None:
        return ("signature", candidate.signature)
    return ("text", _normalise(candidate.text))


def _agreement(candidates: list[CandidateView], index: int) -> float:
    """Share of candidates in the same behaviour group as ``candidates[index]``."""
    key = _key(candidates[index])
    return sum(1 for c in candidates if _key(c) == key) / len(candidates)


def _vote(candidates: list[CandidateView], weights: list[float]) -> int:
    """Index of the winner of a group vote: the earliest member of the heaviest group.

    A group weighs the sum of its members' ``weights``. Only parsing candidates vote when at
    least one parses, so a popular syntax error never beats a working answer. Ties go to
    the group whose earliest member comes first.
    """
    eligible = [i for i, c in enumerate(candidates) if c.parses] or list(range(len(candidates)))
    groups: dict[tuple[str, str], list[int]] = {}
    for index in eligible:
        groups.setdefault(_key(candidates[index]), []).append(index)
    best = max(
        groups.values(), key=lambda members: (math.fsum(weights[i] for i in members), -members[0])
    )
    return best[0]


def _single(candidates: list[CandidateView]) -> ConsensusResult:
    return ConsensusResult(candidates[0], 1.0, "single")


def _majority(candidates: list[CandidateView]) -> ConsensusResult:
    winner = _vote(candidates, [1.0] * len(candidates))
    return ConsensusResult(candidates[winner], _agreement(candidates, winner), "majority")


def _clean_weight(weight: float) -> float:
    """Votes cannot be negative or NaN: a provider with a negative learned value (rewards
    subtract cost) or a corrupt weight simply gets no vote."""
    return weight if math.isfinite(weight) and weight > 0 else 0.0


def _weighted(candidates: list[CandidateView]) -> ConsensusResult:
    weights = [_clean_weight(c.weight) for c in candidates]
    if not any(weights):
        # Nobody has a vote worth anything: fall back to one candidate, one vote.
        weights = [1.0] * len(candidates)
    winner = _vote(candidates, weights)
    return ConsensusResult(candidates[winner], _agreement(candidates, winner), "weighted")


def _first_valid(candidates: list[CandidateView]) -> ConsensusResult:
    for index, candidate in enumerate(candidates):
        if candidate.parses and candidate.passes_examples is not False:
            return ConsensusResult(candidate, _agreement(candidates, index), "first_valid")
    return ConsensusResult(None, 0.0, "first_valid")


def _unanimous(candidates: list[CandidateView]) -> ConsensusResult:
    winner = _vote(candidates, [1.0] * len(candidates))
    agreement = _agreement(candidates, winner)
    return ConsensusResult(candidates[winner], agreement, "unanimous", escalate=agreement < 1.0)


def _score(candidate: CandidateView) -> float:
    """Validator-style score: 1 for compiling plus 1 for passing the visible examples
    (0.5 when there are none: unknown ranks above known failure)."""
    examples = {True: 1.0, None: 0.5, False: 0.0}[candidate.passes_examples]
    return float(candidate.parses) + examples


def _best_of_n(candidates: list[CandidateView]) -> ConsensusResult:
    # Ties on score go to the candidate more others agree with, then to the earliest.
    support = [_agreement(candidates, i) for i in range(len(candidates))]
    winner = max(range(len(candidates)), key=lambda i: (_score(candidates[i]), support[i], -i))
    return ConsensusResult(candidates[winner], support[winner], "best_of_n")


_STRATEGY_FUNCTIONS: dict[str, Callable[[list[CandidateView]], ConsensusResult]] = {
    "single": _single,
    "majority": _majority,
    "weighted": _weighted,
    "first_valid": _first_valid,
    "unanimous": _unanimous,
    "best_of_n": _best_of_n,
}

STRATEGIES: tuple[str, ...] = tuple(_STRATEGY_FUNCTIONS)
"""Every strategy name :func:`decide` accepts."""


def decide(strategy: str, candidates: list[CandidateView]) -> ConsensusResult:
    """Choose among ``candidates`` (in the order the providers were asked) by ``strategy``.

    - ``single``: the first candidate; agreement 1.0.
    - ``majority``: the largest behaviour group wins, ties to the group with the earliest
      member; only parsing candidates vote when any parses. The chosen candidate is the
      group's earliest member.
    - ``weighted``: as majority, but a group scores the sum of its members' weights
      (negative or non-finite weights count 0; all zero falls back to majority).
    - ``first_valid``: the first candidate that parses and does not fail the visible
      examples; ``chosen`` is None when there is none.
    - ``unanimous``: the majority winner, with ``escalate=True`` unless every candidate is
      in one behaviour group.
    - ``best_of_n``: the highest score (parses + passes the examples), ties to the candidate
      with the larger behaviour group, then the earliest.

    Agreement is always the chosen candidate's group size over ``len(candidates)``, except
    for ``single``. An empty list gives ``chosen=None, agreement=0.0``.

    Raises:
        ValueError: ``strategy`` is not one of :data:`STRATEGIES`.
    """
    function = _STRATEGY_FUNCTIONS.get(strategy)
    if function is None:
        raise ValueError(f"unknown consensus strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not candidates:
        return ConsensusResult(None, 0.0, strategy)
    return function(candidates)
