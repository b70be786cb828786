"""A worker survives its broker or Redis going away, keeps its log short meanwhile, and stops
within 10 s when told (SIGTERM or SIGINT), in any of those states.

Each broker test starts a Tansu of its own, since it stops it. Tansu keeps topics and records
in memory, so a broker that comes back has an empty log: the topics are created again, and the
worker is made to wait for the outage before it consumed anything, because its Redis
checkpoints would otherwise point past the new log's offsets (streams/stage.py skips records at
or below a checkpoint). Against Apache Kafka the log survives a broker restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import NodeNotReadyError, TopicAuthorizationFailedError
from redis.asyncio import Redis

from streams import embedded, liveness
from streams.bench import bench_tasks
from streams.config import Settings
from streams.demo import spawn_worker
from streams.keys import Keys
from streams.topics import create_topics, load_topics
from streams.transport import BrokerHealth, ConnectionLogFilter
from tests.integration.helpers import submit, wait_completed

pytestmark = pytest.mark.integration

STOP_WITHIN_S = 10.0  # the bound, from the signal to the process being gone
DOWN_WINDOW_S = 20.0
MAX_LINES_IN_WINDOW = 20


def _settings(kafka: str, redis_url: str, namespace: str) -> Settings:
    return Settings(namespace=namespace, kafka_bootstrap_servers=kafka, redis_url=redis_url,
                    sandbox="off", validator_levels=("syntax",))


@pytest.fixture
def own_kafka() -> Iterator[list[embedded.ServiceHandle]]:
    """A Tansu of this test's own; the list holds the broker running now (the test replaces
    it when it restarts the broker) and every one left is stopped at the end."""
    brokers = [embedded.start_kafka()]
    yield brokers
    for broker in brokers:
        broker.stop()


def _crash(broker: embedded.ServiceHandle) -> None:
    """Take the broker away at once, as a crash or a network partition would (Tansu with
    clients connected also ignores SIGTERM for seconds)."""
    os.kill(broker.pid, signal.SIGKILL)
    broker.stop()  # reaps it


def _lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines() if log.exists() else []


async def _until(probe, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s\n" + \
            "\n".join(_lines(log)[-30:])
        await asyncio.sleep(0.1)


async def _wait_running(settings: Settings, proc: subprocess.Popen, log: Path) -> None:
    """Until the worker's heartbeat says its consumer group's rebalance completed."""
    r = Redis.from_url(settings.redis_url, decode_responses=True)

    async def running() -> bool:
        assert proc.poll() is None, "worker exited:\n" + "\n".join(_lines(log)[-30:])
        return any(hb.pid == proc.pid and hb.state == "running"
                   for hb in await liveness.live_workers(r, Keys(settings.namespace)))

    try:
        await _until(running, 60, "worker running", log)
    finally:
        await r.aclose()


async def _line_appears(log: Path, text: str, timeout_s: float, after: int = 0) -> None:
    """Until a line containing ``text`` is logged after the first ``after`` lines."""
    async def seen() -> bool:
        return any(text in ln for ln in _lines(log)[after:])

    await _until(seen, timeout_s, f"log line {text!r}", log)


async def _stop_with(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, float]:
    """Send ``sig`` to the worker; (exit code, seconds until it was gone). A worker still
    there after 30 s is killed, so a failing test does not leave it behind."""
    started = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        code = await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -1, time.monotonic() - started
    return code, time.monotonic() - started


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_broker_outage_quiet_log_resume_and_sigterm(own_kafka, redis_url, namespace,
                                                          tmp_path: Path) -> None:
    """Broker gone for 20 s: few log lines, worker alive. Broker back (same port, topics
    created again): a new task completes. Broker gone again: SIGTERM stops the worker, exit
    code 0, within 10 s."""
    broker = own_kafka[0]
    s = _settings(broker.address, redis_url, namespace)
    topics = load_topics(namespace)
    await create_topics(broker.address, topics)
    log = tmp_path / "worker.log"
    proc = spawn_worker(s, log)
    try:
        await _wait_running(s, proc, log)
        before = len(_lines(log))
        _crash(broker)
        await asyncio.sleep(DOWN_WINDOW_S)
        window = _lines(log)[before:]
        assert proc.poll() is None, "worker died while the broker was down\n" + "\n".join(window)
        assert len(window) < MAX_LINES_IN_WINDOW, (
            f"{len(window)} log lines in {DOWN_WINDOW_S:.0f} s without a broker:\n"
            + "\n".join(window[:40]))
        # on a loaded machine the first failed reconnect can come late: wait for it
        await _line_appears(log, "unreachable", 40, after=before)

        back = len(_lines(log))
        own_kafka.append(embedded.start_kafka(port=broker.port))
        await create_topics(broker.address, topics)
        await _line_appears(log, "reachable again", 30, after=back)
        task = bench_tasks(1, f"resume-{namespace}")
        await submit(s, topics, task)
        await wait_completed(s, topics, {task[0].task_id}, timeout_s=60, log=log)

        again = len(_lines(log))
        _crash(own_kafka[-1])
        await _line_appears(log, "unreachable", 10, after=again)
        code, took = await _stop_with(proc, signal.SIGTERM)
        tail = "\n".join(_lines(log)[-30:])
        assert took < STOP_WITHIN_S, f"SIGTERM took {took:.1f} s with the broker down\n{tail}"
        assert code == 0, f"exit code {code} after SIGTERM with the broker down\n{tail}"
        assert "exiting now" not in tail, f"the graceful stop hit its deadline\n{tail}"
    finally:
        _kill(proc)


async def test_broker_outage_sigint(own_kafka, redis_url, namespace, tmp_path: Path) -> None:
    """Broker gone: SIGINT (Ctrl-C) stops the worker, exit code 0, within 10 s."""
    broker = own_kafka[0]
    s = _settings(broker.address, redis_url, namespace)
    await create_topics(broker.address, load_topics(namespace))
    log = tmp_path / "worker.log"
    proc = spawn_worker(s, log)
    try:
        await _wait_running(s, proc, log)
        before = len(_lines(log))
        _crash(broker)
        await _line_appears(log, "", 10, after=before)  # any line: the worker noticed
        code, took = await _stop_with(proc, signal.SIGINT)
        tail = "\n".join(_lines(log)[-30:])
        assert took < STOP_WITHIN_S, f"SIGINT took {took:.1f} s with the broker down\n{tail}"
        assert code == 0, f"exit code {code} after SIGINT with the broker down\n{tail}"
    finally:
        _kill(proc)


async def test_redis_outage_quiet_log_and_sigterm(kafka, namespace, tmp_path: Path) -> None:
    """Redis gone while batches are in flight: few log lines, worker alive; SIGTERM stops it,
    exit code 0, within 10 s (the unfinished batches are redelivered, nothing was committed
    for them)."""
    server = embedded.start_redis()
    try:
        s = _settings(kafka, server.address, namespace)
        topics = load_topics(namespace)
        await create_topics(kafka, topics)
        log = tmp_path / "worker.log"
        proc = spawn_worker(s, log)
        try:
            await _wait_running(s, proc, log)
            await submit(s, topics, bench_tasks(300, f"redis-{namespace}"))
            before = len(_lines(log))
            server.stop()
            await _line_appears(log, "paused: Redis unreachable", 15)
            await asyncio.sleep(10)
            window = _lines(log)[before:]
            assert proc.poll() is None, "worker died while Redis was down\n" + "\n".join(window)
            assert len(window) < MAX_LINES_IN_WINDOW, "\n".join(window[:40])
            code, took = await _stop_with(proc, signal.SIGTERM)
            tail = "\n".join(_lines(log)[-30:])
            assert took < STOP_WITHIN_S, f"SIGTERM took {took:.1f} s with Redis down\n{tail}"
            assert code == 0, f"exit code {code} after SIGTERM with Redis down\n{tail}"
        finally:
            _kill(proc)
    finally:
        server.stop()


def test_connection_errors_collapse_into_state_lines_and_reminders(caplog) -> None:
    """65 s of an outage, three client errors a second (aiokafka's own messages): none gets
    through; the log has the outage, a reminder at 30 s and 60 s, and the return. Errors of
    other kinds, and connection errors once the broker is back, pass."""
    now = [1000.0]
    health = BrokerHealth(reminder_s=30.0, clock=lambda: now[0])
    flt = ConnectionLogFilter(health)

    def record(logger: str, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, msg, args, None)

    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9092)")
    not_ready = NodeNotReadyError("Attempt to send a request to node which is not ready")
    outage = [record("aiokafka.client", "Unable connect to node with id %s: %s", 111, refused),
              record("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", 111,
                     not_ready),
              record("aiokafka.client", "Unable to update metadata from %s", [111])]
    with caplog.at_level(logging.WARNING, logger="rmo.kafka"):
        passed = []
        for second in range(65):
            now[0] = 1000.0 + second
            passed += [r for r in outage if flt.filter(r)]
        assert passed == []
        denied = record("aiokafka.consumer.group_coordinator",
                        "OffsetCommit failed for unauthorized topics %s",
                        TopicAuthorizationFailedError("t"))
        assert flt.filter(denied), "an error that is not about connectivity was dropped"
        health.reachable("node 111")
        assert flt.filter(outage[1]), "a connection error after the return was dropped"
    lines = caplog.messages
    assert len(lines) == 4, lines
    assert "node 111 unreachable" in lines[0] and "Connect call failed" in lines[0]
    assert "still unreachable: node 111 for 30 s" in lines[1]
    assert "still unreachable: node 111 for 60 s" in lines[2]
    assert "reachable again after 64.0 s (195 connection errors collapsed)" in lines[3]
