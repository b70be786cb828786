"""One breaker per provider, shared by every executor process (agents/breaker.py, issue item 3).

Two worker processes in one namespace, one sim provider failing every call and one healthy:
the failing provider's breaker trips exactly once for both (one ``closed -> open``
``BreakerTransitioned``), both route around it, ``rmo breaker list --json`` shows it open with
its reason, ``rmo breaker close`` is an event that closes it, and replay rebuilds it exactly.
"""

from __future__ import annotations

import secrets

import orjson
import pytest
from redis.asyncio import Redis

from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.pipeline import wait_caught_up
from tests.integration.helpers import (
    cli_env,
    events,
    eventually,
    providers_file,
    rmo,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration

DOWN = ("  - id: down\n    kind: sim\n    model: grok-4\n    accuracy: 1.0\n    error_rate: 1.0\n"
        "    timeout_rate: 0.0\n    retry_after_s: 0.05\n    latency_ms: {mean: 1, p95: 2}\n")
OPEN_S = "600"
"""Open long enough that no half-open trial happens during the test (a second trip would be
the trial's failure, not a second trip of the 100 % failing provider)."""


async def test_two_workers_share_one_breaker(settings, topics, tmp_path, monkeypatch):
    monkeypatch.setenv("RMO_BREAKER_OPEN_TIMEOUT_S", OPEN_S)  # the workers inherit it
    path = providers_file(tmp_path, "providers:\n" + DOWN + sim("healthy", accuracy=1.0))
    s = settings.model_copy(update={"providers_file": path})
    env = cli_env(s, RMO_PROVIDERS_FILE=str(path), RMO_BREAKER_OPEN_TIMEOUT_S=OPEN_S)
    tasks = humaneval_tasks(24)
    first, later = tasks[:16], tasks[16:]
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    key = Keys(s.namespace).breaker("down")
    target = f"{s.namespace}-r{secrets.token_hex(3)}"
    try:
        with worker(s, tmp_path / "w1") as log1, worker(s, tmp_path / "w2"):
            await submit(s, topics, first)
            await wait_completed(s, topics, {t.task_id for t in first}, log=log1)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)
            assert (await redis.hgetall(key))["state"] == "open"
            await submit(s, topics, later)
            await wait_completed(s, topics, {t.task_id for t in later}, log=log1)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)

            trips = [e.payload for e in await events(s, topics, "system")
                     if e.event_type == "BreakerTransitioned" and e.payload.provider == "down"]
            assert [(t.from_state, t.to_state, t.trigger) for t in trips] == \
                [("closed", "open", "consecutive_failures")]
            assert trips[0].reason == "5 consecutive failures"
            assert all(e.payload.provider != "healthy" for e in await events(s, topics, "system")
                       if e.event_type == "BreakerTransitioned")

            selected = {e.payload.task_id: e.payload for e in await events(s, topics, "decisions")
                        if e.event_type == "ProviderSelected"}
            # the later tasks spread over the analyses partitions, which the two workers share
            # out, and every one of them saw the shared open breaker
            assert all(selected[t.task_id].skipped_open == ["down"] for t in later)
            calls = [e for e in await events(s, topics, "calls")
                     if e.event_type == "ProviderCallFailed"]
            assert {e.payload.task_id for e in calls}.isdisjoint({t.task_id for t in later})

            out = rmo("breaker", "list", "--json", env=env)
            assert out.returncode == 0, out.stderr
            listed = {b["provider"]: b for b in orjson.loads(out.stdout)}
            assert (listed["down"]["state"], listed["down"]["admits"], listed["down"]["trips"]) == \
                ("open", "reject", 1)
            assert listed["down"]["reason"] == "5 consecutive failures"
            assert listed["healthy"]["state"] == "closed"

            out = rmo("breaker", "close", "down", "--reason", "test", "--operator", "ci", env=env)
            assert out.returncode == 0, out.stderr

            async def closed() -> bool:
                return (await redis.hget(key, "state")) == "closed"

            assert await eventually(closed, timeout_s=20)
            commands = [e for e in await events(s, topics, "calls") if e.event_type == "BreakerCommand"]
            assert [(c.payload.provider, c.payload.command, c.payload.operator) for c in commands] == \
                [("down", "close", "ci")]
            manual = [e.payload for e in await events(s, topics, "system")
                      if e.event_type == "BreakerTransitioned" and e.payload.trigger == "manual_close"]
            assert [(m.from_state, m.to_state, m.reason) for m in manual] == \
                [("open", "closed", "manual close by ci: test")]
            assert await wait_caught_up(s, topics, redis, timeout_s=60)

        out = rmo("breaker", "reset", "nosuch", env=env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nosuch" in out.stderr

        out = rmo("replay", "--verify", "--namespace", target, "--json", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert orjson.loads(out.stdout)["verified"] is True
        assert await redis.hgetall(Keys(target).breaker("down")) == await redis.hgetall(key)
    finally:
        async for k in redis.scan_iter(Keys(target).pattern(), count=1000):
            await redis.delete(k)
        await redis.aclose()
