"""The breaker where it meets Redis: the executor's admission (agents/executor.py step 1) and
the breaker projection (streams/projections.py) with auth holds, fingerprints and commands."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from agents.breaker import FOREVER_MS, BreakerConfig, BreakerState
from models.codec import make_event
from models.events import BreakerCommand, Envelope, ProviderCallFailed
from streams import service
from streams.projections import BreakerProjection
from streams.stage import Context, Tx
from streams.topics import load_topics
from tests.unit.test_executor_fallback import Harness, Scripted, auth, executed, of, ok, task


@pytest.fixture
async def h(namespace: str, redis_url: str) -> AsyncIterator[Harness]:
    r = Redis.from_url(redis_url, decode_responses=True)
    yield Harness(namespace, r)
    await r.aclose()


def auth_held(fp: str) -> BreakerState:
    now = int(time.time() * 1000)
    return BreakerState(state="open", failures=1, opened_at_ms=now - 1_000, open_until_ms=FOREVER_MS,
                        trips=1, hold="auth", fingerprint=fp)


async def test_an_auth_hold_rejects_the_configuration_it_tripped_under(h: Harness) -> None:
    a, b = Scripted("a", ok()), Scripted("b", ok())
    stage = h.stage(a, b)
    await h.set_breaker("a", auth_held(stage.fingerprints["a"]))
    out = await h.run(stage, task())
    assert of(out, "ProviderSelected")[0].skipped_open == ["a"]
    assert a.requests == [] and executed(out).chosen == "b"


async def test_an_auth_hold_admits_a_changed_configuration(h: Harness) -> None:
    a, b = Scripted("a", ok()), Scripted("b", ok())
    stage = h.stage(a, b)
    await h.set_breaker("a", auth_held("fingerprint-of-the-old-key"))
    out = await h.run(stage, task())
    assert executed(out).chosen == "a" and len(a.requests) == 1
    (call,) = of(out, "ProviderCallCompleted")
    assert call.config_fingerprint == stage.fingerprints["a"]


async def test_failed_calls_carry_the_configuration_fingerprint(h: Harness) -> None:
    a, b = Scripted("a", auth), Scripted("b", ok())
    stage = h.stage(a, b)
    out = await h.run(stage, task())
    (failed,) = of(out, "ProviderCallFailed")
    assert failed.config_fingerprint == stage.fingerprints["a"] != stage.fingerprints["b"]


def _failed(fp: str, at: datetime) -> Envelope:
    return make_event(ProviderCallFailed(task_id="t", provider="p", model="m", attempt=0,
                                         latency_ms=1, input_tokens=0, output_tokens=0, cost_usd=0,
                                         error_type="auth_error", http_status=401,
                                         config_fingerprint=fp),
                      producer="test", occurred_at=at)


async def test_projection_applies_auth_trips_and_commands_in_order(h: Harness) -> None:
    ctx = Context(settings=h.settings, keys=h.keys, topics=load_topics(h.keys.namespace),
                  redis=h.redis, producer=None)
    proj = BreakerProjection(BreakerConfig())
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    close = make_event(BreakerCommand(provider="p", command="close", reason="new key", operator="ops"),
                       producer="test", correlation_id="p", occurred_at=t0.replace(minute=5))
    tx = Tx(ctx)
    await proj.apply([_failed("k1", t0), close], tx)
    async with h.redis.pipeline(transaction=True) as pipe:
        for w in tx.writes:
            w(pipe)
        await pipe.execute()
    trans = [e.payload for _, _, e in tx.emitted if e.event_type == "BreakerTransitioned"]
    assert [(t.from_state, t.to_state, t.trigger) for t in trans] == \
        [("closed", "open", "auth"), ("open", "closed", "manual_close")]
    assert trans[0].open_until == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert trans[1].open_until is None and trans[1].reason == "manual close by ops: new key"
    state = BreakerState.from_hash(await h.redis.hgetall(h.keys.breaker("p")))
    assert (state.state, state.trips, state.hold) == ("closed", 1, "")
    stats = await h.redis.hgetall(h.keys.provider_stats("p"))
    assert stats["trips"] == "1" and stats["calls"] == "1"  # a command is not a call


async def test_breaker_list_reports_every_breaker(h: Harness, redis_url: str) -> None:
    await h.set_breaker("held", auth_held("k"))
    await h.set_breaker("ok", BreakerState(window=".x.X"))
    reports = await service.breaker_list(h.settings.model_copy(update={"redis_url": redis_url}))
    assert [r.provider for r in reports] == ["held", "ok"]
    held, fine = (r.to_dict() for r in reports)
    assert (held["state"], held["admits"], held["hold"]) == ("open", "reject", "auth")
    assert held["open_until"] == "9999-12-31T23:59:59+00:00"
    assert (fine["state"], fine["admits"], fine["open_until"], fine["window_calls"]) == \
        ("closed", "allow", None, 4)
    assert (fine["window_failure_rate"], fine["window_slow_rate"]) == (0.5, 0.25)
