"""The service functions that need no broker (task parsing, replay names, health of services
that do not answer) and the HTTP API's own rules (auth, bind, limits, error locations),
checked in-process without Kafka or Redis."""

from __future__ import annotations

import asyncio
import re
import socket

import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from models.codec import MAX_VALUE_BYTES
from streams import api, service
from streams.config import Settings

TASK = {"task_id": "t1", "kind": "code", "prompt": "def f():\n    pass\n"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- parse_tasks


def test_parse_tasks_makes_one_event_per_line_and_skips_blank_ones() -> None:
    lines = [orjson.dumps(TASK).decode(), "", "  ", orjson.dumps({**TASK, "task_id": "t2"}).decode()]
    events = service.parse_tasks(lines, "tasks.jsonl")
    assert [e.payload.task_id for e in events] == ["t1", "t2"]
    assert {e.producer for e in events} == {"cli.submit"} and len({e.event_id for e in events}) == 2
    assert service.parse_tasks(lines[:1], "x", producer="api.submit")[0].producer == "api.submit"


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    (orjson.dumps({**TASK, "kind": "sql"}).decode(),
     "field 'kind': input should be 'code', 'json' or 'text' (got 'sql')"),
    (orjson.dumps({k: v for k, v in TASK.items() if k != "prompt"}).decode(),
     "field 'prompt': required, missing"),
])
def test_a_bad_line_is_named_with_its_problem(line: str, problem: str) -> None:
    good = orjson.dumps(TASK).decode()
    with pytest.raises(service.InvalidTask) as caught:
        service.parse_tasks([good, line], "stdin")
    assert caught.value.where == "stdin:2" and problem in caught.value.problem
    assert str(caught.value) == f"stdin:2: {caught.value.problem}"
    assert not isinstance(caught.value, service.TaskTooLarge)


def test_a_task_over_the_record_limit_is_refused_with_its_size() -> None:
    line = orjson.dumps({**TASK, "prompt": "x" * MAX_VALUE_BYTES}).decode()
    with pytest.raises(service.TaskTooLarge) as caught:
        service.parse_tasks([line], "big.jsonl")
    assert str(caught.value).startswith("big.jsonl:1: task 't1' is 1,000,")
    assert f"over the {MAX_VALUE_BYTES:,}-byte record limit" in str(caught.value)


def test_a_value_the_codec_cannot_encode_is_an_invalid_task() -> None:
    # Python's json accepts integers beyond 64 bits (the HTTP API parses with it); orjson not
    task = service.TaskSubmitted.model_validate({**TASK, "metadata": {"n": 2**70}})
    with pytest.raises(service.InvalidTask, match="body: not encodable as an event: .*64-bit"):
        service.task_event(task, "body", producer="api.submit")


# --------------------------------------------------------------------------- replay, health


def test_replay_targets_are_fresh_names_of_the_namespace() -> None:
    s = Settings(namespace="ns")
    names = {service.replay_target(s) for _ in range(20)}
    assert all(re.fullmatch(r"ns-replay-\d{14}-[0-9a-f]{4}", n) for n in names)
    assert len(names) > 1  # the random part tells replays of the same second apart


def test_health_reports_services_that_do_not_answer_without_raising() -> None:
    kafka, redis = f"127.0.0.1:{closed_port()}", f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    h = asyncio.run(service.health(Settings(namespace="ns", kafka_bootstrap_servers=kafka,
                                            redis_url=redis)))
    assert h.ok is False and h.workers == []
    assert h.kafka == service.DependencyHealth(address=kafka, ok=False,
                                               error="no Kafka metadata within 2 s")
    assert h.redis.ok is False and h.redis.address == redis.replace("hunter2", "***")
    assert [p.split(":")[0] for p in h.problems] == ["kafka 127.0.0.1", "redis redis"]
    assert "hunter2" not in repr(h) and "hunter2" not in orjson.dumps(h.to_dict()).decode()


def test_health_without_resolved_services_says_so() -> None:
    h = asyncio.run(service.health(Settings(namespace="ns")))
    assert (h.kafka.error, h.redis.error) == ("no broker resolved", "no Redis resolved")


def test_a_tasks_events_are_released_after_their_causes_and_once() -> None:
    from models.codec import make_event
    from models.events import TaskCompleted, TaskSubmitted

    root = make_event(TaskSubmitted.model_validate(TASK), producer="test")
    done = make_event(TaskCompleted(task_id="t1", status="passed"), producer="test", cause=root)
    orphan = make_event(TaskCompleted(task_id="t1", status="failed"), producer="test",
                        cause=make_event(TaskSubmitted.model_validate(TASK), producer="x"))
    order = service._CausalOrder()

    def at(e, offset: int) -> service.TaskEvent:
        return service.TaskEvent("ns.tasks", 0, offset, e)

    assert order.add(at(done, 1)) == []  # read before its cause: it waits
    assert order.add(at(orphan, 2)) == []
    assert [te.event.event_id for te in order.add(at(root, 0))] == [root.event_id, done.event_id]
    assert order.add(at(done, 1)) == [] and order.add(at(root, 0)) == []  # duplicates
    assert [te.event.event_id for te in order.rest()] == [orphan.event_id]
    assert order.rest() == []


# --------------------------------------------------------------------------- HTTP API rules


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.0.2.1", False),
    ("example.com", False),
])
def test_only_loopback_hosts_serve_without_a_token(host: str, loopback: bool) -> None:
    assert api.is_loopback(host) is loopback
    api.check_bind(host, SecretStr("t"))  # with a token any host will do
    if loopback:
        api.check_bind(host, None)
    else:
        with pytest.raises(api.InsecureBind, match=f"refusing to serve on {re.escape(host)} "
                                                   "without RMO_API_TOKEN"):
            api.check_bind(host, None)
        with pytest.raises(api.InsecureBind):
            api.check_bind(host, SecretStr(""))


def test_the_token_is_read_from_the_environment_and_never_shown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMO_API_TOKEN", "sekrit-value")
    token = api.token_from_env()
    assert token is not None and token.get_secret_value() == "sekrit-value"
    assert "sekrit" not in repr(token) and "sekrit" not in str(token)
    monkeypatch.setenv("RMO_API_TOKEN", "")
    assert api.token_from_env() is None


def client(token: str | None) -> TestClient:
    """The app over services that do not answer: only the API's own rules can pass."""
    s = Settings(namespace="ns", kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}",
                 redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    return TestClient(api.create_app(s, SecretStr(token) if token else None))


def test_writes_need_the_bearer_token_when_one_is_set() -> None:
    c = client("tok")
    for headers in ({}, {"Authorization": "Bearer tok2"}, {"Authorization": "Basic tok"},
                    {"Authorization": "Bearer"}):
        r = c.post("/tasks", json=TASK, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
    # the right token gets past auth: the body is checked, then the broker is found missing
    assert c.post("/tasks", json={}, headers={"Authorization": "Bearer tok"}).status_code == 422
    r = c.post("/tasks", json=TASK, headers={"Authorization": "Bearer tok"})
    assert r.status_code == 503 and r.json()["detail"].startswith("Kafka does not answer")
    # no token configured (loopback): writes are open
    assert client(None).post("/tasks", json={}).status_code == 422


@pytest.mark.parametrize(("body", "loc"), [
    ({k: v for k, v in TASK.items() if k != "prompt"}, ["body", "prompt"]),
    ([TASK, {**TASK, "kind": "sql"}], ["body", 1, "kind"]),
    ([], ["body"]),
    ("a string", ["body"]),
    ({**TASK, "prompt": "x" * (MAX_VALUE_BYTES - 100)}, ["body"]),
])
def test_invalid_tasks_are_422_with_the_field_location_without_union_tags(
        body: object, loc: list) -> None:
    r = client(None).post("/tasks", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [loc]


def test_bodies_over_the_limit_are_413() -> None:
    r = client(None).post("/tasks", content=b" " * (api.MAX_BODY_BYTES + 1),
                          headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("body", [
    {"from_offset": 1, "from_time": "2026-01-01T00:00:00Z"}, {"from_offset": -1},
    {"from_offset": "5"}, {"verify": 0}, {"namespace": "elsewhere"},
    {"from_offset": 2**63},  # beyond Kafka's int64 offsets (the fuzzer's 1.6e20 got a 503)
])
def test_replay_requests_are_checked_strictly(body: dict) -> None:
    assert client(None).post("/replay", json=body).status_code == 422


def test_the_openapi_document_lists_every_operation_and_the_bearer_scheme() -> None:
    doc = client("tok").get("/openapi.json").json()
    assert set(doc["paths"]) == {
        "/tasks", "/tasks/{task_id}", "/tasks/{task_id}/lineage", "/tasks/{task_id}/events",
        "/tasks/{task_id}/reexecute", "/providers", "/breakers", "/budgets",
        "/metrics/summary", "/replay", "/health", "/breakers/{provider}", "/deadletters",
        "/deadletters/{event_id}/retry", "/report", "/jobs", "/jobs/{job_id}",
        "/jobs/{job_id}/report", "/escalations", "/escalations/{escalation_id}/resolve"}
    for write in ("/breakers/{provider}", "/deadletters/{event_id}/retry", "/jobs",
                  "/escalations/{escalation_id}/resolve"):
        assert doc["paths"][write]["post"]["security"] == [{"HTTPBearer": []}]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert doc["paths"]["/tasks"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in doc["paths"]["/tasks/{task_id}"]["get"]
    assert "text/event-stream" in doc["paths"]["/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"]
