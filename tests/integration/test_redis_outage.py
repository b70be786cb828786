"""Redis outage (SPEC §5): Redis goes away for 10 s in the middle of a run.

The test runs a redis-server of its own, with an append-only file fsynced on every write
(``--appendfsync always``) so a SIGTERM/restart loses nothing, and a real worker process
against it and the session's Tansu broker. In the middle of a few hundred tasks it stops that
Redis, keeps it down 10 s and restarts it on the same port and directory. The stages must
pause with one log line each, resume when Redis returns, and apply every projection update
exactly once: the worker survives, every task completes once, the counters and the Q-learner
saw every task once, and a replay of the log equals the live projections.

A second test freezes writes for a second first (CLIENT PAUSE WRITE), so the outage lands
inside the stages' MULTI/EXEC, after their WATCH, every time: the moment the plain test hits
only now and then (redis-py reports that lost connection as a WatchError).
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from agents.providers.registry import load_providers
from models.codec import encode, make_event
from models.events import TaskSubmitted
from streams.bench import bench_tasks
from streams.config import Settings
from streams.demo import spawn_worker, stop_worker
from streams.embedded import LOOPBACK, find_redis_server, free_port
from streams.keys import Keys
from streams.pipeline import build_consumers, wait_caught_up
from streams.projections import CountersProjection
from streams.replay import replay, verify
from streams.stage import BatchRunner, Context, ProjectionConsumer, Record
from streams.topics import create_topics, load_topics
from tests.integration.helpers import events, providers_file, submit, wait_completed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WAVE = 150  # tasks before the outage, and as many submitted just before Redis goes away
OUTAGE_S = 10.0
SEED = 7
# slow-ish sim providers (20 ms mean): batches take a while, so the outage hits stages
# mid-batch; a few % of 429/5xx so retries and failures happen too
PROVIDERS = "providers:\n" + "".join(
    f"  - id: {pid}\n    kind: sim\n    model: {model}\n    accuracy: {acc}\n"
    f"    error_rate: {err}\n    timeout_rate: 0.0\n    retry_after_s: 0.05\n"
    f"    latency_ms: {{mean: 20, p95: 50}}\n"
    for pid, model, acc, err in (("alpha", "grok-4", 0.7, 0.03),
                                 ("beta", "gemini-2.5-pro", 0.8, 0.02)))
# the worker logs JSON lines (streams/logs.py): {"timestamp": "...Z", ..., "event": "..."}
PAUSED = re.compile(r'"event":"(\S+) paused: Redis unreachable')
RESUMED = re.compile(r'"event":"(\S+) resumed: Redis is back')
LOG_TIME = re.compile(r'"timestamp":"([^"]+)"')


class PersistentRedis:
    """A redis-server of this test's own, persisted to an AOF fsynced on every write, that
    can be stopped and started again on the same port and directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        argv = [find_redis_server(), "--port", str(self.port), "--bind", LOOPBACK,
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--daemonize", "no", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: redis-server flushes and fsyncs the AOF, closes clients and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)


@pytest.fixture
def own_redis(tmp_path: Path):
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@dataclass
class Outcome:
    """What one outage run left behind, for the assertions."""

    ids: set[str]
    log: str
    down_at: datetime  # UTC wall clock (the worker log's timestamps are UTC) when Redis was stopped
    worker_alive_during: bool
    worker_alive_after: bool
    caught_up: bool
    completions: dict[str, set[str]]  # task id -> distinct TaskCompleted ids
    duplicates: int
    rewards: int
    counters: dict[str, str]
    updates: int
    differences: list[str]
    replayed: int
    summary: str


async def _outage_run(kafka: str, namespace: str, server: PersistentRedis, tmp_path: Path,
                      *, freeze_writes_s: float = 0.0) -> Outcome:
    """Run two waves of tasks through a worker; Redis goes away for OUTAGE_S right after the
    second wave is submitted (after ``freeze_writes_s`` of CLIENT PAUSE WRITE, if given)."""
    pfile = providers_file(tmp_path, PROVIDERS)
    s = Settings(namespace=namespace, kafka_bootstrap_servers=kafka, redis_url=server.url,
                 providers_file=pfile, sandbox="off", validator_levels=("syntax",), seed=SEED)
    topics = load_topics(s.namespace)
    await create_topics(kafka, topics)
    tasks = bench_tasks(2 * WAVE, f"outage-{s.namespace}")
    ids = {t.task_id for t in tasks}
    keys = Keys(s.namespace)
    log = tmp_path / "worker.log"
    r = Redis.from_url(s.redis_url, decode_responses=True, socket_timeout=5.0)
    started = time.monotonic()
    proc = spawn_worker(s, log)
    try:
        # first wave: wait until the pipeline runs end to end (the Q-learner commits)
        await submit(s, topics, tasks[:WAVE])
        deadline = time.monotonic() + 60
        while int(await r.hget(keys.qmeta, "updates") or 0) < WAVE // 5:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.05)
        # second wave, then Redis goes away while both waves are in flight
        await submit(s, topics, tasks[WAVE:])
        await asyncio.sleep(0.1)
        before = int(await r.hget(keys.qmeta, "updates") or 0)
        if freeze_writes_s:
            # writes block, reads go on: every stage that reaches its commit now waits in
            # EXEC, after its WATCH, when Redis goes away
            await r.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
            await asyncio.sleep(freeze_writes_s)
        await r.aclose()
        down_wall = datetime.now(UTC)
        server.stop()
        down_at = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        alive_during = proc.poll() is None
        server.start()
        outage_s = time.monotonic() - down_at
        r = Redis.from_url(s.redis_url, decode_responses=True, socket_timeout=5.0)

        await wait_completed(s, topics, ids, timeout_s=90, log=log)
        caught_up = await wait_caught_up(s, topics, r, timeout_s=30)
        alive_after = proc.poll() is None
        stop_worker(proc)

        completions: dict[str, set[str]] = {}
        records = 0
        for e in await events(s, topics, "tasks"):
            if e.event_type == "TaskCompleted" and e.payload.task_id in ids:
                completions.setdefault(e.payload.task_id, set()).add(e.event_id)
                records += 1
        rewards = {e.event_id for e in await events(s, topics, "rewards")
                   if e.payload.task_id in ids}
        counters = await r.hgetall(keys.counters)
        updates = int(await r.hget(keys.qmeta, "updates") or 0)
        rebuilt = Keys(f"{s.namespace}-replay")
        report = await replay(s, topics, build_consumers(s, load_providers(pfile, seed=SEED)), r,
                              rebuilt.namespace)
        differences = await verify(r, keys, rebuilt)
        text = log.read_text(errors="replace")
        summary = (f"{len(ids)} tasks, Redis down {outage_s:.1f} s at {before} Q updates "
                   f"(writes frozen {freeze_writes_s} s first); paused "
                   f"{dict(Counter(PAUSED.findall(text)))}; resumed "
                   f"{dict(Counter(RESUMED.findall(text)))}; {text.count('batch skipped')} "
                   f"batches skipped; {records - len(completions)} duplicate TaskCompleted "
                   f"records; q updates {updates}; {len(differences)} replay differences; run "
                   f"{time.monotonic() - started:.1f} s")
        print(f"\nredis outage: {summary}")
        return Outcome(ids, text, down_wall, alive_during, alive_after, caught_up, completions,
                       records - len(completions), len(rewards), counters, updates, differences,
                       report.events, summary)
    finally:
        if proc.poll() is None:
            stop_worker(proc)
        await r.aclose()


def _assert_nothing_lost_or_applied_twice(o: Outcome) -> None:
    assert o.worker_alive_during and o.worker_alive_after, "the worker died"
    assert set(o.completions) == o.ids, f"{len(o.completions)}/{len(o.ids)} tasks completed"
    twice = {t: v for t, v in o.completions.items() if len(v) != 1}
    assert not twice, f"tasks with more than one distinct TaskCompleted: {list(twice.items())[:5]}"
    finals = sum(int(o.counters.get(f"tasks:{st}", 0))
                 for st in ("passed", "failed", "dead_lettered"))
    skipped = [ln for ln in o.log.splitlines() if "batch skipped" in ln]
    assert finals == len(o.ids), (f"task counters {finals} != {len(o.ids)} tasks; "
                                  f"{o.counters}; skipped batches: {skipped[:5]}")
    assert o.rewards == len(o.ids)
    assert o.updates == len(o.ids), f"Q updates {o.updates} != {len(o.ids)} rewards"
    assert o.differences == [], (f"live != replay ({len(o.differences)} keys): "
                                 + "\n".join(o.differences[:10])
                                 + f"\nskipped batches: {skipped[:5]}")
    assert o.caught_up, "projections did not catch up with the log within 30 s"


def _pause_lines(o: Outcome) -> dict[str, list[tuple[datetime, str, str]]]:
    """consumer -> its pause/resume lines in order: (time, "paused"|"resumed", line)."""
    out: dict[str, list[tuple[datetime, str, str]]] = {}
    for line in o.log.splitlines():
        for kind, pattern in (("paused", PAUSED), ("resumed", RESUMED)):
            m = pattern.search(line)
            if m:
                at = datetime.fromisoformat(LOG_TIME.search(line).group(1))
                out.setdefault(m.group(1), []).append((at, kind, line))
    return out


async def test_redis_outage_pauses_and_resumes_without_losing_updates(
        kafka, namespace, own_redis: PersistentRedis, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RMO_STRATEGIES", '["single"]')  # no consensus subprocesses: faster
    o = await _outage_run(kafka, namespace, own_redis, tmp_path)
    _assert_nothing_lost_or_applied_twice(o)
    _assert_one_pause_and_a_resume_per_consumer(o)


def _assert_one_pause_and_a_resume_per_consumer(o: Outcome) -> None:
    lines = _pause_lines(o)
    assert any(k == "paused" for v in lines.values() for _, k, _ in v), \
        f"no stage logged a pause\n{o.log[-3000:]}"
    for consumer, seq in lines.items():
        kinds = [k for _, k, _ in seq]
        # one outage: "paused" once, then "resumed" once (a pooled connection to the old
        # server failing after the restart must not read as a second outage)
        assert kinds == ["paused", "resumed"], (consumer, [ln.strip() for _, _, ln in seq])
        assert (seq[1][0] - o.down_at).total_seconds() > OUTAGE_S - 1, \
            f"{consumer} resumed while Redis was down: {seq}"


async def test_redis_outage_while_commits_are_in_flight_loses_no_update(
        kafka, namespace, own_redis: PersistentRedis, tmp_path: Path, monkeypatch) -> None:
    """The same outage, but Redis first stops applying writes for a second (CLIENT PAUSE
    WRITE), so the stages that reach their commit are inside MULTI/EXEC, after WATCH, when
    Redis goes away: the moment the plain test hits only by chance. Their EXEC never ran, so
    they must pause and commit again, not skip the batch as stale."""
    monkeypatch.setenv("RMO_STRATEGIES", '["single"]')
    o = await _outage_run(kafka, namespace, own_redis, tmp_path, freeze_writes_s=1.0)
    _assert_nothing_lost_or_applied_twice(o)
    assert "batch skipped" not in o.log, [ln for ln in o.log.splitlines() if "skipped" in ln]
    _assert_one_pause_and_a_resume_per_consumer(o)


async def test_outage_between_watch_and_mget_pauses_the_commit(
        namespace, own_redis: PersistentRedis, monkeypatch, caplog) -> None:
    """The one commit moment the tests above cannot aim at: Redis goes away just after the
    WATCH of a batch's commit (forced here by stopping it from inside ``Pipeline.watch``) and
    returns a second later. The runner must pause, commit when Redis is back, and apply the
    batch once."""
    r = Redis.from_url(own_redis.url, decode_responses=True, socket_timeout=5.0)
    keys = Keys(namespace)
    ctx = Context(settings=Settings(namespace=namespace), keys=keys,
                  topics=load_topics(namespace), redis=r, producer=None, mode="replay")
    runner = BatchRunner(ProjectionConsumer("outage", "tasks", (CountersProjection(),)), ctx)
    topic = f"{namespace}.tasks"

    def record(offset: int) -> Record:
        task = TaskSubmitted(task_id=f"t{offset}", kind="code", prompt="def f():\n    pass\n")
        return Record(topic, 0, offset, None, encode(make_event(task, producer="test")))

    original_watch = Pipeline.watch
    armed = [True]
    restarts: list[asyncio.Task] = []

    async def back_in_a_second() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_redis.start)

    async def watch_then_outage(self, *names):
        result = await original_watch(self, *names)
        if armed[0]:
            armed[0] = False
            own_redis.stop()
            restarts.append(asyncio.create_task(back_in_a_second()))
        return result

    monkeypatch.setattr(Pipeline, "watch", watch_then_outage)
    try:
        with caplog.at_level(logging.WARNING, logger="rmo.stage"):
            await asyncio.wait_for(runner.run([record(0), record(1)]), 30)
        assert not armed[0], "the outage was not injected"
        assert await r.hget(keys.counters, "events:TaskSubmitted") == "2"
        assert await r.get(keys.checkpoint("outage", topic, 0)) == "1"
        pauses = [m for m in caplog.messages if "paused: Redis unreachable" in m]
        assert len(pauses) == 1 and any("resumed" in m for m in caplog.messages), caplog.messages
    finally:
        for task in restarts:  # let Redis come back before the fixture stops it
            await task
        await r.aclose()
