"""A provider that is down costs no task its answer while another is healthy (agents/executor.py
steps 3-4), end to end: a real worker, two sim providers, one failing every call with 429/5xx.
The breaker of the failing one trips, later tasks are routed around it, and the log still
rebuilds the live state exactly (`rmo replay --verify`)."""

from __future__ import annotations

import secrets
from collections import Counter

import orjson
import pytest
from redis.asyncio import Redis

from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.pipeline import wait_caught_up
from tests.integration.helpers import (
    cli_env,
    events,
    providers_file,
    rmo,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration

# routed to by a fixed policy (RMO_POLICY=provider:down) until its breaker opens, so the first
# tasks certainly ask it alone (a learning policy may spread them over every action); a short
# Retry-After keeps the retries' waits to the backoff (0.5-1.5 s)
DOWN = ("  - id: down\n    kind: sim\n    model: grok-4\n    accuracy: 1.0\n    error_rate: 1.0\n"
        "    timeout_rate: 0.0\n    retry_after_s: 0.05\n    latency_ms: {mean: 1, p95: 2}\n")


async def test_every_task_passes_while_one_provider_is_down(settings, topics, tmp_path, monkeypatch):
    monkeypatch.setenv("RMO_POLICY", "provider:down")
    path = providers_file(tmp_path, "providers:\n" + DOWN + sim("healthy", accuracy=1.0))
    s = settings.model_copy(update={"providers_file": path})
    first, later = humaneval_tasks(16)[:12], humaneval_tasks(16)[12:]
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    target = f"{s.namespace}-r{secrets.token_hex(3)}"
    try:
        with worker(s, tmp_path) as log:
            await submit(s, topics, first)
            done = await wait_completed(s, topics, {t.task_id for t in first}, log=log)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)
            assert (await redis.hgetall(Keys(s.namespace).breaker("down")))["state"] == "open"
            await submit(s, topics, later)
            done |= await wait_completed(s, topics, {t.task_id for t in later}, log=log)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)

        assert {t: e.payload.status for t, e in done.items()} == \
            {t.task_id: "passed" for t in first + later}
        assert all(e.payload.provider == "healthy" for e in done.values())

        trips = [e.payload for e in await events(s, topics, "system")
                 if e.event_type == "BreakerTransitioned" and e.payload.provider == "down"]
        assert ("closed", "open") in [(t.from_state, t.to_state) for t in trips]

        decisions = await events(s, topics, "decisions")
        selected = {e.payload.task_id: e.payload for e in decisions if e.event_type == "ProviderSelected"}
        fallbacks = [e.payload for e in decisions if e.event_type == "FallbackSelected"]
        executed = {e.payload.task_id: e.payload for e in await events(s, topics, "executions")}
        routed_down = {t for t, d in selected.items() if d.action == "down:single"}
        assert routed_down, "no task was routed to the failing provider: nothing was tested"
        # exactly the tasks whose action asked only the failing provider fell back, once each
        assert sorted(f.task_id for f in fallbacks) == sorted(routed_down)
        assert {(f.from_providers[0], f.to_provider, f.attempt) for f in fallbacks} == {("down", "healthy", 1)}
        for t in routed_down:
            assert (executed[t].action, executed[t].chosen) == ("down:single", "healthy")
        # the policy's action keeps the reward (agents/executor.py, "Learning")
        rewards = {e.payload.task_id: e.payload for e in await events(s, topics, "rewards")}
        assert all(rewards[t].action == "down:single" and rewards[t].performance == 1.0
                   for t in routed_down)
        # after the trip, routing left the failing provider out
        for t in later:
            assert selected[t.task_id].skipped_open == ["down"]
            assert selected[t.task_id].action == "healthy:single"

        calls = await events(s, topics, "calls")
        failed = Counter(e.payload.task_id for e in calls if e.event_type == "ProviderCallFailed")
        assert failed and all(e.payload.provider == "down" for e in calls
                              if e.event_type == "ProviderCallFailed")
        assert {e.payload.error_type for e in calls if e.event_type == "ProviderCallFailed"} <= \
            {"rate_limited", "server_error"}
        logged = Counter(e.payload.task_id for e in await events(s, topics, "errors")
                         if e.payload.category == "PROVIDER")
        assert logged == failed  # one ErrorLogged PROVIDER per failed call

        out = rmo("replay", "--verify", "--namespace", target, "--json",
                  env=cli_env(s, RMO_PROVIDERS_FILE=str(path)))
        assert out.returncode == 0, out.stdout + out.stderr
        report = orjson.loads(out.stdout)
        assert report["verified"] is True and report["differences"] == []
    finally:
        async for key in redis.scan_iter(Keys(target).pattern(), count=1000):
            await redis.delete(key)
        await redis.aclose()
