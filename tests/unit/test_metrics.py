"""streams/metrics.py: percentiles over 1 ms latency histograms."""

from __future__ import annotations

import random

import pytest

from streams.metrics import percentile


@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 1.0])
def test_empty_histogram_is_zero(q: float) -> None:
    assert percentile({}, q) == 0.0
    assert percentile({12: 0, 40: 0}, q) == 0.0


@pytest.mark.parametrize("q", [0.0, 0.01, 0.5, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("count", [1, 2, 1000])
def test_single_bucket_is_that_bucket(q: float, count: int) -> None:
    assert percentile({37: count}, q) == 37.0


def test_returns_float() -> None:
    assert isinstance(percentile({5: 3}, 0.5), float)


def test_p50_of_small_odd_distribution_is_the_median() -> None:
    assert percentile({1: 1, 2: 1, 3: 1}, 0.5) == 2.0
    assert percentile({10: 2, 20: 1, 30: 2}, 0.5) == 20.0


def test_p50_of_skewed_distribution() -> None:
    # 70 fast calls at 5 ms, 30 slow ones at 500 ms: the median is fast
    assert percentile({5: 70, 500: 30}, 0.5) == 5.0
    assert percentile({5: 30, 500: 70}, 0.5) == 500.0


def test_uniform_1_to_100() -> None:
    h = {ms: 1 for ms in range(1, 101)}
    assert percentile(h, 0.0) == 1.0
    assert percentile(h, 0.5) == 50.0
    assert percentile(h, 0.95) == 95.0
    assert percentile(h, 0.99) == 99.0
    assert percentile(h, 1.0) == 100.0


def test_p95_sees_the_tail() -> None:
    h = {10: 90, 250: 10}
    assert percentile(h, 0.5) == 10.0
    assert percentile(h, 0.95) == 250.0
    # lower nearest rank: index floor(0.95 * 99) = 94 of 100 sorted samples
    assert percentile({10: 94, 250: 6}, 0.95) == 250.0
    assert percentile({10: 95, 250: 5}, 0.95) == 10.0
    assert percentile({10: 97, 250: 3}, 0.95) == 10.0


def test_order_of_buckets_does_not_matter() -> None:
    h = {300: 4, 1: 10, 75: 6, 12: 30}
    reordered = dict(sorted(h.items(), reverse=True))
    for q in (0.0, 0.25, 0.5, 0.9, 0.95, 1.0):
        assert percentile(h, q) == percentile(reordered, q)
    assert percentile(h, 0.0) == 1.0
    assert percentile(h, 1.0) == 300.0


def test_zero_count_buckets_are_ignored() -> None:
    h = {0: 0, 5: 3, 9: 0, 1000: 0}
    for q in (0.0, 0.5, 1.0):
        assert percentile(h, q) == 5.0


def test_matches_sorted_sample_lower_rank() -> None:
    rng = random.Random(2024)
    for _ in range(50):
        samples = [int(rng.expovariate(1 / 40)) for _ in range(rng.randint(1, 400))]
        h: dict[int, int] = {}
        for s in samples:
            h[s] = h.get(s, 0) + 1
        ordered = sorted(samples)
        for q in (0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0):
            # the sample at index floor(q * (n - 1)) of the sorted samples
            expected = ordered[int(q * (len(ordered) - 1))]
            assert percentile(h, q) == float(expected)


def test_percentile_is_monotone_in_q() -> None:
    h = {3: 5, 8: 1, 20: 7, 90: 2, 400: 1}
    qs = [i / 100 for i in range(101)]
    values = [percentile(h, q) for q in qs]
    assert values == sorted(values)
    assert set(values) == set(map(float, h))
