"""Helpers for integration tests: run a real worker process, submit, read topics back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from redis.asyncio import Redis

from models.codec import CodecError, decode, make_event
from models.events import Envelope, TaskSubmitted
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.demo import spawn_worker, stop_worker
from streams.keys import Keys
from streams.topics import TopicRegistry


def providers_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(body)
    return path


def sim(pid: str, *, accuracy: float = 1.0, error_rate: float = 0.0, model: str = "grok-4") -> str:
    return (f"  - id: {pid}\n    kind: sim\n    model: {model}\n    accuracy: {accuracy}\n"
            f"    error_rate: {error_rate}\n    timeout_rate: 0.0\n    latency_ms: {{mean: 1, p95: 2}}\n")


@contextlib.contextmanager
def worker(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "worker.log"
    proc = spawn_worker(settings, log)
    try:
        yield log
    finally:
        stop_worker(proc)


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group (it runs in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


async def submit(settings: Settings, registry: TopicRegistry, tasks: list[TaskSubmitted]) -> None:
    async with EventProducer(settings.require_kafka()) as p:
        await p.send_events(registry.name("tasks"), [make_event(t, producer="test") for t in tasks])


async def events(settings: Settings, registry: TopicRegistry, role: str) -> list[Envelope]:
    out = []
    async for r in read_topic(settings.require_kafka(), registry.name(role)):
        with contextlib.suppress(CodecError):
            out.append(decode(r.value, max_bytes=None))
    return out


async def wait_completed(settings: Settings, registry: TopicRegistry, ids: set[str],
                         timeout_s: float = 120.0, log: Path | None = None) -> dict[str, Envelope]:
    """Poll the tasks topic until each id has a TaskCompleted; returns task id -> event."""
    deadline = time.monotonic() + timeout_s
    done: dict[str, Envelope] = {}
    while time.monotonic() < deadline:
        for e in await events(settings, registry, "tasks"):
            if e.event_type == "TaskCompleted" and e.payload.task_id in ids:
                done.setdefault(e.payload.task_id, e)
        if len(done) == len(ids):
            return done
        await asyncio.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    missing = sorted(ids - set(done))[:5]
    raise AssertionError(f"{len(done)}/{len(ids)} completed in {timeout_s} s; where the first "
                         f"missing ones are: {await _where(settings, registry, missing)}\n{tail}")


async def _where(settings: Settings, registry: TopicRegistry, task_ids: list[str]) -> dict:
    """For a failing wait: each task's projected status and the event types the log holds
    for it (which stage it reached)."""
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        status = {t: await redis.hgetall(Keys(settings.namespace).task(t)) for t in task_ids}
    finally:
        await redis.aclose()
    seen: dict[str, list[str]] = {t: [] for t in task_ids}
    for role in ("tasks", "analyses", "decisions", "calls", "executions", "validations", "rewards"):
        for e in await events(settings, registry, role):
            if getattr(e.payload, "task_id", None) in seen:
                seen[e.payload.task_id].append(f"{role}:{e.event_type}")
    return {t: {"status": status[t], "events": seen[t]} for t in task_ids}


async def eventually(probe, timeout_s: float = 20.0):
    """Await ``probe()`` until it returns a truthy value (projections lag the topics a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


def cli_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell for `rmo`: no service or RMO_ variable of ours
    leaks in; ``settings`` sets broker, Redis and namespace; ``extra`` adds variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RMO_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    if settings is not None:
        env.update(KAFKA_BOOTSTRAP_SERVERS=settings.require_kafka(),
                   REDIS_URL=settings.require_redis(), RMO_NAMESPACE=settings.namespace)
    env.update(extra)
    return env


def rmo_command() -> list[str]:
    """The `rmo` console script of this interpreter's venv (or ``python -m streams.cli``)."""
    exe = Path(sys.executable).with_name("rmo")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "streams.cli"]


def rmo(*args: str, env: dict[str, str], timeout: float = 120.0,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `rmo` as a user would; returns the finished process (stdout, stderr as text)."""
    return subprocess.run([*rmo_command(), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin, check=False)


@contextlib.contextmanager
def llm_server_process(api_key: str) -> Iterator[str]:
    """The URL of a fake LLM server (tests/fakes/llm_server.py: the OpenAI and Anthropic
    protocols) run as its own process, accepting ``api_key``; stopped by pid on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.llm_server", "--port", "0",
                             "--api-key", api_key], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()
        assert "listening on " in line, line
        yield line.rsplit("listening on ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
