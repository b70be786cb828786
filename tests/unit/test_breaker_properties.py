"""Property-based tests (hypothesis) of the breaker (agents/breaker.py, issue item 3).

1. No interleaving of executor processes' calls, call results and the clock ever has more
   than ``half_open_max_calls`` unexpired trial calls in flight: the machine below drives the
   pure state machine (the projection) and the real permit Lua script on a real Redis.
2. A crashed trial never pins the breaker: once its permit's ttl passed, permits are free.
3. Replaying the same outcomes, with the state persisted and reloaded at arbitrary batch
   boundaries, rebuilds the live state and the same transitions; transitions chain, and an
   open deadline only moves later until the breaker leaves OPEN.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from redis import Redis

from agents.breaker import (
    RETURN_PERMITS,
    TAKE_PERMITS,
    BreakerConfig,
    BreakerState,
    Transition,
    admission,
    apply_command,
    apply_outcome,
)

CFG = BreakerConfig(failure_threshold=2, open_timeout_ms=1_000, success_threshold=2,
                    half_open_max_calls=2, window_size=6, minimum_calls=4, slow_call_ms=50,
                    slow_call_rate=0.75, max_open_ms=8_000, quota_open_ms=5_000,
                    permit_ttl_ms=700)
"""Small numbers so short runs reach every state; the permit ttl is shorter than the open
timeout, as the defaults (45 s < 60 s), so a reopened breaker's old trials expired first."""
CONFIGS = (CFG, replace(CFG, window_ms=2_000))
"""Replay is checked with the count-based window alone and with a time-based one."""


@pytest.fixture(scope="module")
def redis(redis_url: str) -> Iterator[Redis]:
    r = Redis.from_url(redis_url, decode_responses=True)
    yield r
    for k in r.scan_iter("proptest-breaker-*"):
        r.delete(k)
    r.close()


# --------------------------------------------------------------------------- 1. permits


class HalfOpenMachine(RuleBasedStateMachine):
    """Processes call one provider whose breaker is the pure machine (applied the moment a
    call ends, as the projection would) and take trial permits with the real script."""

    def __init__(self) -> None:
        super().__init__()
        self.r: Redis = REDIS[0]
        self.prefix = f"proptest-breaker-{uuid.uuid4().hex}"
        self.now = 10_000
        self.state = BreakerState()
        self.in_flight: list[tuple[bool, int]] = []  # (is a trial, permit granted at ms)
        self.max_trials_seen = 0

    def _key(self) -> str:
        return f"{self.prefix}:{self.state.opened_at_ms}"

    @initialize()
    def start(self) -> None:
        self.state = BreakerState()

    @rule(wanted=st.integers(1, 4))
    def executor_batch_admits(self, wanted: int) -> None:
        """One executor batch reads the breaker and, if half-open, takes up to ``wanted``
        permits; it starts a trial on each and gives none back (each task used its permit)."""
        verdict = admission(self.state, self.now, CFG)
        if verdict == "allow":
            self.in_flight.append((False, self.now))
        elif verdict == "trial":
            tokens = [uuid.uuid4().hex for _ in range(wanted)]
            granted = self.r.eval(TAKE_PERMITS, 1, self._key(), CFG.half_open_max_calls,
                                  self.now, CFG.permit_ttl_ms, *tokens)
            self.in_flight += [(True, self.now)] * len(granted)

    @rule(wanted=st.integers(1, 4), spend=st.integers(0, 4))
    def executor_batch_gives_back(self, wanted: int, spend: int) -> None:
        """A batch takes permits, spends ``spend`` of them and gives the rest back."""
        if admission(self.state, self.now, CFG) != "trial":
            return
        tokens = [uuid.uuid4().hex for _ in range(wanted)]
        granted = self.r.eval(TAKE_PERMITS, 1, self._key(), CFG.half_open_max_calls,
                              self.now, CFG.permit_ttl_ms, *tokens)
        used, unused = granted[:spend], granted[spend:]
        if unused:
            self.r.eval(RETURN_PERMITS, 1, self._key(), *unused)
        self.in_flight += [(True, self.now)] * len(used)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), ok=st.booleans(), latency=st.sampled_from([1, 100]),
          error=st.sampled_from(["server_error", "timeout", "bad_request", "quota_exceeded"]))
    def call_ends(self, data: st.DataObject, ok: bool, latency: int, error: str) -> None:
        i = data.draw(st.integers(0, len(self.in_flight) - 1))
        self.in_flight.pop(i)
        self.state, _ = apply_outcome(self.state, ok, self.now, CFG, latency_ms=latency,
                                      error_type=None if ok else error,
                                      http_status=None if ok else 500)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def process_crashes(self, data: st.DataObject) -> None:
        """A call never reports (its process died or it hangs forever)."""
        self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    @rule(ms=st.sampled_from([1, 50, 300, 700, 1_000, 3_000]))
    def clock_advances(self, ms: int) -> None:
        self.now += ms

    @invariant()
    def at_most_half_open_max_calls_unexpired_trials(self) -> None:
        live = sum(1 for trial, at in self.in_flight if trial and at + CFG.permit_ttl_ms > self.now)
        self.max_trials_seen = max(self.max_trials_seen, live)
        assert live <= CFG.half_open_max_calls


REDIS: list[Redis] = []


def test_no_interleaving_admits_more_than_half_open_max_calls_trials(redis: Redis) -> None:
    REDIS[:] = [redis]
    run = HalfOpenMachine.TestCase
    run.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
    run().runTest()


@given(wanted=st.lists(st.integers(1, 5), min_size=1, max_size=8),
       gap=st.integers(0, 2_000))
@settings(max_examples=80, deadline=None)
def test_permits_of_crashed_trials_free_themselves(redis: Redis, wanted: list[int], gap: int) -> None:
    key = f"proptest-breaker-{uuid.uuid4().hex}"
    now = 1_000_000
    held = 0
    for w in wanted:  # processes take permits and crash: nobody gives any back
        held += len(redis.eval(TAKE_PERMITS, 1, key, 3, now, 500, *map(str, range(held, held + w))))
        assert held <= 3
    later = now + gap
    granted = redis.eval(TAKE_PERMITS, 1, key, 3, later, 500, "a", "b", "c", "d")
    # before the ttl the crashed ones still count; from it on, every permit is free again
    assert len(granted) == (3 if gap >= 500 else 3 - held)


# --------------------------------------------------------------------------- 3. replay

outcome = st.tuples(
    st.sampled_from([0, 1, 10, 300, 1_000, 2_500, 9_000]),          # ms since the previous
    st.booleans(),                                                  # ok
    st.sampled_from([1.0, 80.0]),                                    # latency, ms
    st.sampled_from(["server_error", "rate_limited", "timeout", "auth_error", "quota_exceeded",
                     "bad_request", "context_length_exceeded"]),
    st.sampled_from([None, 0.5, 3.0, 30.0]),                         # Retry-After, s
    st.sampled_from(["cfg-a", "cfg-b"]),                             # configuration fingerprint
    st.sampled_from([None, None, None, None, None, "open", "close", "reset"]),  # a command
)
STATUS = {"server_error": 500, "rate_limited": 429, "timeout": None, "auth_error": 401,
          "quota_exceeded": 402, "bad_request": 400, "context_length_exceeded": 400}


def step(s: BreakerState, at: int, o: tuple, cfg: BreakerConfig) -> tuple[BreakerState, list[Transition]]:
    _, ok, latency, error, retry_after, fp, command = o
    if command is not None:
        return apply_command(s, command, at, "test", "prop")
    return apply_outcome(s, ok, at, cfg, latency_ms=latency, error_type=None if ok else error,
                         http_status=None if ok else STATUS[error],
                         retry_after_s=None if ok else retry_after, fingerprint=fp)


@given(history=st.lists(outcome, max_size=120), cuts=st.sets(st.integers(0, 120)),
       cfg=st.sampled_from(CONFIGS))
@settings(max_examples=300, deadline=None)
def test_replay_rebuilds_the_live_state(history: list[tuple], cuts: set[int],
                                        cfg: BreakerConfig) -> None:
    times = list(itertools.accumulate(o[0] for o in history))
    live, live_t = BreakerState(), []
    states = []
    for at, o in zip(times, history):
        live, t = step(live, at, o, cfg)
        live_t.append(t)
        states.append(live)
    # replay in batches: the state goes through its Redis hash at every cut
    s, replay_t = BreakerState(), []
    for i, (at, o) in enumerate(zip(times, history)):
        if i in cuts:
            s = BreakerState.from_hash(s.to_hash())
        s, t = step(s, at, o, cfg)
        replay_t.append(t)
    assert s == live and replay_t == live_t

    prev = BreakerState()
    for s, ts in zip(states, live_t):
        if ts:
            assert ts[0].from_state == prev.state and ts[-1].to_state == s.state
            assert all(a.to_state == b.from_state for a, b in itertools.pairwise(ts))
        else:
            assert s.state == prev.state
        same_period = not any(t.to_state == "closed" for t in ts)  # a close ends an open period
        if prev.state == s.state == "open" and prev.opened_at_ms == s.opened_at_ms and same_period:
            assert s.open_until_ms >= prev.open_until_ms  # never shortened
        if s.state == "closed":
            assert s.failures < cfg.failure_threshold and len(s.window) <= cfg.window_size
            if cfg.window_ms:
                assert len(s.window_at.split(",")) == len(s.window) or s.window == ""
        if s.state == "open":
            assert s.open_until_ms > s.opened_at_ms
        prev = s
