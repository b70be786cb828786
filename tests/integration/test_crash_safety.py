"""Crash safety (SPEC §5): SIGKILL the worker three times in the middle of a 1,200-task run.

Real Tansu, real Redis and a real worker process (``streams.demo.spawn_worker``). The worker's
process group is killed with SIGKILL at three seeded-random moments while tasks are in
flight and restarted each time. Afterwards every task has exactly one TaskCompleted (by
event id: re-produced copies of the same id are allowed, the producer is not idempotent on
Tansu), the counters and the Q-learner saw every task once, and a replay of the log into a
fresh namespace equals the live projections key by key.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from agents.providers.registry import load_providers
from models.codec import make_event
from streams.bench import bench_tasks
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.demo import spawn_worker, stop_worker
from streams.keys import Keys
from streams.pipeline import build_consumers, wait_caught_up
from streams.replay import replay, verify
from streams.topics import TopicRegistry
from tests.integration.helpers import events, kill_worker, providers_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

N_TASKS = 1200
KILLS = 3
SEED = 20240607
KILL_WINDOWS = ((0.05, 0.25), (0.30, 0.50), (0.55, 0.75))
# fast sim providers: 1-2 ms, a few % of 429/5xx (retried once, Retry-After 10 ms), wrong
# answers sometimes, so passed, failed, retried and failed calls all happen
PROVIDERS = "providers:\n" + "".join(
    f"  - id: {pid}\n    kind: sim\n    model: {model}\n    accuracy: {acc}\n"
    f"    error_rate: {err}\n    timeout_rate: 0.0\n    retry_after_s: 0.01\n"
    f"    latency_ms: {{mean: 1, p95: 2}}\n"
    for pid, model, acc, err in (("alpha", "grok-4", 0.7, 0.04),
                                 ("beta", "claude-opus-4", 0.85, 0.03)))


def _kill_points(rng: random.Random) -> list[int]:
    """Progress (rewards the Q-learner committed) at which to kill: one random point in each
    of three disjoint windows of the run, so every kill hits a worker with tasks in flight."""
    return [int(rng.uniform(lo, hi) * N_TASKS) for lo, hi in KILL_WINDOWS[:KILLS]]


async def _wait_epochs(r: Redis, keys: Keys, at_least: int, timeout_s: float) -> int:
    """Poll the seen epoch counter until it reaches ``at_least``; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while (epochs := int(await r.get(keys.seen_current) or 0)) < at_least \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return epochs


async def _wait_all_completed(settings: Settings, registry: TopicRegistry, ids: set[str],
                              start: dict[int, int], timeout_s: float, log: Path) -> None:
    """Follow the tasks topic from this run's first offsets until each id has a TaskCompleted
    (plain orjson: this process shares the cores with the worker)."""
    done: set[str] = set()

    async def follow() -> None:
        async for rec in read_topic(settings.require_kafka(), registry.name("tasks"),
                                    start=start, follow=True):
            e = orjson.loads(rec.value)
            if e["event_type"] == "TaskCompleted" and e["payload"]["task_id"] in ids:
                done.add(e["payload"]["task_id"])
                if len(done) == len(ids):
                    return

    try:
        await asyncio.wait_for(follow(), timeout_s)
    except TimeoutError:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"{len(done)}/{len(ids)} tasks completed in {timeout_s} s\n{tail}") \
            from None


async def _completions(settings: Settings, registry: TopicRegistry,
                       ids: set[str]) -> tuple[dict[str, set[str]], Counter]:
    """task id -> distinct TaskCompleted event ids, and records per event id."""
    distinct: dict[str, set[str]] = defaultdict(set)
    copies: Counter = Counter()
    for e in await events(settings, registry, "tasks"):
        if e.event_type == "TaskCompleted" and e.payload.task_id in ids:
            distinct[e.payload.task_id].add(e.event_id)
            copies[e.event_id] += 1
    return distinct, copies


async def test_sigkill_three_times_no_reward_applied_twice_none_lost(
        settings, topics, tmp_path: Path, monkeypatch) -> None:
    # one provider per action: no multi-provider consensus (it runs candidates in a subprocess)
    monkeypatch.setenv("RMO_STRATEGIES", '["single"]')
    # small batches: progress moves in steps of at most 100 tasks, so no single batch can
    # jump over a kill point and finish the run before the third kill
    monkeypatch.setenv("RMO_BATCH_MAX", "100")
    # seen epochs close every second (streams/seen.py): commits race closes across the kills
    monkeypatch.setenv("RMO_SEEN_ROTATE_S", "1")
    # a restarted worker rejoins its consumer groups once the killed member's session ends:
    # a 3 s session halves each restart's wait (Tansu's JoinGroup waits session_timeout / 2)
    monkeypatch.setenv("RMO_SESSION_TIMEOUT_S", "3")
    pfile = providers_file(tmp_path, PROVIDERS)
    s = settings.model_copy(update={"providers_file": pfile, "sandbox": "off",
                                    "validator_levels": ("syntax",), "seed": SEED})
    rng = random.Random(SEED)
    kill_at = _kill_points(rng)
    tasks = bench_tasks(N_TASKS, f"crash-{s.namespace}")
    ids = {t.task_id for t in tasks}
    log = tmp_path / "worker.log"
    keys = Keys(s.namespace)
    rebuilt = Keys(f"{s.namespace}-replay")
    r = Redis.from_url(s.redis_url, decode_responses=True)
    started = time.monotonic()
    proc = spawn_worker(s, log)
    restarts = 0
    kills: list[tuple[int, float]] = []
    try:
        acks = await submit_with_acks(s, topics, tasks)
        start: dict[int, int] = {}
        for md in acks:
            start[md.partition] = min(start.get(md.partition, md.offset), md.offset)

        # kill while tasks are in flight: progress is what the Q-learner committed (Redis
        # follows the worker closely; a reader of the tasks topic lags it by hundreds of tasks)
        base = 0  # progress when the current worker started: it must commit some itself
        deadline = time.monotonic() + 150
        while len(kills) < KILLS:
            progress = int(await r.hget(keys.qmeta, "updates") or 0)
            assert progress < N_TASKS, f"the run finished before kill {len(kills) + 1}: {kills}"
            assert time.monotonic() < deadline, f"no progress to kill at: {progress}, {kills}\n" \
                + log.read_text(errors="replace")[-3000:]
            if progress >= kill_at[len(kills)] and progress > base:
                await asyncio.sleep(rng.uniform(0.0, 0.1))  # a random moment inside a batch
                kill_worker(proc)
                base = int(await r.hget(keys.qmeta, "updates") or 0)
                kills.append((base, round(time.monotonic() - started, 1)))
                proc = spawn_worker(s, log)
                restarts += 1
            await asyncio.sleep(0.02)
        await _wait_all_completed(s, topics, ids, start, 120, log)
        assert len(kills) == KILLS, kills
        run_s = time.monotonic() - started
        caught_up = await wait_caught_up(s, topics, r, timeout_s=60)
        assert caught_up, "projections did not catch up with the log within 60 s"
        # every consumer has now read past every recorded close, so the live worker's next
        # tick (every RMO_SEEN_ROTATE_S) passes the newest one and closes another epoch: the
        # rotation ran in this run, whatever the burst's backpressure let it close during it
        epochs = await _wait_epochs(r, keys, 2, timeout_s=15)
        stop_worker(proc)

        distinct, copies = await _completions(s, topics, ids)
        duplicates = sum(n - 1 for n in copies.values())
        rewards = {e.event_id for e in await events(s, topics, "rewards")
                   if e.payload.task_id in ids}
        counters = await r.hgetall(keys.counters)
        updates = int(await r.hget(keys.qmeta, "updates") or 0)
        statuses = Counter({e.event_id: e.payload.status
                            for e in await events(s, topics, "tasks")
                            if e.event_type == "TaskCompleted"}.values())
        print(f"\ncrash safety: {N_TASKS} tasks, {restarts} restarts after SIGKILL at "
              f"(Q updates, s) {kills}; run {run_s:.1f} s; {duplicates} duplicate "
              f"TaskCompleted records ({sum(1 for n in copies.values() if n > 1)} ids); "
              f"statuses {dict(statuses)}; q updates {updates}; distinct rewards {len(rewards)}")

        assert set(distinct) == ids
        more = {t: sorted(v) for t, v in distinct.items() if len(v) != 1}
        assert not more, f"tasks with more than one distinct TaskCompleted: {list(more.items())[:5]}"
        finals = sum(int(counters.get(f"tasks:{st}", 0))
                     for st in ("passed", "failed", "dead_lettered"))
        assert finals == N_TASKS, counters
        assert int(counters.get("tasks:passed", 0)) > 0 and int(counters.get("tasks:failed", 0)) > 0
        assert len(rewards) == N_TASKS
        assert updates == len(rewards), "a reward was applied twice or lost by the Q-learner"
        # a close is passed once every consumer read past it: in a burst, once the analyzer
        # is through the whole backlog (its fetches wait on the executor's), so the run
        # closes a few epochs, not one per second, and maybe only at its end
        assert epochs >= 2, f"the workers closed {epochs} seen epochs in {run_s:.0f} s " \
            f"and 15 s after catching up: {await r.hgetall(keys.seen_closes)}"

        report = await replay(s, topics, build_consumers(s, load_providers(pfile, seed=SEED)), r,
                              rebuilt.namespace)
        assert report.events > 0
        differences = await verify(r, keys, rebuilt)
        assert differences == [], "\n".join(differences[:20])
        print(f"replay: {report.events} events in {report.seconds:.1f} s, no differences; "
              f"total {time.monotonic() - started:.1f} s")
    finally:
        if proc.poll() is None:
            stop_worker(proc)
        async for key in r.scan_iter(rebuilt.pattern(), count=1000):
            await r.delete(key)
        await r.aclose()


async def submit_with_acks(settings: Settings, registry: TopicRegistry, tasks) -> list:
    """Like helpers.submit, but returns the produce acks (the run's first offsets)."""
    async with EventProducer(settings.require_kafka()) as p:
        return await p.send_events(registry.name("tasks"),
                                   [make_event(t, producer="test") for t in tasks])

