"""`rmo bench`: throughput, latency and memory figures (a benchmark, not a test).

Runs on a fresh embedded Tansu (so figures do not depend on what else a broker holds), or on
the broker ``KAFKA_BOOTSTRAP_SERVERS`` names, and the Redis :mod:`streams.locate` resolves, in
throw-away namespaces:
1. ingest: TaskSubmitted events/s produced the way `rmo submit` does;
2. end to end: tasks/s of a burst through analyzer -> executor -> validator -> learning with
   ``workers`` worker processes (default 2: one per core), an instant sim provider (no latency,
   no faults), the sandbox off and validator level syntax; p50/p99 task latency
   (TaskCompleted.latency_ms: submit to completion), which under a burst is mostly queueing;
3. latency under load: an open-loop load (tasks submitted on a fixed schedule that does not
   wait for completions) at half the burst's tasks/s for ``load_s`` seconds; p50/p99; and the
   same at 10 tasks/s for 15 s (``p50_ms_idle``/``p99_ms_idle``): the pipeline's own latency;
4. replay: every projection rebuilt from that run's log into a fresh namespace, events/s;
5. baseline: the same four hops as a raw aiokafka consume -> produce relay, no logic; ``ratio``
   is end to end over baseline;
6. in flight: one worker (so one executor), a sim provider answering after 1 s, 2,000 tasks,
   executor batches of up to 2,000 (``RMO_EXECUTOR_BATCH_MAX``): the tasks/s at which that
   executor completed them (``inflight_tasks_per_s``: from the first submit to the last
   TaskExecuted made, which only exceeds 1,000 with at least 1,000 calls in flight), the
   same to the last TaskCompleted (``inflight_completed_tasks_per_s``: the validator and
   learning stages of the same worker included), and the most calls that were in flight at
   once (``inflight_peak_calls``, from the recorded calls);
7. real validation: HumanEval's 164 problems with an oracle provider, the sandbox of
   ``RMO_SANDBOX`` and every validator level, seconds from submit to the last completion.

The routing policy of 2-7 is ``random`` over the one provider, so the learning policies'
feedback window (agents/executor.py ``admit``), which holds decisions back until feedback
arrives, does not throttle a measurement of capacity. ``soak`` (`rmo bench --soak S`) instead
runs a steady open-loop load for S seconds and reports the workers' RSS and Redis' memory
after warm-up and at the end. It runs with the shortest windows of the per-event state
(:data:`SOAK_ENV`), so the soak sees them full: Redis then holds about rate x (60 s + the
seen epochs' lag) of seen ids (about 0.75 KB a task over nine consumers) and of task status
hashes (about 2.8 KB a task), and of the learning subsystem's join buffers, on top of the
state that does not grow with events.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from agents.providers.registry import load_providers
from models.codec import encode, make_event
from models.events import ProviderCall, TaskExecuted, TaskSubmitted
from streams import embedded, locate
from streams.client import EventProducer, high_watermarks, read_events
from streams.config import Settings
from streams.demo import (
    DemoError,
    cancelled_by_sigterm,
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

SIM_PROVIDER = """providers:
  - id: {id}
    kind: sim
    model: grok-4
    accuracy: {accuracy}
    error_rate: 0.0
    timeout_rate: 0.0
    latency_ms: {{mean: {latency}, p95: {latency}}}
"""
WARMUP_TASKS = 200
INFLIGHT_TASKS = 2000
INFLIGHT_LATENCY_MS = 1000
CAPACITY_ENV = {"RMO_POLICY": "random"}
"""Worker settings of every capacity figure (module docstring)."""
SOAK_ENV = {"RMO_SEEN_ROTATE_S": "10", "RMO_SEEN_RETENTION_S": "60", "RMO_TASK_RETENTION_S": "60",
            "RMO_LEARN_JOIN_WINDOW_S": "60"}
"""Soak: the shortest windows of the per-event state (seen buckets: streams/seen.py; task
status; the learning subsystem's join buffers: agents/pairing.py), so that it fills within
minutes and the soak measures what happens once it has: Redis holds about rate x window of
each (module docstring)."""
STALL_S = 120.0
"""A measurement ends with an error once no task completed for this long (s): far above a
burst's first completion (seconds) and the worst soak p99 measured (54 s, docs/performance.md)."""
IDLE_RATE, IDLE_S = 10.0, 15.0
"""The idle latency figure: an open-loop load of this many tasks/s for this many seconds, far
below capacity, so its latencies are the pipeline's own (five hops), not queueing."""
WARMUP_S = 180.0
"""Soak: memory is compared from this many seconds in: the windows of :data:`SOAK_ENV` filled
(60 s retention, plus a few 10 s epochs, plus the closes' lag) and caches, pools and buffers
too."""


def bench_tasks(n: int, tag: str) -> list[TaskSubmitted]:
    """``n`` tasks cycling over HumanEval prompts, with unique ids."""
    base = humaneval_tasks()
    return [base[i % len(base)].model_copy(update={"task_id": f"{tag}-{i}"}) for i in range(n)]


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """Most of the ``(start, end)`` intervals (any unit) open at one instant; an interval
    ending where another starts does not overlap it. A sweep over the sorted endpoints."""
    points = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    peak = open_now = 0
    for _, step in points:
        open_now += step
        peak = max(peak, open_now)
    return peak


async def calls_in_flight(settings: Settings) -> int:
    """The most provider calls of ``settings``' namespace in flight at once, from its calls
    topic: each recorded call spans ``[occurred_at - latency_ms, occurred_at]`` (its event is
    made as the call returns, agents/executor.py)."""
    spans = []
    async for event in read_events(settings.require_kafka(), load_topics(settings.namespace).name("calls")):
        if isinstance(event.payload, ProviderCall):
            end = event.occurred_at.timestamp() * 1000
            spans.append((end - event.payload.latency_ms, end))
    return peak_overlap(spans)


async def last_executed(settings: Settings) -> float:
    """When the last TaskExecuted of ``settings``' namespace was made (epoch s), from its
    executions topic: the executor makes it once the task's calls returned (agents/executor.py)."""
    topic = load_topics(settings.namespace).name("executions")
    return max([e.occurred_at.timestamp() async for e in read_events(settings.require_kafka(), topic)
                if isinstance(e.payload, TaskExecuted)])


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
    t0 = time.perf_counter()
    start = await submit_tasks(settings, load_topics(settings.namespace), tasks, "bench")
    latencies = await _completed(settings, tasks, start, procs, log)
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


def _providers(directory: Path, pid: str, accuracy: float, latency_ms: int) -> Path:
    path = directory / f"{pid}.yaml"
    path.write_text(SIM_PROVIDER.format(id=pid, accuracy=accuracy, latency=latency_ms))
    return path


async def _completed(settings: Settings, tasks: list[TaskSubmitted], start: dict[int, int],
                     procs: list[subprocess.Popen], log: Path,
                     arrivals: Coroutine[Any, Any, None] | None = None,
                     stall_s: float = STALL_S) -> list[float]:
    """The latency (ms, submit to completion) of each of ``tasks``, from their completions on
    the tasks topic at or after ``start`` (partition -> offset); ``arrivals``, the coroutine
    producing them, runs alongside.

    Raises:
        streams.demo.DemoError: a worker of ``procs`` exited meanwhile (the end of ``log`` is
            in the error), or no task completed for ``stall_s`` seconds (naming open ones),
            instead of waiting for tasks nobody will complete.
    """
    registry = load_topics(settings.namespace)
    latencies: list[float] = []
    done: set[str] = set()
    progress = {"n": 0, "at": time.monotonic()}

    async def follow() -> None:
        async for p in completions(settings, registry, {t.task_id for t in tasks}, start):
            latencies.append(p["latency_ms"])
            done.add(p["task_id"])

    async def check() -> None:
        for proc in procs:
            check_exited(proc, log)
        if len(latencies) != progress["n"]:
            progress.update(n=len(latencies), at=time.monotonic())
        elif time.monotonic() - progress["at"] > stall_s:
            missing = [t.task_id for t in tasks if t.task_id not in done]
            raise DemoError(f"no task completed for {stall_s:.0f} s, {len(missing)} of "
                            f"{len(tasks)} still open (e.g. {', '.join(missing[:3])}); "
                            f"the workers' log is {log}")

    async def both() -> None:
        await asyncio.gather(follow(), *([arrivals] if arrivals else []))

    await guarded(both(), check, None)
    return latencies


async def open_loop(settings: Settings, rate: float, seconds: float, procs: list[subprocess.Popen],
                    log: Path, tag: str) -> list[float]:
    """Submit ``rate`` tasks/s for ``seconds`` on a fixed schedule, whatever the pipeline does
    (an open-loop load: a slow pipeline queues tasks instead of slowing the arrivals, so the
    latencies include the queueing a real arrival process would see); returns the latency (ms,
    submit to completion) of each.

    Raises:
        streams.demo.DemoError: a worker of ``procs`` exited meanwhile.
    """
    registry = load_topics(settings.namespace)
    topic = registry.name("tasks")
    tasks = bench_tasks(max(1, int(rate * seconds)), tag)
    start = await high_watermarks(settings.require_kafka(), topic)

    async def produce() -> None:
        async with EventProducer(settings.require_kafka()) as producer:
            acks, sent, t0 = [], 0, time.perf_counter()
            while sent < len(tasks):
                due = min(len(tasks), int((time.perf_counter() - t0) * rate) + 1)
                for t in tasks[sent:due]:
                    # stamped now: latency_ms counts from this task's scheduled arrival
                    acks.append(await producer.send(topic, t.task_id.encode(),
                                                    encode(make_event(t, producer="bench"))))
                sent = due
                await asyncio.sleep(0.002)
            await asyncio.gather(*acks)

    return await _completed(settings, tasks, start, procs, log, produce())


def _quantiles(latencies: list[float]) -> tuple[float, float]:
    """(p50, p99) in ms, rounded."""
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return round(statistics.median(latencies), 2), round(q[98], 2)


def rss_mb(pids: list[int]) -> float:
    """Resident set size (MiB) summed over ``pids`` and their children (/proc, Linux)."""
    total = 0
    for pid in pids:
        for p in [pid, *_children(pid)]:
            try:
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            total += next((int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmRSS:")), 0)
    return round(total / 1024, 1)


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found]


class Profiler:
    """py-spy (a sampling profiler that attaches to a running process by pid, no restart, no
    code change: https://github.com/benfred/py-spy) recording every worker of a run into
    ``directory/worker-{pid}.txt`` as collapsed stacks (one ``frame;frame;... count`` line
    per distinct stack, Brendan Gregg's format, which flamegraph tools read), from
    :meth:`start` to :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen] = []

    def start(self, pids: list[int]) -> None:
        """Attach to ``pids`` (py-spy must be installed: the test extra has it).

        Raises:
            DemoError: py-spy is not on PATH next to this Python.
        """
        exe = Path(sys.executable).with_name("py-spy")
        if not exe.exists():
            raise DemoError(f"--profile needs py-spy: {exe} is missing (pip install py-spy)")
        self.directory.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            out = self.directory / f"worker-{pid}.txt"
            self.procs.append(subprocess.Popen(
                [str(exe), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                 "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> list[Path]:
        """Stop recording (SIGINT makes py-spy write its file); returns the files written."""
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        return sorted(self.directory.glob("worker-*.txt"))


def top_frames(files: list[Path], n: int = 25) -> list[tuple[str, float, float]]:
    """The ``n`` frames with the most inclusive samples over the collapsed-stack ``files``:
    (frame, inclusive %, self %), % of all samples. A frame counts once per stack however
    often it recurs in it."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            k = int(count)
            frames = stack.split(";")
            total += k
            own[frames[-1]] += k
            for frame in set(frames):
                inclusive[frame] += k
    return [(f, round(100 * c / total, 1), round(100 * own[f] / total, 1))
            for f, c in inclusive.most_common(n)] if total else []


class _Run:
    """Workers of one measurement: a namespace, its settings and worker processes, stopped
    and cleaned (Redis keys of the namespace and its replay) by :meth:`close`."""

    def __init__(self, bootstrap: str, redis_url: str, log: Path, providers: Path,
                 **settings: object) -> None:
        self.namespace = f"bench{secrets.token_hex(3)}"
        self.settings = Settings(namespace=self.namespace, kafka_bootstrap_servers=bootstrap,
                                 redis_url=redis_url, providers_file=providers, **settings)
        self.log = log
        self.procs: list[subprocess.Popen] = []

    async def start(self, workers: int, env: dict[str, str] | None = None) -> None:
        await create_topics(self.settings.require_kafka(), load_topics(self.namespace))
        self.procs = [spawn_worker(self.settings, self.log, env) for _ in range(workers)]
        await run_tasks(self.settings, bench_tasks(WARMUP_TASKS, "warmup"), self.procs, self.log)

    def stop(self) -> None:
        for proc in self.procs:
            stop_worker(proc)
        self.procs = []

    async def close(self, redis: Redis) -> None:
        self.stop()
        for space in (self.namespace, f"{self.namespace}-replay"):
            async for key in redis.scan_iter(Keys(space).pattern(), count=1000):
                await redis.delete(key)


async def _bench(n: int, workers: int, log: Path, budgets: Path | None, load_s: float,
                 soak_s: float | None, profile: Path | None = None,
                 soak_rate: float | None = None) -> dict:
    env = Settings()
    # a fresh broker unless the user named one, so figures do not depend on what a broker holds
    kafka = None if env.kafka_bootstrap_servers else embedded.start_kafka()
    found = locate.locate(env.kafka_bootstrap_servers or kafka.address, env.redis_url)
    bootstrap, redis_url = found.bootstrap, found.redis_url
    tmp = Path(tempfile.mkdtemp())
    instant = _providers(tmp, "instant", 0.8, 0)
    fast = {"sandbox": "off", "validator_levels": ("syntax",), "budgets_file": budgets}
    runs: list[_Run] = []
    redis = Redis.from_url(redis_url, decode_responses=True)

    def new_run(providers: Path, **settings: object) -> _Run:
        runs.append(_Run(bootstrap, redis_url, log, providers, **settings))
        return runs[-1]

    try:
        if soak_s is not None:
            return await _soak(new_run(instant, **fast), workers, soak_s, redis, soak_rate)
        main = new_run(instant, **fast)
        ingest = await measure_ingest(bootstrap, f"{main.namespace}.ingest", bench_tasks(n, "ingest"))
        await main.start(workers, CAPACITY_ENV)
        profiler = Profiler(profile) if profile else None
        if profiler:
            profiler.start([p.pid for p in main.procs])
        tps, lat = await run_tasks(main.settings, bench_tasks(n, "run"), main.procs, log)
        profiled = top_frames(profiler.stop()) if profiler else None
        idle = await open_loop(main.settings, IDLE_RATE, IDLE_S, main.procs, log, "idle")
        loaded = await open_loop(main.settings, tps / 2, load_s, main.procs, log, "load")
        await wait_caught_up(main.settings, load_topics(main.namespace), redis)
        main.stop()
        rebuilt = await replay(main.settings, load_topics(main.namespace),
                               build_consumers(main.settings, load_providers(instant)),
                               redis, f"{main.namespace}-replay")
        baseline = await measure_baseline(bootstrap, f"{main.namespace}.raw", n)

        slow = new_run(_providers(tmp, "slow", 0.8, INFLIGHT_LATENCY_MS), **fast)
        # one batch may hold every task: its calls are what is in flight
        await slow.start(1, {**CAPACITY_ENV, "RMO_EXECUTOR_BATCH_MAX": str(INFLIGHT_TASKS)})
        submitted = time.time()
        inflight_completed, _ = await run_tasks(slow.settings, bench_tasks(INFLIGHT_TASKS, "inflight"),
                                                slow.procs, log)
        slow.stop()
        inflight = INFLIGHT_TASKS / (await last_executed(slow.settings) - submitted)
        peak_calls = await calls_in_flight(slow.settings)

        real = new_run(_providers(tmp, "oracle", 1.0, 0), sandbox=env.sandbox)
        await real.start(workers, CAPACITY_ENV)
        t0 = time.perf_counter()
        await run_tasks(real.settings, humaneval_tasks(), real.procs, log)
        humaneval_s = time.perf_counter() - t0
        real.stop()

        p50, p99 = _quantiles(lat)
        p50_load, p99_load = _quantiles(loaded)
        p50_idle, p99_idle = _quantiles(idle)
        return {"tasks": n, "workers": workers, "ingest_events_per_s": round(ingest, 1),
                "tasks_per_s": round(tps, 1), "baseline_tasks_per_s": round(baseline, 1),
                "ratio": round(tps / baseline, 3), "p50_ms": p50, "p99_ms": p99,
                "p50_ms_idle": p50_idle, "p99_ms_idle": p99_idle,
                "load_tasks_per_s": round(tps / 2, 1), "load_s": load_s,
                "p50_ms_at_half_load": p50_load, "p99_ms_at_half_load": p99_load,
                "replay_events": rebuilt.events,
                "replay_events_per_s": round(rebuilt.events_per_s, 1),
                "inflight_tasks_per_s": round(inflight, 1),
                "inflight_completed_tasks_per_s": round(inflight_completed, 1),
                "inflight_peak_calls": peak_calls,
                "humaneval_sandbox_s": round(humaneval_s, 2), "sandbox": real.settings.sandbox,
                "machine": _machine(),
                **({"profile": str(profile), "top_frames": profiled} if profile else {})}
    finally:
        for run in runs:
            await run.close(redis)
        await redis.aclose()
        for handle in [*found.temporary, *([kafka] if kafka else [])]:
            handle.stop()


async def _soak(run: _Run, workers: int, seconds: float, redis: Redis,
                rate: float | None) -> dict:
    """Steady open-loop load at ``rate`` tasks/s (None: half the burst rate) for ``seconds``;
    memory after :data:`WARMUP_S` and at the end (module docstring)."""
    await run.start(workers, {**CAPACITY_ENV, **SOAK_ENV})
    tps, _ = await run_tasks(run.settings, bench_tasks(2000, "rate"), run.procs, run.log)
    load = rate or tps / 2
    samples: list[tuple[float, float, float]] = []  # (s since start, workers' RSS MiB, Redis MiB)
    t0 = time.perf_counter()

    async def sample() -> None:
        while True:
            info = await redis.info("memory")
            samples.append((round(time.perf_counter() - t0, 1), rss_mb([p.pid for p in run.procs]),
                            round(info["used_memory"] / 2**20, 1)))
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    try:
        latencies = await open_loop(run.settings, load, seconds, run.procs, run.log, "soak")
    finally:
        sampler.cancel()
    warm = next((x for x in samples if x[0] >= WARMUP_S), samples[0])
    # the end of the load, not of the drain of what it left queued (a backlog, if any)
    end = [x for x in samples if x[0] <= seconds][-1]
    p50, p99 = _quantiles(latencies)
    return {"soak_s": seconds, "workers": workers, "burst_tasks_per_s": round(tps, 1),
            "tasks_per_s": round(load, 1), "warmup_s": warm[0], "end_s": end[0],
            "drain_s": round(samples[-1][0] - seconds, 1),
            "windows": {k.removeprefix("RMO_").lower(): float(v) for k, v in SOAK_ENV.items()},
            "tasks": len(latencies), "p50_ms": p50, "p99_ms": p99,
            "rss_mb_after_warmup": warm[1], "rss_mb_end": end[1],
            "rss_growth_pct": round(100 * (end[1] - warm[1]) / warm[1], 1) if warm[1] else None,
            "redis_mb_after_warmup": warm[2], "redis_mb_end": end[2],
            "redis_growth_pct": round(100 * (end[2] - warm[2]) / warm[2], 1) if warm[2] else None,
            "samples": samples, "machine": _machine()}


def _machine() -> str:
    return f"{socket.gethostname()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"


def run_bench(*, tasks: int, workers: int, as_json: bool, budgets: Path | None = None,
              load_s: float = 60.0, soak_s: float | None = None,
              profile: Path | None = None, soak_rate: float | None = None) -> int:
    """Entry point of `rmo bench`; prints the figures, returns the exit code. ``budgets``: a
    budgets file the workers run under; ``load_s``: length of the open-loop load (s);
    ``soak_s``: run the soak instead (module docstring), at ``soak_rate`` tasks/s (None: half
    the burst rate); ``profile``: a directory for py-spy recordings of the workers during the
    burst (:class:`Profiler`)."""
    log = Path(tempfile.gettempdir()) / "rmo-bench-worker.log"
    try:
        result = asyncio.run(cancelled_by_sigterm(_bench(tasks, workers, log, budgets, load_s,
                                                         soak_s, profile, soak_rate)))
    except asyncio.CancelledError:
        print("error: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except DemoError as exc:
        print(f"error: {exc}", *exc.detail, sep="\n", file=sys.stderr)
        return exc.exit_code
    if as_json:
        print(orjson.dumps(result).decode())
    else:
        for k, v in result.items():
            if k == "top_frames":
                print("top frames during the burst (inclusive %, self %):")
                for frame, inclusive, own in v:
                    print(f"  {inclusive:5.1f} {own:5.1f}  {frame}")
            elif k != "samples":
                print(f"{k:31} {v}")
    return 0
