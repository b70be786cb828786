"""The HTTP API (streams/api.py) as a client meets it: `rmo serve` running as its own process
against a real worker, checked endpoint by endpoint with httpx, and fuzzed by schemathesis
against the server's own /openapi.json (no 5xx, every response as documented)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import schemathesis
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis import Redis as SyncRedis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from models.codec import MAX_VALUE_BYTES
from streams import embedded
from streams.api import MAX_BODY_BYTES
from streams.config import Settings
from streams.demo import humaneval_tasks, stop_worker
from streams.keys import Keys
from streams.pipeline import wait_caught_up
from streams.report import PLOTS
from streams.topics import TopicRegistry, create_topics, load_topics
from tests.integration.helpers import cli_env, events, providers_file, rmo, rmo_command, sim, worker

pytestmark = pytest.mark.integration

TOKEN = secrets.token_hex(16)
FINAL = {"passed", "failed", "rejected", "unverified", "dead_lettered", "budget_exceeded"}
TASKS = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in humaneval_tasks(4)]
"""HumanEval/0..3: the sim provider's answer book knows them, and their ids hold a "/"."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def serving(env: dict[str, str], tmp: Path, *args: str) -> Iterator[Server]:
    """`rmo serve -v --port P ARGS` in its own process group until its OpenAPI answers;
    SIGTERM (then SIGKILL) to that group on exit."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([*rmo_command(), "serve", "-v", "--port", str(port), *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"rmo serve exited {proc.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"rmo serve did not answer:\n{log.read_text()}"
            time.sleep(0.2)
        yield Server(url, log, proc)
    finally:
        stop_worker(proc)  # SIGTERM to its process group, SIGKILL after 20 s


def delete_namespaces(redis_url: str, *patterns: str) -> None:
    r = SyncRedis.from_url(redis_url)
    try:
        for pattern in patterns:
            for key in r.scan_iter(pattern, count=1000):
                r.delete(key)
    finally:
        r.close()


@dataclass
class Api:
    url: str
    settings: Settings
    registry: TopicRegistry
    log: Path
    pid: int

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def status(self, task_id: str, timeout_s: float = 120.0) -> dict:
        """Poll GET /tasks/{id} until the task's status is final; return the report."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = httpx.get(f"{self.url}/tasks/{task_id}", timeout=10)
            if r.status_code == 200 and r.json()["status"] in FINAL:
                return r.json()
            assert r.status_code in (200, 404), r.text
            assert time.monotonic() < deadline, f"{task_id} not final: {r.text}"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def api(kafka: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One namespace, one worker (a sim provider that always answers right) and one `rmo serve`
    with a token and a budgets file, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("api")
    ns = f"t{secrets.token_hex(4)}"
    s = Settings(namespace=ns, kafka_bootstrap_servers=kafka, redis_url=redis_url,
                 providers_file=providers_file(tmp, "providers:\n" + sim("solid")))
    registry = load_topics(ns)
    asyncio.run(create_topics(kafka, registry))
    budgets = tmp / "budgets.yaml"
    budgets.write_text("budgets:\n  - {scope: global, period: total, limit_usd: 5.0}\n")
    try:
        with worker(s, tmp), serving(cli_env(s, RMO_API_TOKEN=TOKEN), tmp, "--providers",
                                     str(s.providers_file), "--budgets", str(budgets)) as srv:
            deadline = time.monotonic() + 120
            while httpx.get(f"{srv.url}/health", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "no live worker in 120 s"
                time.sleep(0.5)
            yield Api(srv.url, s, registry, srv.log, srv.proc.pid)
    finally:
        # replays through the API rebuild into {ns}-replay-...; the fuzzing submits tasks
        delete_namespaces(redis_url, Keys(ns).pattern(), f"{ns}-replay-*")


@pytest.fixture(scope="module")
def passed(api: Api) -> dict:
    """HumanEval/0 submitted with POST /tasks and polled with GET /tasks/{id} until final."""
    r = httpx.post(f"{api.url}/tasks", json=TASKS[0], headers=api.auth, timeout=60)
    assert r.status_code == 202, r.text
    return {"submitted": r.json(), "report": api.status(TASKS[0]["task_id"])}


# --------------------------------------------------------------------------- tasks


def test_a_submitted_task_completes(api: Api, passed: dict) -> None:
    (ack,) = passed["submitted"]["tasks"]
    assert ack["task_id"] == "HumanEval/0" and ack["topic"] == api.registry.name("tasks")
    assert isinstance(ack["partition"], int) and isinstance(ack["offset"], int)
    report = passed["report"]
    assert report["status"] == "passed" and report["provider"] == "solid"
    assert report["cost_usd"] > 0 and report["tokens"] > 0 and report["latency_ms"] > 0
    assert report["levels"][-1] == {"level": "performance", "passed": True}
    # the id's "/" may also be percent-encoded
    assert httpx.get(f"{api.url}/tasks/HumanEval%2F0", timeout=10).json() == report
    missing = httpx.get(f"{api.url}/tasks/no-such-task", timeout=10)
    assert missing.status_code == 404 and "no-such-task" in missing.json()["detail"]


def test_a_list_is_submitted_in_order(api: Api) -> None:
    body = [TASKS[2], TASKS[3]]
    r = httpx.post(f"{api.url}/tasks", json=body, headers=api.auth, timeout=60)
    assert r.status_code == 202, r.text
    assert [t["task_id"] for t in r.json()["tasks"]] == ["HumanEval/2", "HumanEval/3"]
    assert {api.status(t["task_id"])["status"] for t in body} == {"passed"}


@pytest.mark.parametrize(("body", "loc", "words"), [
    ({k: v for k, v in TASKS[0].items() if k != "prompt"}, ["body", "prompt"], "required"),
    ([TASKS[0], {**TASKS[0], "kind": "sql"}], ["body", 1, "kind"], "'code', 'json' or 'text'"),
    ({"task_id": "j", "kind": "json", "prompt": "p"}, ["body"], "field 'schema': required"),
    ({**TASKS[0], "colour": "red"}, ["body", "colour"], "Extra inputs"),
    ([], ["body"], "at least 1 item"),
    ({**TASKS[0], "prompt": "x" * (MAX_VALUE_BYTES - 100)}, ["body"], "record limit"),
    ({**TASKS[0], "metadata": {"n": 2**70}}, ["body"], "64-bit"),
])
def test_bad_input_is_422_naming_the_field_and_submits_nothing(
        api: Api, body: object, loc: list, words: str) -> None:
    r = httpx.post(f"{api.url}/tasks", json=body, headers=api.auth, timeout=60)
    assert r.status_code == 422, r.text
    (error, *_) = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert words in error["msg"], error
    # HumanEval/0 of a rejected list must not have been produced a second time
    submitted = [e for e in asyncio.run(events(api.settings, api.registry, "tasks"))
                 if e.event_type == "TaskSubmitted" and e.payload.task_id == "HumanEval/0"]
    assert len(submitted) <= 1


def test_limits_and_malformed_bodies_are_4xx(api: Api) -> None:
    big = b'{"task_id": "big", "kind": "text", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    r = httpx.post(f"{api.url}/tasks", content=big, timeout=60,
                   headers={**api.auth, "content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{api.url}/tasks", content=b"{not json", timeout=10,
                   headers={**api.auth, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = httpx.post(f"{api.url}/replay", json={"from_offset": 1, "from_time": "2026-01-01T00:00:00Z"},
                   headers=api.auth, timeout=10)
    assert r.status_code == 422 and "choose one" in r.json()["detail"][0]["msg"]


def test_writes_need_the_token_and_it_is_never_logged(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for path, body in (("/tasks", TASKS[1]), ("/replay", {}),
                           ("/tasks/HumanEval/0/reexecute", None)):
            r = httpx.post(f"{api.url}{path}", json=body, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/providers", "/breakers", "/budgets", "/metrics/summary", "/health"):
        assert httpx.get(f"{api.url}{path}", timeout=30).status_code == 200, path
    assert TOKEN not in api.log.read_text()
    assert "GET /providers" in api.log.read_text()  # the log is at INFO: access lines are in


# --------------------------------------------------------------------------- reading


async def sse(response: httpx.Response) -> list[dict[str, str]]:
    """The server-sent events of ``response`` until it ends: ``{field: value}`` per event."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if current:
                out.append(current)
            current = {}
        elif not line.startswith(":"):  # a comment: a keep-alive ping
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
    return out + ([current] if current else [])


async def test_events_stream_live_and_end_with_the_task(api: Api) -> None:
    import orjson

    task_id = TASKS[1]["task_id"]
    async with (httpx.AsyncClient(timeout=httpx.Timeout(10, read=120)) as client,
                client.stream("GET", f"{api.url}/tasks/{task_id}/events") as response):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # subscribed before the task exists: its events arrive as they happen
        r = await client.post(f"{api.url}/tasks", json=TASKS[1], headers=api.auth)
        assert r.status_code == 202, r.text
        received = await asyncio.wait_for(sse(response), 120)
    kinds = [e["event"] for e in received]
    assert kinds[0] == "TaskSubmitted" and "TaskCompleted" in kinds, kinds
    assert {"TaskAnalyzed", "ProviderSelected", "ProviderCallCompleted", "TaskExecuted",
            "TaskValidated", "RewardComputed"} <= set(kinds)
    assert len({e["id"] for e in received}) == len(received)
    ids = [e["id"] for e in received]
    for n, e in enumerate(received):
        data = orjson.loads(e["data"])
        cause = data["event"]["causation_id"]
        assert cause is None or cause not in ids or ids.index(cause) < n, "cause after effect"
        assert data["event"]["event_id"] == e["id"] and data["event"]["event_type"] == e["event"]
        assert data["event"]["correlation_id"] == task_id and data["topic"].startswith(
            api.settings.namespace + ".")
    # a finished task's stream replays its history and ends at once
    async with (httpx.AsyncClient(timeout=60) as client,
                client.stream("GET", f"{api.url}/tasks/{task_id}/events") as response):
        again = await sse(response)
    assert [e["id"] for e in again] and {e["id"] for e in again} == {e["id"] for e in received}


async def test_a_closed_event_stream_releases_its_consumers(api: Api) -> None:
    server = psutil.Process(api.pid)
    broker_port = int(api.settings.require_kafka().rsplit(":", 1)[1])

    def to_broker() -> int:
        return sum(c.status == psutil.CONN_ESTABLISHED and bool(c.raddr)
                   and c.raddr.port == broker_port for c in server.net_connections("tcp"))

    before = to_broker()
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(2):
            async with client.stream("GET", f"{api.url}/tasks/never-submitted/events") as r:
                assert r.status_code == 200
                # the log's history is read, then one consumer per topic follows
                deadline = time.monotonic() + 30
                while to_broker() < before + 10:
                    assert time.monotonic() < deadline, "the stream never followed the topics"
                    await asyncio.sleep(0.2)
    deadline = time.monotonic() + 20
    while (now := to_broker()) > before:
        assert time.monotonic() < deadline, f"{now - before} connections left open"
        await asyncio.sleep(0.2)


def test_lineage(api: Api, passed: dict) -> None:
    r = httpx.get(f"{api.url}/tasks/HumanEval/0/lineage", params={"payload": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    (root,) = r.json()
    assert root["event_type"] == "TaskSubmitted" and root["producer"] == "api.submit"
    assert root["payload"]["task_id"] == "HumanEval/0"
    assert [c["event_type"] for c in root["children"]] == ["TaskAnalyzed"]
    plain = httpx.get(f"{api.url}/tasks/HumanEval/0/lineage", timeout=60).json()
    assert plain[0]["payload"] is None and plain[0]["event_id"] == root["event_id"]
    assert httpx.get(f"{api.url}/tasks/nothing-here/lineage", timeout=60).status_code == 404


def test_providers_breakers_budgets_metrics_health(api: Api, passed: dict) -> None:
    providers = httpx.get(f"{api.url}/providers", timeout=10).json()
    assert [(p["id"], p["kind"], p["model"], p["priced"]) for p in providers] == [
        ("solid", "sim", "grok-4", True)]
    (breaker,) = httpx.get(f"{api.url}/breakers", timeout=10).json()
    assert (breaker["provider"], breaker["state"], breaker["admits"]) == ("solid", "closed", "allow")
    (line,) = httpx.get(f"{api.url}/budgets", timeout=10).json()
    assert line["line"] == "global/all/total" and line["limit_usd"] == 5.0
    assert line["spent_usd"] >= passed["report"]["cost_usd"] > 0
    summary = httpx.get(f"{api.url}/metrics/summary", timeout=10).json()
    assert summary["namespace"] == api.settings.namespace and summary["workers"] == 1
    assert summary["tasks"]["passed"] >= 1 and summary["pass_rate"] > 0
    assert summary["providers"][0]["provider"] == "solid" and summary["providers"][0]["calls"] >= 1
    assert summary["policy"] and summary["q_updates"] >= 1
    health = httpx.get(f"{api.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["ok"] is True
    assert health.json()["kafka"]["ok"] and health.json()["redis"]["ok"]
    assert len(health.json()["workers"]) == 1 and health.json()["problems"] == []


def test_replay_verify_and_reexecute(api: Api, passed: dict) -> None:
    from redis.asyncio import Redis

    async def caught_up() -> bool:
        redis = Redis.from_url(api.settings.require_redis(), decode_responses=True)
        try:
            return await wait_caught_up(api.settings, api.registry, redis)
        finally:
            await redis.aclose()

    assert asyncio.run(caught_up())
    r = httpx.post(f"{api.url}/replay", json={"verify": True}, headers=api.auth, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["verified"] is True and result["differences"] == [] and result["events"] > 0
    assert result["target_namespace"].startswith(f"{api.settings.namespace}-replay-")
    r = httpx.post(f"{api.url}/tasks/HumanEval/0/reexecute", headers=api.auth, timeout=120)
    assert r.status_code == 200, r.text
    again = r.json()
    assert (again["original_passed"], again["passed"], again["new_provider_calls"]) == (True, True, 0)
    assert again["replayed_calls"] >= 1 and again["events"][0]["event_type"] == "TaskSubmitted"
    r = httpx.post(f"{api.url}/tasks/never-ran/reexecute", headers=api.auth, timeout=120)
    assert r.status_code == 404 and "never-ran" in r.json()["detail"]


# --------------------------------------------------------------------------- operations


def test_a_breaker_command_is_applied_and_shown(api: Api) -> None:
    url = f"{api.url}/breakers/solid"
    assert httpx.post(url, json={"command": "open"}, timeout=30).status_code == 401
    r = httpx.post(url, json={"command": "open", "reason": "maintenance", "operator": "ops"},
                   headers=api.auth, timeout=30)
    assert r.status_code == 202, r.text
    assert r.json()["event_type"] == "BreakerCommand"
    try:
        deadline = time.monotonic() + 60
        while True:  # the executor applies the command in order with the provider's calls
            (b,) = [b for b in httpx.get(f"{api.url}/breakers", timeout=10).json()
                    if b["provider"] == "solid"] or [None]
            if b and b["state"] == "open":
                break
            assert time.monotonic() < deadline, f"not applied in 60 s: {b}"
            time.sleep(0.3)
        assert b["hold"] == "manual" and "maintenance" in b["reason"] and b["admits"] == "reject"
    finally:
        r = httpx.post(url, json={"command": "reset"}, headers=api.auth, timeout=30)
        assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while [b["state"] for b in httpx.get(f"{api.url}/breakers", timeout=10).json()
           if b["provider"] == "solid"] != ["closed"]:
        assert time.monotonic() < deadline, "reset not applied in 60 s"
        time.sleep(0.3)
    r = httpx.post(f"{api.url}/breakers/nobody", json={"command": "open"}, headers=api.auth,
                   timeout=30)
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    r = httpx.post(url, json={"command": "explode"}, headers=api.auth, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "command"]


async def test_a_dead_letter_is_listed_and_retried(api: Api) -> None:
    tasks_topic = api.registry.name("tasks")
    async with AIOKafkaProducer(bootstrap_servers=api.settings.kafka_bootstrap_servers) as p:
        md = await p.send_and_wait(tasks_topic, b"not json at all", key=b"api-poison")
    client = httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30)
    deadline = time.monotonic() + 60
    while True:
        r = await client.get("/deadletters")
        assert r.status_code == 200, r.text
        mine = [d for d in r.json() if d["payload"]["source_offset"] == md.offset
                and d["payload"]["source_partition"] == md.partition
                and d["payload"]["source_topic"] == tasks_topic]
        if mine:
            break
        assert time.monotonic() < deadline, "no dead letter in 60 s"
        await asyncio.sleep(0.5)
    dead = mine[0]
    assert dead["payload"]["stage"] == "analyzer" and dead["payload"]["error_type"]
    assert base64.b64decode(dead["payload"]["original_value_b64"]) == b"not json at all"
    r = await client.post(f"/deadletters/{dead['event_id']}/retry")
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["topic"] == tasks_topic and again["offset"] > md.offset
    r = await client.post("/deadletters/no-such-id/retry")
    assert r.status_code == 404 and "no-such-id" in r.json()["detail"]
    await client.aclose()


def test_a_job_is_submitted_and_followed_and_a_cyclic_one_refused(api: Api) -> None:
    job = {"job_id": "api-job", "budget_tokens": 50_000, "subtasks": [
        {"id": "a", "domain": "docs", "kind": "text", "prompt": "Name a prime."},
        {"id": "b", "domain": "docs", "kind": "text", "prompt": "Check it.", "depends_on": ["a"]}]}
    r = httpx.post(f"{api.url}/jobs", json=job, headers=api.auth, timeout=60)
    assert r.status_code == 202, r.text
    assert r.json()["job_id"] == "api-job" and r.json()["topic"] == api.registry.name("jobs")
    deadline = time.monotonic() + 120
    while True:
        st = httpx.get(f"{api.url}/jobs/api-job", timeout=10)
        if st.status_code == 200 and st.json()["phase"] == "done":
            break
        assert st.status_code in (200, 404) and time.monotonic() < deadline, st.text
        time.sleep(0.3)
    report = st.json()
    assert report["status"] == "completed" and set(report["artefacts"]) == {"a", "b"}
    assert [m["domain"] for m in report["masters"]] == ["docs"]
    assert report["masters"][0]["tokens_allocated"] == 50_000 and report["tokens_used"] > 0
    listed = httpx.get(f"{api.url}/jobs", timeout=10).json()
    assert [(j["job_id"], j["status"], j["accepted"], j["subtasks"]) for j in listed] == \
        [("api-job", "completed", 2, 2)]
    page = httpx.get(f"{api.url}/jobs/api-job/report", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="plot-budget-flow"' in page.text
    assert httpx.get(f"{api.url}/jobs/nope/report", timeout=10).status_code == 404
    cyclic = {**job, "job_id": "api-cycle", "subtasks": [
        {**job["subtasks"][0], "depends_on": ["b"]}, job["subtasks"][1]]}
    bad = httpx.post(f"{api.url}/jobs", json=cyclic, headers=api.auth, timeout=60)
    assert bad.status_code == 422 and "dependency cycle: a -> b -> a" in bad.text
    assert httpx.post(f"{api.url}/jobs", json=job, timeout=60).status_code == 401
    assert httpx.get(f"{api.url}/jobs/nope", timeout=10).status_code == 404
    assert httpx.get(f"{api.url}/escalations", timeout=10).json() == []
    missing = httpx.post(f"{api.url}/escalations/nope/a/resolve", json={"skip": True},
                         headers=api.auth, timeout=10)
    assert missing.status_code == 404 and "no open escalation" in missing.text
    both = httpx.post(f"{api.url}/escalations/nope/a/resolve", json={"skip": True, "answer": "x"},
                      headers=api.auth, timeout=10)
    assert both.status_code == 422


def test_the_report_is_served_as_self_contained_html(api: Api, passed: dict) -> None:
    r = httpx.get(f"{api.url}/report", timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    r = httpx.get(f"{api.url}/report", params={"since": "yesterday-ish"}, timeout=30)
    assert r.status_code == 400 and r.json()["detail"].startswith("since:")


# --------------------------------------------------------------------------- fuzzing


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
"""No 5xx, and every status, content type, header and body as the OpenAPI document says. Not
"schema-valid data is accepted" (schemathesis' positive_data_acceptance): the document states
each task kind's fields (tests/unit/test_task_kinds.py checks it against the model), but not
the rules JSON Schema cannot say or says differently: integers in ``metadata`` must fit 64
bits, ``since`` must be a time or an age, and ``from_offset`` refuses 5.0, which JSON Schema
counts as an integer."""
EXAMPLES_PER_OPERATION = 15


def test_fuzzed_requests_get_no_5xx_and_documented_answers(api: Api) -> None:
    # schemathesis' pytest plugin (schemathesis.pytest.from_fixture) does not run on pytest 9
    # (it sets the private Function._nodeid), so its Python API drives hypothesis here
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    # the event stream stays open, by design, for a task that never completes (a random id);
    # it is tested above
    schema = schema.exclude(path_regex=r"/events$")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 20, [op.label for op in operations]
    for operation in operations:
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            case.call_and_validate(headers=api.auth, checks=CHECKS, timeout=60)

        fuzz()


# --------------------------------------------------------------------------- start-up


def test_serve_refuses_a_public_host_without_a_token(settings: Settings) -> None:
    for args in (("serve", "--host", "0.0.0.0"), ("mcp", "--http", "--host", "192.0.2.1")):
        result = rmo(*args, env=cli_env(settings), timeout=60)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "without RMO_API_TOKEN" in lines[0], result.stderr


def test_serve_refuses_a_set_broker_that_does_not_answer(settings: Settings) -> None:
    closed = free_port()
    env = cli_env(settings, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed}")
    result = rmo("serve", "--port", str(free_port()), env=env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{closed} does not answer" \
        in lines[0], result.stderr


def test_health_is_503_when_the_broker_goes_away(redis_url: str, tmp_path: Path) -> None:
    broker = embedded.start_kafka()
    ns = f"t{secrets.token_hex(4)}"
    s = Settings(namespace=ns, kafka_bootstrap_servers=broker.address, redis_url=redis_url)
    try:
        # no token on loopback: writes are open
        with serving(cli_env(s), tmp_path) as srv:
            up = httpx.get(f"{srv.url}/health", timeout=30)
            assert up.status_code == 503 and up.json()["kafka"]["ok"] is True
            assert up.json()["problems"] == [
                f"no worker is running in namespace {ns} (start one: `rmo worker`)"]
            broker.stop()
            down = httpx.get(f"{srv.url}/health", timeout=30)
            assert down.status_code == 503, down.text
            h = down.json()
            assert h["ok"] is False and h["kafka"] == {
                "address": broker.address, "ok": False, "error": "no Kafka metadata within 2 s"}
            assert h["redis"]["ok"] is True and h["problems"][0].startswith(f"kafka {broker.address}")
            started = time.monotonic()
            r = httpx.post(f"{srv.url}/tasks", json=TASKS[0], timeout=90)
            assert r.status_code == 503 and r.json()["detail"].startswith("Kafka does not answer")
            assert time.monotonic() - started < 60
    finally:
        broker.stop()
        delete_namespaces(redis_url, Keys(ns).pattern())
