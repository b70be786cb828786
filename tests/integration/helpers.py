"""Helpers for integration tests: run a real worker process, submit, read topics back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from models.codec import CodecError, decode, make_event
from models.events import Envelope, TaskSubmitted
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.demo import spawn_worker, stop_worker
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
    raise AssertionError(f"{len(done)}/{len(ids)} completed in {timeout_s} s\n{tail}")


async def eventually(probe, timeout_s: float = 20.0):
    """Await ``probe()`` until it returns a truthy value (projections lag the topics a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)
