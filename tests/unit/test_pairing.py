"""The pairing of error patterns' occurrences with task outcomes (agents/pairing.py), against
the real Redis: the count is the number of (task, pattern) with both sides applied, in any
order and batching, duplicates counted once; a batch not committed yet counts as committed;
the join buffers expire and are bookkeeping, not projection state."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from agents.outcomes import OutcomesProjection
from agents.patterns import PatternKey, PatternProjection, occurrences
from models.codec import make_event
from models.events import Envelope, ErrorLogged, RewardComputed
from streams.config import Settings
from streams.keys import Keys
from streams.replay import projection_state
from streams.stage import Context, Tx
from streams.topics import load_topics

SYNTAX_GEMINI = "SYNTAX|*|string|*|gemini"
TIMEOUT_LOW = "PROVIDER|timeout|*|low|*"
PATTERNS = (SYNTAX_GEMINI, TIMEOUT_LOW)


def error(task: str, pattern: str) -> Envelope:
    if pattern == TIMEOUT_LOW:
        err = ErrorLogged(category="PROVIDER", error_type="timeout", message="timed out",
                          agent_id="executor", task_id=task, context={"complexity": "low"})
    else:
        err = ErrorLogged(category="SYNTAX", error_type="SyntaxError", message="bad",
                          agent_id="validator", task_id=task,
                          context={"provider": "gemini", "task_type": "string"})
    return make_event(err, producer="test")


def reward(task: str, provider: str, complexity: str) -> Envelope:
    r = RewardComputed(task_id=task, state=f"none|string|{complexity}", action="a",
                       next_state="s", performance=0.0, cost_usd=0.0, cost_weight=1.0,
                       reward=0.0, passed=False, provider=provider, tokens=1)
    return make_event(r, producer="test")


def expected(events: Sequence[Envelope]) -> dict[str, int]:
    """The definition: tasks with an error of the pattern and an outcome in its scope."""
    errs = {(e.payload.task_id, p) for e in events if e.event_type == "ErrorLogged"
            for p in PATTERNS if (p == TIMEOUT_LOW) == (e.payload.category == "PROVIDER")}
    scopes = {}
    for e in events:
        if e.event_type == "RewardComputed":
            r = e.payload
            complexity = r.state.split("|")[-1]
            scopes.setdefault(r.task_id, set()).update(
                {f"type|string|{r.provider}", f"complexity|{complexity}"})
    return {p: sum((t, p) in errs and PatternKey.parse(p).scope in scopes.get(t, ())
                   for t in {t for t, _ in errs}) for p in PATTERNS}


def tx_of(s: Settings, redis: Redis) -> Tx:
    return Tx(Context(settings=s, keys=Keys(s.namespace), topics=load_topics(s.namespace),
                      redis=redis, producer=None))


async def apply(batch: Sequence[Envelope], s: Settings, redis: Redis) -> None:
    """One batch through both projections (each consumer only sees its topic's events) and
    one commit, as streams/stage.py step 7 would."""
    tx = tx_of(s, redis)
    await PatternProjection(30_000).apply([e for e in batch if e.event_type == "ErrorLogged"], tx)
    await OutcomesProjection().apply([e for e in batch if e.event_type == "RewardComputed"], tx)
    async with redis.pipeline(transaction=True) as pipe:
        for write in tx.writes:
            write(pipe)
        await pipe.execute()


async def wipe(redis: Redis, ns: str) -> None:
    async for key in redis.scan_iter(Keys(ns).pattern()):
        await redis.delete(key)


side = st.one_of(
    st.tuples(st.just("err"), st.sampled_from("abcdef"), st.sampled_from(PATTERNS)),
    st.tuples(st.just("out"), st.sampled_from("abcdef"), st.sampled_from(("gemini", "claude")),
              st.sampled_from(("low", "high"))))


@pytest.mark.timeout(300)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sides=st.lists(side, max_size=24), cuts=st.lists(st.integers(0, 24), max_size=5))
def test_the_count_is_the_tasks_with_both_sides_in_any_order(redis_url: str, sides, cuts) -> None:
    """Whatever the order, the batching and the repeats (an outcome arrives once per task in
    the pipeline; here a task may get several, of other scopes too), the committed count is
    the definition's, and before each commit the batch read as pending gives what the
    commit then stores."""
    events = [error(x[1], x[2]) if x[0] == "err" else reward(x[1], x[2], x[3]) for x in sides]
    bounds = sorted({0, len(events), *(c for c in cuts if c <= len(events))})
    s = Settings(namespace=f"t{secrets.token_hex(4)}")

    async def body() -> None:
        redis = Redis.from_url(redis_url, decode_responses=True)
        keys = Keys(s.namespace)
        try:
            for lo, hi in pairwise(bounds):
                batch = events[lo:hi]
                errs = PatternProjection(30_000).counts([e for e in batch if e.event_type == "ErrorLogged"])
                changes = OutcomesProjection.changes(batch)
                pending, _ = await occurrences(redis, keys, PATTERNS, outcomes=changes,
                                               errors={p: c[2] for p, c in errs.items()})
                await apply(batch, s, redis)
                committed, _ = await occurrences(redis, keys, PATTERNS)
                assert pending == committed == expected(events[:hi])
        finally:
            await wipe(redis, s.namespace)
            await redis.aclose()

    asyncio.run(body())


async def test_a_repeated_error_of_a_paired_task_counts_once(namespace: str, redis_url: str) -> None:
    s = Settings(namespace=namespace)
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        await apply([error("t1", SYNTAX_GEMINI), error("t1", SYNTAX_GEMINI)], s, redis)
        await apply([reward("t1", "gemini", "low")], s, redis)
        await apply([error("t1", SYNTAX_GEMINI)], s, redis)  # a later attempt's failure
        found, _ = await occurrences(redis, Keys(namespace), [SYNTAX_GEMINI])
        assert found == {SYNTAX_GEMINI: 1}
    finally:
        await redis.aclose()


async def test_the_join_buffer_expires_and_is_not_projection_state(namespace: str, redis_url: str) -> None:
    """Each buffer expires the window after its last write; replay --verify compares the
    counts (in the pattern hash), not the buffers (under ``eph``)."""
    s = Settings(namespace=namespace, learn_join_window_s=120)
    keys = Keys(namespace)
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        await apply([error("t1", SYNTAX_GEMINI), reward("t1", "gemini", "low"),
                     reward("t2", "claude", "high")], s, redis)
        for task in ("t1", "t2"):
            assert 110_000 < await redis.pttl(keys.learn_pair(task)) <= 120_000
        state = await projection_state(redis, keys)
        assert not any(k.startswith("eph:") for k in state)
        assert state[f"learn:pattern:{SYNTAX_GEMINI}"]["occurrences"] == "1"
    finally:
        await redis.aclose()
