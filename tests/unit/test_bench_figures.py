"""The bench's figures computed from recorded events (streams/bench.py)."""

from hypothesis import given
from hypothesis import strategies as st

from streams.bench import peak_overlap


def test_touching_intervals_do_not_overlap() -> None:
    assert peak_overlap([(0, 1000), (1000, 2000)]) == 1


def test_nested_and_disjoint_calls() -> None:
    spans = [(0, 1000), (100, 1100), (200, 300), (1500, 2500)]
    assert peak_overlap(spans) == 3
    assert peak_overlap([]) == 0


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 20)).map(lambda t: (t[0], t[0] + t[1])),
                max_size=30))
def test_peak_equals_the_most_intervals_open_at_any_instant(spans: list[tuple[int, int]]) -> None:
    # brute force over half-integer instants: intervals are [start, end) of integers
    most = max((sum(1 for s, e in spans if s <= t + 0.5 < e) for t in range(80)), default=0)
    assert peak_overlap(spans) == most
