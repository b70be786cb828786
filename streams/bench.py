"""`rmo bench`: throughput and latency figures (a benchmark, not a test).

Runs on a fresh embedded Tansu (so figures do not depend on what else a broker holds), or on
the broker ``KAFKA_BOOTSTRAP_SERVERS`` names, and the Redis :mod:`streams.locate` resolves, in a
throw-away namespace:
1. ingest: TaskSubmitted events/s produced the way `rmo submit` does;
2. end to end: tasks/s through analyzer -> executor -> validator -> learning with ``workers``
   worker processes (default 2: one per core),
   an instant sim provider (no latency, no faults) and the sandbox off (validator level syntax);
   p50/p99 task latency (TaskCompleted.latency_ms: submit to completion);
3. replay: every projection rebuilt from that run's log into a fresh namespace, events/s;
4. baseline: the same four hops as a raw aiokafka consume -> produce relay, no logic.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from agents.providers.registry import load_providers
from models.codec import make_event
from models.events import TaskSubmitted
from streams import embedded, locate
from streams.client import EventProducer
from streams.config import Settings
from streams.demo import (
    DemoError,
    check_exited,
    completions,
    guarded,
    humaneval_tasks,
    spawn_worker,
    stop_worker,
    submit_tasks,
)
from streams.keys import Keys
from streams.pipeline import build_consumers, wait_caught_up
from streams.replay import replay
from streams.topics import create_topics, load_topics

INSTANT_PROVIDER = """providers:
  - id: instant
    kind: sim
    model: grok-4
    accuracy: 0.8
    error_rate: 0.0
    timeout_rate: 0.0
    latency_ms: {mean: 0, p95: 0}
"""
WARMUP_TASKS = 200


def bench_tasks(n: int, tag: str) -> list[TaskSubmitted]:
    """``n`` tasks cycling over HumanEval prompts, with unique ids."""
    base = humaneval_tasks()
    return [base[i % len(base)].model_copy(update={"task_id": f"{tag}-{i}"}) for i in range(n)]


async def measure_ingest(bootstrap: str, topic: str, tasks: list[TaskSubmitted]) -> float:
    events = [make_event(t, producer="bench") for t in tasks]
    async with EventProducer(bootstrap) as producer:
        t0 = time.perf_counter()
        await producer.send_events(topic, events)
        return len(events) / (time.perf_counter() - t0)


async def run_tasks(settings: Settings, tasks: list[TaskSubmitted], procs: list[subprocess.Popen],
                    log: Path) -> tuple[float, list[float]]:
    """Submit ``tasks``, wait for every TaskCompleted; returns (tasks/s, latencies in ms).

    Raises:
        streams.demo.DemoError: a worker process of ``procs`` exited meanwhile (the end of
            ``log`` is in the error), instead of waiting for tasks nobody will complete.
    """
    registry = load_topics(settings.namespace)
    latencies: list[float] = []

    async def follow() -> None:
        async for p in completions(settings, registry, {t.task_id for t in tasks}, start):
            latencies.append(p["latency_ms"])

    async def check() -> None:
        for proc in procs:
            check_exited(proc, log)

    t0 = time.perf_counter()
    start = await submit_tasks(settings, registry, tasks, "bench")
    await guarded(follow(), check, None)
    return len(tasks) / (time.perf_counter() - t0), latencies


async def measure_baseline(bootstrap: str, prefix: str, n: int, partitions: int = 4) -> float:
    """Four raw aiokafka relay hops (consume, re-encode, produce), like the four stages."""
    names = [f"{prefix}.hop{i}" for i in range(5)]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, partitions, 1) for t in names])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, max_batch_size=1 << 20)
    await producer.start()

    async def relay(src: str, dst: str | None, done: asyncio.Future) -> None:
        consumer = AIOKafkaConsumer(src, bootstrap_servers=bootstrap, group_id=f"{src}.g",
                                    auto_offset_reset="earliest", session_timeout_ms=6000,
                                    heartbeat_interval_ms=1000, fetch_max_wait_ms=20)
        await consumer.start()
        seen = 0
        try:
            while seen < n:
                batch = await consumer.getmany(timeout_ms=100, max_records=1000)
                futs = []
                for msgs in batch.values():
                    for m in msgs:
                        seen += 1
                        if dst:
                            value = orjson.dumps({**orjson.loads(m.value), "hop": dst})
                            futs.append(await producer.send(dst, value=value, key=m.key))
                await asyncio.gather(*futs)
                await consumer.commit()
            done.set_result(time.perf_counter())
        finally:
            await consumer.stop()

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    relays = [asyncio.create_task(relay(names[i], names[i + 1] if i < 4 else None,
                                        done if i == 4 else loop.create_future()))
              for i in range(5)]
    await asyncio.sleep(5)  # joins finish (Tansu JoinGroup waits session_timeout/2)
    payload = orjson.dumps({"pad": "x" * 600})
    t0 = time.perf_counter()
    futs = [await producer.send(names[0], value=payload, key=str(i).encode()) for i in range(n)]
    await asyncio.gather(*futs)
    t1 = await asyncio.wait_for(done, 300)
    for r in relays:
        r.cancel()
    await asyncio.gather(*relays, return_exceptions=True)
    await producer.stop()
    return n / (t1 - t0)


async def _bench(n: int, workers: int, log: Path, budgets: Path | None = None) -> dict:
    env = Settings()
    # a fresh broker unless the user named one, so figures do not depend on what a broker holds
    kafka = None if env.kafka_bootstrap_servers else embedded.start_kafka()
    found = locate.locate(env.kafka_bootstrap_servers or kafka.address, env.redis_url)
    bootstrap, redis_url = found.bootstrap, found.redis_url
    ns = f"bench{secrets.token_hex(3)}"
    providers = Path(tempfile.mkdtemp()) / "instant.yaml"
    providers.write_text(INSTANT_PROVIDER)
    settings = Settings(namespace=ns, kafka_bootstrap_servers=bootstrap, redis_url=redis_url,
                        sandbox="off", validator_levels=("syntax",), providers_file=providers,
                        budgets_file=budgets)
    procs = []
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        ingest = await measure_ingest(bootstrap, f"{ns}.ingest", bench_tasks(n, "ingest"))
        await create_topics(bootstrap, load_topics(ns))
        procs = [spawn_worker(settings, log) for _ in range(workers)]
        await run_tasks(settings, bench_tasks(WARMUP_TASKS, "warmup"), procs, log)
        tps, lat = await run_tasks(settings, bench_tasks(n, "run"), procs, log)
        await wait_caught_up(settings, load_topics(ns), redis)
        for proc in procs:
            stop_worker(proc)
        procs = []
        rebuilt = await replay(settings, load_topics(ns), build_consumers(settings, load_providers(providers)),
                               redis, f"{ns}-replay")
        baseline = await measure_baseline(bootstrap, f"{ns}.raw", n)
        q = statistics.quantiles(lat, n=100)
        return {"tasks": n, "ingest_events_per_s": round(ingest, 1), "tasks_per_s": round(tps, 1),
                "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(q[98], 2),
                "baseline_tasks_per_s": round(baseline, 1), "workers": workers,
                "replay_events": rebuilt.events, "replay_events_per_s": round(rebuilt.events_per_s, 1),
                "machine": f"{socket.gethostname()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"}
    finally:
        for proc in procs:
            stop_worker(proc)
        for space in (ns, f"{ns}-replay"):
            async for key in redis.scan_iter(Keys(space).pattern(), count=1000):
                await redis.delete(key)
        await redis.aclose()
        for handle in [*found.temporary, *([kafka] if kafka else [])]:
            handle.stop()


def run_bench(*, tasks: int, workers: int, as_json: bool, budgets: Path | None = None) -> int:
    """Entry point of `rmo bench`; prints the figures, returns the exit code. ``budgets``: a
    budgets file the workers run under."""
    log = Path(tempfile.gettempdir()) / "rmo-bench-worker.log"
    try:
        result = asyncio.run(_bench(tasks, workers, log, budgets))
    except DemoError as exc:
        print(f"error: {exc}", *exc.detail, sep="\n", file=sys.stderr)
        return exc.exit_code
    if as_json:
        print(orjson.dumps(result).decode())
    else:
        for k, v in result.items():
            print(f"{k:22} {v}")
    return 0
