"""`rmo status` tells why a task failed, `rmo lineage --payload` shows what every event said,
and a record over the size limit ends its task as ``dead_lettered`` (SPEC §3, §5, §6).

Two worker runs (module fixtures) on a real Tansu broker and real Redis:
- ``wrong``: one sim provider whose answer book holds wrong solutions for two small tasks,
  so one task fails an assert and the other raises;
- ``default``: the default sim profiles, a task that is not in HumanEval (its answer is the
  sim stub) and an oversized TaskSubmitted produced with raw aiokafka, keyed by its task id.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from agents.providers.registry import load_providers
from models.codec import MAX_VALUE_BYTES
from models.events import Envelope, TaskSubmitted
from streams.config import Settings
from streams.keys import Keys
from streams.pipeline import build_consumers, wait_caught_up
from streams.replay import replay, verify
from streams.topics import TopicRegistry, create_topics, load_topics
from tests.integration.helpers import events, providers_file, submit, wait_completed, worker

pytestmark = pytest.mark.integration

ADD = 'def add(a, b):\n    """Return the sum of a and b."""\n'
HALF = 'def half(x):\n    """Return half of x."""\n'
WRONG_BOOK = [{"prompt": ADD, "solution": "    return a - b\n"},
              {"prompt": HALF, "solution": "    return x / 0\n"}]
ASSERT_TASK = TaskSubmitted(task_id="st-assert", kind="code", prompt=ADD, entry_point="add",
                            test="def check(candidate):\n    assert candidate(0, 0) == 0\n"
                                 "    assert candidate(1, 2) == 3\n")
RAISE_TASK = TaskSubmitted(task_id="st-raise", kind="code", prompt=HALF, entry_point="half",
                           test="def check(candidate):\n    assert candidate(4) == 2\n")
STUB_TASK = TaskSubmitted(
    task_id="st-stub", kind="code", entry_point="triple",
    prompt='def triple(n: int) -> int:\n    """Return n * 3 (not a HumanEval problem)."""\n',
    test="def check(candidate):\n    assert candidate(2) == 6\n")
HUGE_ID = "st-huge"


def rmo(s: Settings, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the `rmo` CLI against this run's broker, Redis and namespace."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=s.require_kafka(), REDIS_URL=s.require_redis(),
               RMO_NAMESPACE=s.namespace)
    exe = Path(sys.executable).with_name("rmo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streams.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def status_json(s: Settings, task_id: str) -> dict:
    out = rmo(s, "status", task_id, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@dataclass
class Run:
    settings: Settings
    registry: TopicRegistry
    redis: Redis
    completed: dict[str, Envelope]


@pytest.fixture(scope="module")
async def runs(kafka, redis_url) -> AsyncIterator[list[str]]:
    """Namespaces used by this module's runs (and their replays), dropped at the end."""
    used: list[str] = []
    yield used
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        for ns in used:
            async for key in redis.scan_iter(Keys(ns).pattern(), count=1000):
                await redis.delete(key)
    finally:
        await redis.aclose()


async def _start(kafka: str, redis_url: str, runs: list[str], providers: Path | None) -> Run:
    ns = f"t{secrets.token_hex(4)}"
    runs.append(ns)
    s = Settings(namespace=ns, kafka_bootstrap_servers=kafka, redis_url=redis_url,
                 providers_file=providers)
    registry = load_topics(ns)
    await create_topics(s.require_kafka(), registry)
    return Run(s, registry, Redis.from_url(redis_url, decode_responses=True), {})


@pytest.fixture(scope="module")
async def wrong(kafka, redis_url, runs, tmp_path_factory) -> AsyncIterator[Run]:
    tmp = tmp_path_factory.mktemp("status-wrong")
    book = tmp / "wrong.jsonl"
    book.write_text("".join(json.dumps(r) + "\n" for r in WRONG_BOOK))
    body = ("providers:\n  - id: wrongo\n    kind: sim\n    model: grok-4\n    accuracy: 1.0\n"
            "    error_rate: 0.0\n    timeout_rate: 0.0\n    latency_ms: {mean: 1, p95: 2}\n"
            f"    reference_file: {book}\n")
    run = await _start(kafka, redis_url, runs, providers_file(tmp, body))
    try:
        with worker(run.settings, tmp) as log:
            await submit(run.settings, run.registry, [ASSERT_TASK, RAISE_TASK])
            run.completed = await wait_completed(run.settings, run.registry,
                                                 {ASSERT_TASK.task_id, RAISE_TASK.task_id}, log=log)
            assert await wait_caught_up(run.settings, run.registry, run.redis, timeout_s=60)
        yield run
    finally:
        await run.redis.aclose()


@pytest.fixture(scope="module")
async def default(kafka, redis_url, runs, tmp_path_factory) -> AsyncIterator[Run]:
    tmp = tmp_path_factory.mktemp("status-default")
    run = await _start(kafka, redis_url, runs, None)
    # a well-formed TaskSubmitted from another client, only too big to be read
    big = {"event_id": "st-oversized", "event_type": "TaskSubmitted", "schema_version": 1,
           "occurred_at": "2026-01-01T00:00:00Z", "correlation_id": HUGE_ID, "causation_id": None,
           "producer": "other-client",
           "payload": {"task_id": HUGE_ID, "kind": "code", "prompt": ""}}
    big["payload"]["prompt"] = "x" * (MAX_VALUE_BYTES + 100 - len(orjson.dumps(big)))
    value = orjson.dumps(big)
    assert MAX_VALUE_BYTES < len(value) < (1 << 20)
    try:
        with worker(run.settings, tmp) as log:
            await submit(run.settings, run.registry, [STUB_TASK])
            producer = AIOKafkaProducer(bootstrap_servers=run.settings.require_kafka(),
                                        max_request_size=4 << 20)
            await producer.start()
            try:
                await producer.send_and_wait(run.registry.name("tasks"), value, key=HUGE_ID.encode())
            finally:
                await producer.stop()
            run.completed = await wait_completed(run.settings, run.registry,
                                                 {STUB_TASK.task_id, HUGE_ID}, log=log)
            assert await wait_caught_up(run.settings, run.registry, run.redis, timeout_s=60)
        yield run
    finally:
        await run.redis.aclose()


async def test_status_json_shows_provider_answer_failed_assert_cost_and_tokens(wrong):
    done = wrong.completed[ASSERT_TASK.task_id].payload
    assert done.status == "failed"
    [call] = [e.payload for e in await events(wrong.settings, wrong.registry, "calls")
              if e.payload.task_id == ASSERT_TASK.task_id]

    report = status_json(wrong.settings, ASSERT_TASK.task_id)
    assert report["status"] == "failed"
    assert (report["provider"], report["providers"], report["action"]) == (
        "wrongo", ["wrongo"], "wrongo:single")
    assert report["answer"] == ADD + "    return a - b\n"
    assert report["answer_chars"] == len(report["answer"]) and report["answer_truncated"] is False
    assert report["failure"] == {"level": "tests", "error_type": "AssertionError",
                                 "message": "test line 3: assert candidate(1, 2) == 3"}
    assert report["levels"] == [{"level": lv, "passed": lv != "tests"}
                                for lv in ("syntax", "static", "security", "tests")]
    assert report["passed"] is False
    assert (report["tests_passed"], report["tests_total"]) == (1, 2)
    # numbers are JSON numbers equal to what the events carry
    assert isinstance(report["cost_usd"], float) and report["cost_usd"] == done.cost_usd > 0
    assert type(report["tokens"]) is int and report["tokens"] == done.tokens > 0
    assert isinstance(report["latency_ms"], float) and report["latency_ms"] == done.latency_ms
    assert type(report["priority"]) is int and isinstance(report["agreement"], float)
    assert report["calls"] == [{
        "provider": "wrongo", "attempt": 0, "ok": True, "model": call.model, "error_type": None,
        "http_status": None, "latency_ms": call.latency_ms, "cost_usd": call.cost_usd,
        "tokens": call.input_tokens + call.output_tokens}]
    assert report["notes"] == []


async def test_status_shows_the_exception_of_a_raising_answer(wrong):
    report = status_json(wrong.settings, RAISE_TASK.task_id)
    assert report["status"] == "failed" and report["passed"] is False
    assert report["failure"]["level"] == "tests"
    assert report["failure"]["error_type"] == "ZeroDivisionError"
    assert report["failure"]["message"] == "test line 2: assert candidate(4) == 2 -> division by zero"
    assert report["answer"].endswith("    return x / 0\n")
    assert (report["tests_passed"], report["tests_total"]) == (0, 1)


async def test_status_text_names_the_failure_and_prints_the_answer(wrong):
    out = rmo(wrong.settings, "status", ASSERT_TASK.task_id)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{ASSERT_TASK.task_id}: failed"
    assert "  chosen provider: wrongo" in lines
    assert "  failed level: tests (AssertionError): test line 3: assert candidate(1, 2) == 3" in lines
    assert "  validation: syntax ok, static ok, security ok, tests FAILED" in lines
    assert any(line.startswith("  cost: $") and "tokens" in line for line in lines)
    assert lines[-2:] == ['    |     """Return the sum of a and b."""', "    |     return a - b"]


async def test_status_of_an_unknown_task_exits_1(wrong):
    out = rmo(wrong.settings, "status", "no-such-task", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)["status"] == "unknown"


async def test_lineage_payload_shows_every_events_payload(wrong):
    task_id = ASSERT_TASK.task_id
    out = rmo(wrong.settings, "lineage", task_id, "--json", "--payload")
    assert out.returncode == 0, out.stderr
    nodes = {}
    stack = orjson.loads(out.stdout)
    while stack:
        n = stack.pop()
        nodes.setdefault(n["event_type"], n)
        stack.extend(n["children"])
    assert {"TaskSubmitted", "TaskAnalyzed", "ProviderSelected", "ProviderCallCompleted",
            "TaskExecuted", "TaskValidated", "RewardComputed", "TaskCompleted"} <= set(nodes)
    assert nodes["TaskSubmitted"]["payload"]["prompt"] == ADD
    assert nodes["TaskExecuted"]["payload"]["chosen_text"] == ADD + "    return a - b\n"
    failed = nodes["TaskValidated"]["payload"]["levels"][-1]
    assert (failed["level"], failed["passed"], failed["error_type"]) == ("tests", False, "AssertionError")
    assert nodes["TaskCompleted"]["payload"]["status"] == "failed"

    plain = rmo(wrong.settings, "lineage", task_id, "--json")
    assert plain.returncode == 0 and "payload" not in orjson.loads(plain.stdout)[0]

    text = rmo(wrong.settings, "lineage", task_id, "--payload")
    assert text.returncode == 0, text.stderr
    assert f'    | task_id: "{task_id}"' in text.stdout.splitlines()
    assert '| chosen: "wrongo"' in text.stdout
    assert '| status: "failed"' in text.stdout


async def test_a_task_outside_the_answer_book_gets_the_stub_and_says_so(default):
    report = status_json(default.settings, STUB_TASK.task_id)
    assert report["status"] == "failed"
    assert report["answer"].endswith("    raise NotImplementedError\n")
    assert report["failure"]["error_type"] == "NotImplementedError"
    assert len(report["notes"]) == 1
    assert "answer book" in report["notes"][0] and "HumanEval" in report["notes"][0]
    out = rmo(default.settings, "status", STUB_TASK.task_id)
    assert out.returncode == 0, out.stderr
    assert f"  note: {report['notes'][0]}" in out.stdout.splitlines()


async def test_an_oversized_record_keyed_by_its_task_completes_it_dead_lettered(default):
    done = default.completed[HUGE_ID]
    assert done.payload.status == "dead_lettered"
    report = status_json(default.settings, HUGE_ID)
    assert report["status"] == "dead_lettered"
    assert "oversized" in report["result"] and str(MAX_VALUE_BYTES) in report["result"]

    # lineage: the dead letter, then the completion it caused
    out = rmo(default.settings, "lineage", HUGE_ID, "--json")
    assert out.returncode == 0, out.stderr
    [letter] = [r for r in orjson.loads(out.stdout) if r["event_type"] == "DeadLettered"]
    assert [c["event_id"] for c in letter["children"]] == [done.event_id]
    assert done.causation_id == letter["event_id"]


@pytest.mark.parametrize("which", ["wrong", "default"])
async def test_replay_rebuilds_the_report_fields_exactly(which, request, runs):
    run: Run = request.getfixturevalue(which)
    s = run.settings
    target = f"{s.namespace}-r{secrets.token_hex(3)}"
    runs.append(target)
    await replay(s, run.registry, build_consumers(s, load_providers(s.providers_file, seed=s.seed)),
                 run.redis, target)
    assert await verify(run.redis, Keys(s.namespace), Keys(target)) == []
    for task_id in run.completed:
        live = await run.redis.hgetall(Keys(s.namespace).task(task_id))
        assert {"status", "result"} <= set(live)
        assert live == await run.redis.hgetall(Keys(target).task(task_id))
