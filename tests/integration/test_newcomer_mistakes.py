"""A newcomer's mistakes end in a clear message and a non-zero exit within seconds, never a
hang, a traceback or a wrong answer: the `rmo` CLI run as a user runs it, against the real
broker and Redis (issue: fail loudly, never hang, never answer wrong)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from models.codec import MAX_VALUE_BYTES
from streams import liveness
from streams.config import Settings
from streams.embedded import free_port
from streams.keys import Keys
from streams.liveness import Heartbeat
from tests.integration.helpers import (
    cli_env,
    events,
    providers_file,
    rmo,
    rmo_command,
    sim,
    worker,
)

pytestmark = pytest.mark.integration

ORACLE = "providers:\n" + sim("oracle")
TASK = {"task_id": "t1", "kind": "code", "prompt": "def add(a, b):\n    pass\n",
        "entry_point": "add", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (asserting there is exactly one)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- addresses


COMMANDS = [("status", "t1"), ("submit", "-"), ("replay", "--verify"), ("lineage", "t1"),
            ("deadletter",), ("worker",), ("demo", "--limit", "1"), ("topics", "create"),
            ("metrics",)]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_set_redis_url_that_does_not_answer_fails_in_one_line(command: tuple[str, ...],
                                                                settings: Settings,
                                                                tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    env = cli_env(settings, REDIS_URL=closed, RMO_STATE_DIR=str(tmp_path))
    result = rmo(*command, env=env, timeout=30, stdin=orjson.dumps(TASK).decode())
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert f"REDIS_URL={closed} does not answer" in line and "unset it" in line
    assert not list(tmp_path.iterdir()), "an embedded service was started in its place"


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_set_broker_that_does_not_answer_fails_in_one_line(command: tuple[str, ...],
                                                             settings: Settings,
                                                             tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    env = cli_env(settings, KAFKA_BOOTSTRAP_SERVERS=closed, RMO_STATE_DIR=str(tmp_path))
    result = rmo(*command, env=env, timeout=30, stdin=orjson.dumps(TASK).decode())
    assert result.returncode == 2, result.stderr
    assert f"KAFKA_BOOTSTRAP_SERVERS={closed} does not answer" in one_line_error(result)


def test_debug_shows_the_traceback(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                  RMO_STATE_DIR=str(tmp_path))
    result = rmo("status", "t1", "--debug", env=env, timeout=30)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ServiceUnreachable" in result.stderr


# --------------------------------------------------------------------------- rmo up / down


def test_up_and_down_own_exactly_what_they_started(tmp_path: Path) -> None:
    env_a = cli_env(RMO_STATE_DIR=str(tmp_path / "a"), RMO_NAMESPACE="upa")
    env_b = cli_env(RMO_STATE_DIR=str(tmp_path / "b"), RMO_NAMESPACE="upb")
    up_a = rmo("up", env=env_a, timeout=60)
    try:
        up_b = rmo("up", env=env_b, timeout=60)
        try:
            assert up_a.returncode == 0 and up_b.returncode == 0, up_a.stderr + up_b.stderr
            printed = dict(line.split("  ", 1)[0].split("=", 1) for line in up_a.stdout.splitlines()
                           if line.startswith(("KAFKA_BOOTSTRAP_SERVERS=", "REDIS_URL=")))
            assert set(printed) == {"KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"}
            assert printed["REDIS_URL"] != "redis://127.0.0.1:6379/0"

            again = rmo("up", env=env_a, timeout=60)
            assert again.stdout.count("already running") == 2, again.stdout

            # what `rmo up` printed is what later commands use (not the Redis on :6379)
            r = SyncRedis.from_url(printed["REDIS_URL"], decode_responses=True)
            r.hset(Keys("upa").task("seen-by-a"), mapping={"submitted_at": "2026-01-01T00:00:00+00:00"})
            r.close()
            status = rmo("status", "seen-by-a", env=env_a, timeout=60)
            assert status.returncode == 0 and "pending" in status.stdout, status.stdout + status.stderr

            down_a = rmo("down", env=env_a, timeout=60)
            assert down_a.returncode == 0 and down_a.stdout.count("stopped") == 2, down_a.stdout
            still = rmo("status", "anything", env=env_b, timeout=60)
            assert still.returncode == 1 and "unknown" in still.stdout, still.stderr
            gone = rmo("status", "seen-by-a", env=env_a, timeout=60)
            assert gone.returncode != 0  # nothing recorded any more: :6379 does not have it
        finally:
            rmo("down", env=env_b, timeout=60)
    finally:
        rmo("down", env=env_a, timeout=60)


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(("line", "expected"), [
    ({k: v for k, v in TASK.items() if k != "prompt"}, "field 'prompt': required, missing"),
    ({**TASK, "kind": "sql"}, "field 'kind': input should be 'code', 'json' or 'text' (got 'sql')"),
    ({**TASK, "priority": 11}, "field 'priority'"),
    ({**TASK, "colour": "red"}, "field 'colour': unknown field"),
])
def test_submit_names_the_line_and_the_field(line: dict, expected: str, settings: Settings,
                                             topics, tmp_path: Path) -> None:
    good = orjson.dumps({**TASK, "task_id": "fine"}).decode()
    body = f"{good}\n{orjson.dumps(line).decode()}\n"
    result = rmo("submit", "-", env=cli_env(settings), stdin=body, timeout=60)
    assert result.returncode == 2
    error = one_line_error(result)
    assert error.startswith("error: stdin:2: ") and expected in error, error
    assert "task_id, kind, prompt" in error
    # one bad line submits nothing, not even the good line before it
    assert not [e for e in asyncio.run(events(settings, topics, "tasks"))
                if e.event_type == "TaskSubmitted"]


def test_submit_refuses_an_oversized_task_naming_the_limit(settings: Settings, topics,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(orjson.dumps({**TASK, "prompt": "x" * MAX_VALUE_BYTES}).decode() + "\n")
    result = rmo("submit", str(path), env=cli_env(settings), timeout=60)
    assert result.returncode == 2
    error = one_line_error(result)
    assert f"{path}:1: task 't1'" in error and f"{MAX_VALUE_BYTES:,}-byte record limit" in error


def test_deadletter_with_nothing_to_show_says_so(settings: Settings, topics) -> None:
    result = rmo("deadletter", env=cli_env(settings), timeout=60)
    assert result.returncode == 0 and result.stdout == ""
    assert f"no dead letters in {topics.name('deadletter')}" in result.stderr


# --------------------------------------------------------------------------- demo


def background(settings: Settings, tmp_path: Path, *args: str, **extra: str) -> subprocess.Popen:
    """`rmo ARGS` in the background, its own process group, stderr readable line by line."""
    env = cli_env(settings, RMO_STATE_DIR=str(tmp_path / "state"), **extra)
    return subprocess.Popen([*rmo_command(), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def demo(settings: Settings, tmp_path: Path, *args: str, **extra: str) -> subprocess.Popen:
    """`rmo demo ARGS` in the background (:func:`background`)."""
    return background(settings, tmp_path, "demo", *args, **extra)


def kill_worker_and_wait(proc: subprocess.Popen, worker_pid: int, within_s: float) -> str:
    """SIGKILL the worker ``worker_pid`` that ``proc`` waits for; assert ``proc`` exits 1
    within ``within_s`` seconds; return its stderr. ``proc`` is killed if it hangs."""
    try:
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < within_s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1
    return err


def read_until(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    """stderr of ``proc`` up to and including the first line containing ``needle``."""
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while needle not in seen:
        assert time.monotonic() < deadline, f"no {needle!r} in {timeout_s} s:\n{seen}"
        if sel.select(0.2):
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"stderr closed before {needle!r}:\n{seen}")
            seen += line
    return seen


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("accuracy", "-0.5", "field 'accuracy': accuracy values must lie in [0, 1]"),
    ("acuracy", "0.5", "field 'acuracy': unknown field"),
])
def test_demo_with_a_bad_providers_file_fails_at_once(field: str, value: str, expected: str,
                                                      settings: Settings, tmp_path: Path) -> None:
    bad = providers_file(tmp_path, f"providers:\n  - id: x\n    kind: sim\n    model: grok-4\n"
                                   f"    {field}: {value}\n")
    result = rmo("demo", "--limit", "1", "--providers", str(bad),
                 env=cli_env(settings, RMO_STATE_DIR=str(tmp_path / "state")), timeout=60)
    assert result.returncode == 2
    assert expected in one_line_error(result)


def test_demo_exits_with_the_workers_error_when_it_dies_at_start(settings: Settings,
                                                                 tmp_path: Path) -> None:
    # a setting only the worker checks: the demo must notice the exit, not wait 900 s
    proc = demo(settings, tmp_path, "--limit", "2", "--providers",
                str(providers_file(tmp_path, ORACLE)),
                RMO_VALIDATOR_LEVELS='["syntax", "tets"]')
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "the worker (pid" in err and "exited with code" in err
    assert "unknown validation levels ['tets']" in err


def test_demo_exits_within_seconds_when_its_worker_is_killed(settings: Settings,
                                                             tmp_path: Path) -> None:
    proc = demo(settings, tmp_path, "--providers", str(providers_file(tmp_path, ORACLE)))
    try:
        head = read_until(proc, "started a worker (pid ", 60)
        pid = int(head.rsplit("started a worker (pid ", 1)[1].split(",")[0])
        # progress says what is happening before anything completed
        read_until(proc, "starting the worker", 10)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    rest = kill_worker_and_wait(proc, pid, within_s=10)
    assert f"the worker (pid {pid}) was killed by signal 9" in rest


def test_sigterm_stops_the_demo_and_the_worker_it_started(settings: Settings,
                                                          tmp_path: Path) -> None:
    proc = demo(settings, tmp_path, "--providers", str(providers_file(tmp_path, ORACLE)))
    try:
        head = read_until(proc, "started a worker (pid ", 60)
        pid = int(head.rsplit("started a worker (pid ", 1)[1].split(",")[0])
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    sigterm_and_wait(proc)
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the demo, not orphaned
        os.kill(pid, 0)


def sigterm_and_wait(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc`` (killed if it does not exit within 60 s); assert it exited 143 with
    the one-line error and no traceback."""
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "error: stopped by SIGTERM" in err and "Traceback" not in err


async def _heartbeats(settings: Settings) -> list[Heartbeat]:
    r = Redis.from_url(settings.require_redis())
    try:
        return await liveness.live_workers(r, Keys(settings.namespace))
    finally:
        await r.aclose()


def test_demo_ignores_the_stale_heartbeat_of_a_stopped_worker(settings: Settings, topics,
                                                              tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Heartbeat(host=liveness.HOST, pid=dead.pid, started_at=datetime.now(UTC).isoformat(),
                      providers=("ghost",), fingerprint="0" * 16, providers_source="ghost.yaml",
                      state="running")
    r = SyncRedis.from_url(settings.require_redis())
    r.set(liveness.key(Keys(settings.namespace), stale.host, stale.pid), stale.to_json(), ex=60)
    r.close()
    proc = demo(settings, tmp_path, "--limit", "2", "--json", "--providers",
                str(providers_file(tmp_path, ORACLE)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "started a worker" in err and "joining consumer group" in err
    assert orjson.loads(out)["completed"] == 2
    assert asyncio.run(_heartbeats(settings)) == []  # the stale one is gone, ours cleared


def _demo_beside_a_running_worker(running: Settings, settings: Settings, tmp_path: Path) -> str:
    """Start a worker with ``running``'s settings, wait for its heartbeat, run `rmo demo` with
    ``settings`` beside it; assert the demo refused (exit 2) and return its one error line."""
    with worker(running, tmp_path):
        deadline = time.monotonic() + 60
        while not asyncio.run(_heartbeats(settings)):
            assert time.monotonic() < deadline, "the worker never announced itself"
            time.sleep(0.2)
        result = rmo("demo", "--limit", "1",
                     env=cli_env(settings, RMO_STATE_DIR=str(tmp_path / "state")), timeout=60)
    assert result.returncode == 2
    return one_line_error(result)


def test_demo_refuses_a_running_worker_with_other_providers(settings: Settings, topics,
                                                            tmp_path: Path) -> None:
    others = settings.model_copy(update={"providers_file": providers_file(tmp_path, ORACLE)})
    error = _demo_beside_a_running_worker(others, settings, tmp_path)
    assert "providers oracle" in error and "providers grok, claude, gemini (defaults" in error


def test_demo_refuses_a_running_worker_with_another_policy(settings: Settings, topics,
                                                           tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RMO_POLICY", "random")  # the worker's; the demo's shell has none
    error = _demo_beside_a_running_worker(settings, settings, tmp_path)
    assert "(defaults), policy random" in error and "policy thompson:" in error


def _worker_children(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children
            if b"worker" in Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")]


def test_bench_exits_when_a_worker_it_waits_for_is_killed(settings: Settings, tmp_path: Path) -> None:
    proc = background(settings, tmp_path, "bench", "--tasks", "3000", "--workers", "1")
    try:
        deadline = time.monotonic() + 120
        while not (workers := _worker_children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    err = kill_worker_and_wait(proc, workers[0], within_s=15)
    assert f"the worker (pid {workers[0]}) was killed by signal 9" in err


def _workers(pid: int) -> set[int]:
    """The live `rmo worker` child processes of ``pid`` (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, task.read_text().split()):
            with contextlib.suppress(FileNotFoundError):
                if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(child)
    return found


def test_sigterm_stops_the_bench_and_the_workers_it_started(settings: Settings, topics,
                                                            tmp_path: Path) -> None:
    proc = background(settings, tmp_path, "bench", "--soak", "60", "--soak-rate", "5")
    try:
        deadline = time.monotonic() + 90
        while len(workers := _workers(proc.pid)) < 2:  # the soak's two workers
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    sigterm_and_wait(proc)
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
