"""agents.consensus: every strategy, its ties and edge cases."""

from __future__ import annotations

import math

import pytest

from agents.consensus import STRATEGIES, CandidateView, ConsensusResult, decide


def view(
    provider: str,
    signature: str | None = None,
    *,
    text: str | None = None,
    parses: bool = True,
    passes: bool | None = True,
    weight: float = 1.0,
) -> CandidateView:
    return CandidateView(
        provider=provider,
        text=text if text is not None else f"answer of {provider}",
        parses=parses,
        signature=signature,
        passes_examples=passes,
        weight=weight,
    )


def chosen(result: ConsensusResult) -> str | None:
    return None if result.chosen is None else result.chosen.provider


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_handles_empty_and_one(strategy: str) -> None:
    empty = decide(strategy, [])
    assert (empty.chosen, empty.agreement, empty.strategy) == (None, 0.0, strategy)
    one = decide(strategy, [view("a", "s")])
    assert (chosen(one), one.agreement, one.strategy, one.escalate) == ("a", 1.0, strategy, False)


def test_unknown_strategy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="majority") as info:
        decide("plurality", [view("a")])
    assert all(name in str(info.value) for name in STRATEGIES)
    with pytest.raises(ValueError):
        decide("plurality", [])


def test_single_takes_the_first_whatever_it_is() -> None:
    result = decide("single", [view("a", "x", parses=False), view("b", "y"), view("c", "y")])
    assert (chosen(result), result.agreement) == ("a", 1.0)


def test_majority_largest_behaviour_group_wins() -> None:
    result = decide("majority", [view("a", "x"), view("b", "y"), view("c", "y")])
    assert (chosen(result), result.agreement) == ("b", pytest.approx(2 / 3))


def test_majority_tie_goes_to_group_with_earliest_candidate() -> None:
    result = decide("majority", [view("a", "x"), view("b", "y"), view("c", "y"), view("d", "x")])
    assert (chosen(result), result.agreement) == ("a", 0.5)


def test_majority_prefers_parsing_candidates() -> None:
    broken = [view(p, text="def f(:", parses=False, passes=False) for p in "abc"]
    result = decide("majority", [*broken, view("d", "ok")])
    assert (chosen(result), result.agreement) == ("d", 0.25)
    # With nothing parsing, the biggest broken group still wins (the validator will say why).
    only_broken = decide("majority", [*broken, view("d", text="x(", parses=False)])
    assert (chosen(only_broken), only_broken.agreement) == ("a", 0.75)


def test_unknown_behaviour_groups_by_normalised_text() -> None:
    candidates = [
        view("a", None, text="def f():\n    return 1"),
        view("b", "sig", text="def f():\n    return 1"),  # known behaviour: another group
        view("c", None, text="\ndef f():   \r\n    return 1\n\n"),
        view("d", None, text="def f():\n  return 1"),  # indentation matters
    ]
    result = decide("majority", candidates)
    assert (chosen(result), result.agreement) == ("a", 0.5)


def test_weighted_heavy_provider_outvotes_two_light_ones() -> None:
    candidates = [
        view("a", "x", weight=0.3),
        view("b", "x", weight=0.3),
        view("c", "y", weight=0.9),
    ]
    result = decide("weighted", candidates)
    assert (chosen(result), result.agreement) == ("c", pytest.approx(1 / 3))
    assert chosen(decide("majority", candidates)) == "a"


def test_weighted_ties_and_bad_weights() -> None:
    tie = decide("weighted", [view("a", "x", weight=0.5), view("b", "y", weight=0.25),
                              view("c", "y", weight=0.25)])  # fmt: skip
    assert chosen(tie) == "a"
    negative = decide("weighted", [view("a", "x", weight=-5.0), view("b", "x", weight=math.nan),
                                   view("c", "y", weight=0.1)])  # fmt: skip
    assert chosen(negative) == "c"
    # Nobody has a positive weight: one candidate, one vote.
    zero = decide("weighted", [view("a", "x", weight=0.0), view("b", "y", weight=-1.0),
                               view("c", "y", weight=0.0)])  # fmt: skip
    assert (chosen(zero), zero.agreement) == ("b", pytest.approx(2 / 3))


def test_weighted_ignores_non_parsing_weight() -> None:
    result = decide("weighted", [view("a", "x", parses=False, weight=10.0), view("b", "y")])
    assert chosen(result) == "b"


def test_first_valid_skips_broken_and_failing() -> None:
    candidates = [
        view("a", "x", parses=False, passes=None),
        view("b", "y", passes=False),
        view("c", "z", passes=True),
        view("d", "z", passes=True),
    ]
    result = decide("first_valid", candidates)
    assert (chosen(result), result.agreement) == ("c", 0.5)
    # No visible examples (None) is not a failure.
    assert chosen(decide("first_valid", [view("a", passes=False), view("b", passes=None)])) == "b"


def test_first_valid_with_no_valid_candidate_chooses_nothing() -> None:
    result = decide("first_valid", [view("a", parses=False), view("b", passes=False)])
    assert (result.chosen, result.agreement) == (None, 0.0)


def test_unanimous_agrees_or_escalates() -> None:
    agreed = decide("unanimous", [view("a", "x"), view("b", "x"), view("c", "x")])
    assert (chosen(agreed), agreed.agreement, agreed.escalate) == ("a", 1.0, False)
    split = decide("unanimous", [view("a", "x"), view("b", "y"), view("c", "y")])
    assert (chosen(split), split.agreement, split.escalate) == ("b", pytest.approx(2 / 3), True)


def test_unanimous_counts_broken_candidates_as_disagreement() -> None:
    result = decide("unanimous", [view("a", "x"), view("b", "x"), view("c", None, parses=False)])
    assert (chosen(result), result.escalate) == ("a", True)


def test_best_of_n_scores_parse_and_examples() -> None:
    candidates = [
        view("a", "x", parses=False, passes=False),
        view("b", "y", passes=False),
        view("c", "z", passes=True),
    ]
    result = decide("best_of_n", candidates)
    assert (chosen(result), result.agreement) == ("c", pytest.approx(1 / 3))
    # Unknown (no examples) ranks above a known failure.
    assert chosen(decide("best_of_n", [view("a", passes=False), view("b", passes=None)])) == "b"


def test_best_of_n_ties_go_to_larger_group_then_earliest() -> None:
    result = decide("best_of_n", [view("a", "x"), view("b", "y"), view("c", "y")])
    assert (chosen(result), result.agreement) == ("b", pytest.approx(2 / 3))
    assert chosen(decide("best_of_n", [view("a", "x"), view("b", "y")])) == "a"


def test_decisions_are_deterministic() -> None:
    candidates = [view(p, s) for p, s in zip("abcdef", "xyzyxy", strict=True)]
    for strategy in STRATEGIES:
        assert decide(strategy, candidates) == decide(strategy, list(candidates))
