"""agents/breaker.py: the pure circuit-breaker state machine (SPEC §4, Grokputer diagram 5)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterable
from dataclasses import replace

import pytest

from agents.breaker import (
    FOREVER_MS,
    BreakerConfig,
    BreakerState,
    Transition,
    admission,
    apply_command,
    apply_outcome,
)

CFG = BreakerConfig()
TIMEOUT = CFG.open_timeout_ms


def run(
    outcomes: Iterable[tuple[bool, int]],
    cfg: BreakerConfig = CFG,
    start: BreakerState | None = None,
) -> tuple[BreakerState, list[Transition]]:
    s = start or BreakerState()
    all_t: list[Transition] = []
    for ok, at in outcomes:
        s, t = apply_outcome(s, ok, at, cfg)
        all_t.extend(t)
    return s, all_t


def fails(n: int, start_ms: int = 1_000, step: int = 10) -> list[tuple[bool, int]]:
    return [(False, start_ms + i * step) for i in range(n)]


def opened(at_ms: int = 1_000, cfg: BreakerConfig = CFG) -> BreakerState:
    """A breaker that opened at ``at_ms`` (its last failure)."""
    n = cfg.failure_threshold
    s, _ = run(fails(n, start_ms=at_ms - (n - 1) * 10), cfg)
    assert s.state == "open" and s.opened_at_ms == at_ms
    return s


# --------------------------------------------------------------------------- closed


def test_fresh_breaker_is_closed_and_allows() -> None:
    s = BreakerState()
    assert (s.state, s.failures, s.successes) == ("closed", 0, 0)
    assert admission(s, 0, CFG) == "allow"


def test_four_failures_keep_it_closed() -> None:
    s, t = run(fails(4))
    assert s.state == "closed"
    assert s.failures == 4
    assert t == []
    assert admission(s, 10_000, CFG) == "allow"


def test_five_consecutive_failures_open_it() -> None:
    s, t = run(fails(5, start_ms=1_000))
    assert s.state == "open"
    assert s.failures == 5
    assert s.opened_at_ms == 1_040  # the time of the fifth failure
    assert len(t) == 1
    t0 = t[0]
    assert (t0.from_state, t0.to_state, t0.failures, t0.successes) == ("closed", "open", 5, 0)
    assert "5" in t[0].reason


def test_a_success_resets_the_consecutive_count() -> None:
    outcomes = fails(4) + [(True, 2_000)] + fails(4, start_ms=3_000)
    s, t = run(outcomes)
    assert s.state == "closed"
    assert s.failures == 4
    assert t == []
    s, t = apply_outcome(s, False, 4_000, CFG)
    assert s.state == "open" and s.opened_at_ms == 4_000
    assert len(t) == 1


def test_success_when_closed_has_no_transition_and_keeps_successes_zero() -> None:
    s, t = apply_outcome(BreakerState(failures=3), True, 5, CFG)
    assert (s.state, s.failures, s.successes, s.window) == ("closed", 0, 0, ".")
    assert t == []


# --------------------------------------------------------------------------- open


@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize("delta", [0, 1, TIMEOUT // 2, TIMEOUT - 1])
def test_outcomes_while_open_before_timeout_are_ignored(ok: bool, delta: int) -> None:
    s0 = opened(1_000)
    s, t = apply_outcome(s0, ok, 1_000 + delta, CFG)
    assert s == s0
    assert t == []


def test_many_in_flight_outcomes_while_open_change_nothing() -> None:
    s0 = opened(1_000)
    s, t = run([(i % 3 == 0, 1_000 + i * 100) for i in range(500)], start=s0)
    assert s == s0 and t == []


def test_admission_edges_while_open() -> None:
    s = opened(1_000)
    assert admission(s, 1_000, CFG) == "reject"
    assert admission(s, 1_000 + TIMEOUT - 1, CFG) == "reject"
    assert admission(s, 1_000 + TIMEOUT, CFG) == "trial"
    assert admission(s, 1_000 + TIMEOUT + 1, CFG) == "trial"
    assert admission(s, 10**12, CFG) == "trial"


def test_admission_half_open_is_trial_and_closed_allows_at_any_time() -> None:
    assert admission(BreakerState(state="half_open", opened_at_ms=5), 0, CFG) == "trial"
    assert admission(BreakerState(state="half_open", opened_at_ms=10**9), 0, CFG) == "trial"
    closed = BreakerState(state="closed", failures=4, opened_at_ms=10**9)
    assert admission(closed, 0, CFG) == "allow"


# --------------------------------------------------------------------------- open -> half_open


def test_first_success_exactly_at_timeout_moves_to_half_open_and_counts() -> None:
    s0 = opened(1_000)
    s, t = apply_outcome(s0, True, 1_000 + TIMEOUT, CFG)
    assert s.state == "half_open"
    assert s.successes == 1
    assert [(x.from_state, x.to_state) for x in t] == [("open", "half_open")]
    assert admission(s, 1_000 + TIMEOUT, CFG) == "trial"


def test_first_failure_after_timeout_goes_half_open_then_reopens() -> None:
    s0 = opened(1_000)
    at = 1_000 + TIMEOUT + 500
    s, t = apply_outcome(s0, False, at, CFG)
    assert [(x.from_state, x.to_state) for x in t] == [("open", "half_open"), ("half_open", "open")]
    assert s.state == "open"
    assert s.opened_at_ms == at  # a fresh open period
    assert s.successes == 0
    assert s.failures == s0.failures + 1
    assert t[1].failures == s.failures
    # the second consecutive trip opens for twice the timeout (backoff_factor 2)
    assert s.open_until_ms == at + 2 * TIMEOUT
    assert admission(s, at + 2 * TIMEOUT - 1, CFG) == "reject"
    assert admission(s, at + 2 * TIMEOUT, CFG) == "trial"


def test_two_successes_in_half_open_close_it() -> None:
    s0 = opened(1_000)
    s, _t1 = apply_outcome(s0, True, 1_000 + TIMEOUT, CFG)
    assert s.state == "half_open"
    s, t2 = apply_outcome(s, True, 1_000 + TIMEOUT + 1, CFG)
    assert (s.state, s.failures, s.successes, s.trips, s.window) == ("closed", 0, 0, 0, "")
    assert [(x.from_state, x.to_state) for x in t2] == [("half_open", "closed")]
    assert t2[0].successes == 2
    assert admission(s, 1_000 + TIMEOUT + 2, CFG) == "allow"
    # once closed, it again takes a full run of 5 failures to open
    s, t = run(fails(4, start_ms=200_000), start=s)
    assert s.state == "closed" and t == []


def test_failure_after_one_success_in_half_open_reopens_with_new_opened_at() -> None:
    s0 = opened(1_000)
    s, _ = apply_outcome(s0, True, 1_000 + TIMEOUT, CFG)
    s, t = apply_outcome(s, False, 1_000 + TIMEOUT + 7, CFG)
    assert s.state == "open"
    assert s.opened_at_ms == 1_000 + TIMEOUT + 7
    assert s.successes == 0
    assert len(t) == 1
    t0 = t[0]
    assert (t0.from_state, t0.to_state, t0.successes) == ("half_open", "open", 1)
    # and outcomes in the new open window are ignored
    s2, t = apply_outcome(s, True, 1_000 + TIMEOUT + 8, CFG)
    assert s2 == s and t == []


def test_half_open_success_count_restarts_after_reopen() -> None:
    s = opened(0)
    s, _ = apply_outcome(s, True, TIMEOUT, CFG)          # half_open, 1 success
    s, _ = apply_outcome(s, False, TIMEOUT + 1, CFG)     # reopened at TIMEOUT+1 for 2 x TIMEOUT
    s, t = apply_outcome(s, True, 3 * TIMEOUT + 1, CFG)  # half_open again, 1 success
    assert s.state == "half_open" and s.successes == 1
    assert [(x.from_state, x.to_state) for x in t] == [("open", "half_open")]


def test_direct_half_open_state_counts_successes() -> None:
    s = BreakerState(state="half_open", failures=5, successes=0, opened_at_ms=0)
    s, t = apply_outcome(s, True, 1, CFG)
    assert (s.state, s.successes, t) == ("half_open", 1, [])


# --------------------------------------------------------------------------- config


def test_custom_config_is_honoured() -> None:
    cfg = BreakerConfig(failure_threshold=2, open_timeout_ms=1_000, success_threshold=3)
    s, t = run(fails(1), cfg)
    assert s.state == "closed"
    s, t = apply_outcome(s, False, 2_000, cfg)
    assert s.state == "open" and s.opened_at_ms == 2_000 and len(t) == 1
    assert admission(s, 2_999, cfg) == "reject"
    assert admission(s, 3_000, cfg) == "trial"
    s, _ = apply_outcome(s, True, 2_999, cfg)  # still in the open window: ignored
    assert s.state == "open"
    s, _ = apply_outcome(s, True, 3_000, cfg)
    s, _ = apply_outcome(s, True, 3_001, cfg)
    assert s.state == "half_open" and s.successes == 2  # default would have closed here
    s, t = apply_outcome(s, True, 3_002, cfg)
    assert s.state == "closed"
    assert [(x.from_state, x.to_state) for x in t] == [("half_open", "closed")]


def test_threshold_of_one() -> None:
    cfg = BreakerConfig(failure_threshold=1, open_timeout_ms=10, success_threshold=1)
    s, t = apply_outcome(BreakerState(), False, 100, cfg)
    assert s.state == "open" and len(t) == 1
    s, t = apply_outcome(s, True, 110, cfg)
    assert s.state == "closed"
    assert [(x.from_state, x.to_state) for x in t] == [("open", "half_open"),
                                                       ("half_open", "closed")]


def test_default_timeout_does_not_leak_into_custom_config() -> None:
    cfg = BreakerConfig(open_timeout_ms=120_000)
    s = opened(0, cfg)
    assert admission(s, 60_000, cfg) == "reject"
    s2, t = apply_outcome(s, True, 60_000, cfg)
    assert s2 == s and t == []


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    "state",
    [
        BreakerState(),
        BreakerState(state="closed", failures=3),
        BreakerState(state="open", failures=5, opened_at_ms=1_714_000_000_123,
                     open_until_ms=1_714_000_060_123, trips=1, reason="5 consecutive failures"),
        BreakerState(state="half_open", failures=6, successes=1, opened_at_ms=42, window=".xsX"),
        BreakerState(state="open", hold="auth", fingerprint="abc", open_until_ms=FOREVER_MS),
    ],
)
def test_hash_roundtrip_str_and_bytes(state: BreakerState) -> None:
    h = state.to_hash()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.items())
    assert BreakerState.from_hash(h) == state
    as_bytes = {k.encode(): v.encode() for k, v in h.items()}
    assert BreakerState.from_hash(as_bytes) == state


def test_from_empty_hash_is_a_fresh_breaker() -> None:
    assert BreakerState.from_hash({}) == BreakerState()


def test_state_is_frozen() -> None:
    s = BreakerState()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.failures = 3  # type: ignore[misc]


def test_apply_outcome_does_not_mutate_its_input() -> None:
    s0 = BreakerState(failures=4)
    snapshot = s0.to_hash()
    s1, _ = apply_outcome(s0, False, 1, CFG)
    assert s0.to_hash() == snapshot
    assert s1.state == "open"


# --------------------------------------------------------------------------- replay


def _random_history(seed: int, n: int = 400) -> list[tuple[bool, int]]:
    rng = random.Random(seed)
    t, out = 0, []
    for _ in range(n):
        t += rng.choice([1, 50, 1_000, 20_000, 61_000])
        out.append((rng.random() < 0.6, t))
    return out


@pytest.mark.parametrize("seed", range(25))
def test_replay_is_deterministic_and_obeys_invariants(seed: int) -> None:
    history = _random_history(seed)
    cfg = BreakerConfig(failure_threshold=3, open_timeout_ms=30_000, success_threshold=2)

    def replay() -> tuple[list[BreakerState], list[list[Transition]]]:
        s, states, trans = BreakerState(), [], []
        for ok, at in history:
            s, t = apply_outcome(s, ok, at, cfg)
            states.append(s)
            trans.append(t)
        return states, trans

    states_a, trans_a = replay()
    states_b, trans_b = replay()
    assert states_a == states_b
    assert trans_a == trans_b
    # persistence mid-stream does not change the outcome
    s = BreakerState()
    for (ok, at), expected in zip(history, states_a, strict=True):
        s, _ = apply_outcome(BreakerState.from_hash(s.to_hash()), ok, at, cfg)
        assert s == expected

    prev = BreakerState()
    for (ok, at), s, ts in zip(history, states_a, trans_a, strict=True):
        assert len(ts) <= 2
        # transitions chain from the previous state to the new one
        if ts:
            assert ts[0].from_state == prev.state
            assert ts[-1].to_state == s.state
            for a, b in itertools.pairwise(ts):
                assert a.to_state == b.from_state
        else:
            assert s.state == prev.state
        if s.state == "closed":
            assert s.successes == 0 and s.failures < cfg.failure_threshold
        if s.state == "half_open":
            assert 0 < s.successes < cfg.success_threshold
        if s.state == "open" and prev.state != "open":
            assert s.opened_at_ms == at
        if prev.state == "open" and at < prev.opened_at_ms + cfg.open_timeout_ms:
            assert s == prev and ts == []
        prev = s


def test_random_histories_exercise_every_transition() -> None:
    cfg = BreakerConfig(failure_threshold=3, open_timeout_ms=30_000, success_threshold=2)
    seen = set()
    for seed in range(25):
        _, ts = run(_random_history(seed), cfg)
        seen |= {(t.from_state, t.to_state) for t in ts}
    assert seen == {("closed", "open"), ("open", "half_open"), ("half_open", "closed"),
                    ("half_open", "open")}


# --------------------------------------------------------------------------- issue item 1

RATE = BreakerConfig(failure_threshold=100, window_size=10, minimum_calls=10, failure_rate=0.5)


def test_failure_rate_over_the_window_trips_without_consecutive_failures() -> None:
    s, t = BreakerState(), []
    for i in range(10):  # alternate: never 2 consecutive failures, 50 % failed
        s, ti = apply_outcome(s, i % 2 == 1, 1_000 + i, RATE)
        t += ti
    assert s.state == "open" and s.failures == 0
    assert [(x.trigger, x.to_state) for x in t] == [("failure_rate", "open")]
    assert "5/10" in t[0].reason


def test_failure_rate_waits_for_minimum_calls() -> None:
    s, t = run([(i % 2 == 1, i) for i in range(9)], RATE)
    assert s.state == "closed" and t == [] and len(s.window) == 9


def test_window_slides_so_old_failures_drop_out() -> None:
    cfg = BreakerConfig(failure_threshold=100, window_size=10, minimum_calls=10, failure_rate=0.6)
    s, t = run([(False, i) for i in range(5)] + [(True, 10 + i) for i in range(20)], cfg)
    assert s.state == "closed" and t == [] and s.window == "." * 10


def test_slow_call_rate_trips_on_slow_successes() -> None:
    cfg = BreakerConfig(window_size=4, minimum_calls=4, slow_call_ms=100, slow_call_rate=0.75)
    s = BreakerState()
    trans: list[Transition] = []
    for i, lat in enumerate([150, 10, 150, 150]):
        s, t = apply_outcome(s, True, i, cfg, latency_ms=lat)
        trans += t
    assert s.state == "open"
    assert [x.trigger for x in trans] == ["slow_call_rate"]


@pytest.mark.parametrize(("error_type", "status"), [("bad_request", 400), ("bad_request", 422),
                                                      ("context_length_exceeded", 400)])
def test_caller_fault_400s_do_not_count(error_type: str, status: int) -> None:
    s = BreakerState()
    for i in range(50):
        s, t = apply_outcome(s, False, i, CFG, error_type=error_type, http_status=status)
        assert t == []
    assert s == BreakerState()


def test_unknown_model_404_counts_as_failure() -> None:
    s = BreakerState()
    for i in range(5):
        s, _ = apply_outcome(s, False, i, CFG, error_type="bad_request", http_status=404)
    assert s.state == "open"


def test_consecutive_trips_back_off_exponentially_up_to_the_cap() -> None:
    cfg = BreakerConfig(failure_threshold=1, open_timeout_ms=1_000, backoff_factor=2.0,
                        max_open_ms=5_000)
    s, _ = apply_outcome(BreakerState(), False, 0, cfg)
    lengths = [s.open_until_ms - s.opened_at_ms]
    for _ in range(4):  # each deadline passes, the half-open trial fails
        s, _ = apply_outcome(s, False, s.open_until_ms, cfg)
        lengths.append(s.open_until_ms - s.opened_at_ms)
    assert lengths == [1_000, 2_000, 4_000, 5_000, 5_000]
    assert s.trips == 5
    # closing through half-open restarts the backoff
    cfg2 = replace(cfg, success_threshold=1)
    s, _ = apply_outcome(s, True, s.open_until_ms, cfg2)
    assert s.state == "closed" and s.trips == 0
    s, _ = apply_outcome(s, False, 10**6, cfg2)
    assert s.open_until_ms - s.opened_at_ms == 1_000


def test_retry_after_longer_than_the_timeout_sets_the_open_time() -> None:
    cfg = BreakerConfig(failure_threshold=1)
    s, t = apply_outcome(BreakerState(), False, 0, cfg, error_type="rate_limited",
                         http_status=429, retry_after_s=300)
    assert s.open_until_ms == 300_000 and t[0].open_until_ms == 300_000
    s2, _ = apply_outcome(BreakerState(), False, 0, cfg, retry_after_s=5)  # shorter: timeout wins
    assert s2.open_until_ms == 60_000


def test_in_flight_outcomes_never_shorten_the_deadline_but_may_extend_it() -> None:
    cfg = BreakerConfig(failure_threshold=1)
    s, _ = apply_outcome(BreakerState(), False, 0, cfg, retry_after_s=300)
    s2, t = apply_outcome(s, False, 10, cfg, retry_after_s=1)  # a shorter Retry-After
    assert s2 == s and t == []
    s3, t = apply_outcome(s, False, 10, cfg, retry_after_s=500)
    assert s3.open_until_ms == 500_010 and s3.state == "open"
    assert [(x.from_state, x.to_state, x.trigger) for x in t] == [("open", "open", "retry_after")]


def test_quota_error_opens_for_the_quota_time_at_once() -> None:
    s, t = apply_outcome(BreakerState(), False, 1_000, CFG, error_type="quota_exceeded",
                         http_status=429)
    assert (s.state, s.hold, s.open_until_ms) == ("open", "quota", 1_000 + CFG.quota_open_ms)
    assert t[0].trigger == "quota"
    s2, _ = apply_outcome(BreakerState(), False, 1_000, CFG, http_status=402, error_type="x")
    assert s2.hold == "quota"
    assert admission(s, 1_000 + CFG.quota_open_ms - 1, CFG) == "reject"
    assert admission(s, 1_000 + CFG.quota_open_ms, CFG) == "trial"


def test_auth_error_holds_it_open_until_the_configuration_changes() -> None:
    s, t = apply_outcome(BreakerState(), False, 0, CFG, error_type="auth_error", http_status=401,
                         fingerprint="old")
    assert (s.state, s.hold, s.fingerprint, s.open_until_ms) == ("open", "auth", "old", FOREVER_MS)
    assert admission(s, 10**12, CFG, "old") == "reject"  # no timeout ends it
    assert admission(s, 10**12, CFG, "new") == "allow"  # a worker with another key may call
    s2, t = apply_outcome(s, True, 10**12, CFG, fingerprint="old")  # same config: ignored
    assert s2 == s and t == []
    s3, t = apply_outcome(s, True, 10**12, CFG, fingerprint="new")
    assert s3.state == "closed" and s3.hold == ""
    assert [(x.from_state, x.to_state, x.trigger) for x in t] == [("open", "closed", "config_changed")]


def test_a_403_while_open_escalates_to_an_auth_hold() -> None:
    s = opened(1_000)
    s2, t = apply_outcome(s, False, 1_001, CFG, error_type="server_error", http_status=403,
                          fingerprint="f")
    assert (s2.hold, s2.open_until_ms) == ("auth", FOREVER_MS) and t[0].trigger == "auth"


def test_manual_commands_are_transitions() -> None:
    s, t = apply_command(BreakerState(), "open", 5, "maintenance", "ops")
    assert (s.state, s.hold, s.open_until_ms) == ("open", "manual", FOREVER_MS)
    assert t[0].reason == "manual open by ops: maintenance" and t[0].trigger == "manual_open"
    s2, t = apply_outcome(s, True, 10**12, CFG)  # a manual hold ignores outcomes
    assert s2 == s and t == []
    tripped, _ = run(fails(5))
    closed, t = apply_command(tripped, "close", 2_000)
    assert (closed.state, closed.trips, t[0].from_state, t[0].to_state) == ("closed", 1, "open", "closed")
    reset, t = apply_command(tripped, "reset", 2_000)
    assert (reset.state, reset.trips) == ("closed", 0) and len(t) == 1
    again, t = apply_command(BreakerState(), "close", 1)  # even a no-op is on record
    assert again.state == "closed" and len(t) == 1


def test_time_based_window_forgets_calls_older_than_window_ms() -> None:
    cfg = BreakerConfig(failure_threshold=100, window_size=100, window_ms=10_000,
                        minimum_calls=4, failure_rate=0.5)
    # 3 failures long ago, then successes: over the count window alone 3/7 would be counted
    s, t = run([(False, i) for i in range(3)] + [(True, 25_000 + i) for i in range(4)], cfg)
    assert s.window == "...." and s.window_at == "25000,25001,25002,25003" and t == []
    s, t = run([(False, 30_000), (False, 30_001), (False, 30_002)], cfg, start=s)
    assert s.state == "closed"  # the successes are still within 10 s: 3/7 < 50 %
    s, t = run([(False, 30_003)], cfg, start=s)
    assert s.state == "open" and t[0].trigger == "failure_rate" and "4/8" in t[0].reason
    assert BreakerState.from_hash(s.to_hash()) == s


def test_time_based_window_honours_minimum_calls_after_expiry() -> None:
    cfg = BreakerConfig(failure_threshold=100, window_ms=1_000, minimum_calls=3, failure_rate=0.5)
    s, t = run([(False, 0), (False, 1), (False, 5_000)], cfg)  # the first two expired
    assert s.state == "closed" and s.window == "x" and t == []


def test_a_slow_success_in_half_open_reopens_and_a_fast_one_counts() -> None:
    cfg = replace(CFG, slow_call_ms=500)
    s = opened(1_000, cfg)
    at = s.open_until_ms
    s, t = apply_outcome(s, True, at, cfg, latency_ms=800)
    assert [(x.from_state, x.to_state, x.trigger) for x in t] == \
        [("open", "half_open", "timeout_elapsed"), ("half_open", "open", "half_open_slow_call")]
    assert t[-1].reason == "slow call (800 ms > 500 ms) in half-open"
    assert s.state == "open" and s.trips == 2
    s, t = apply_outcome(s, True, s.open_until_ms, cfg, latency_ms=100)
    assert (s.state, s.successes) == ("half_open", 1)
    s, t = apply_outcome(s, True, s.open_until_ms + 1, cfg, latency_ms=499)
    assert s.state == "closed" and t[-1].trigger == "half_open_successes"
