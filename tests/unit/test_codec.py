"""models/codec.py + models/events.py: the wire contract (SPEC §3)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from models.catalogue import EVENT_TYPES, PAYLOADS
from models.codec import (
    MAX_VALUE_BYTES,
    CodecError,
    decode,
    derive_event_id,
    encode,
    json_schemas,
    make_event,
)
from models.events import (
    AnalyzerResult,
    BreakerCommand,
    BreakerTransitioned,
    BudgetExceeded,
    Candidate,
    DeadLettered,
    ErrorLogged,
    FallbackSelected,
    MetricsSnapshot,
    PatternDetected,
    ProtocolRuleApplied,
    ProtocolRuleProposed,
    ProtocolRuleRejected,
    ProtocolRuleRolledBack,
    ProviderCallCompleted,
    ProviderCallFailed,
    ProviderSelected,
    ReserveGranted,
    RewardComputed,
    RuleEvidence,
    StageStalled,
    TaskAnalyzed,
    TaskCompleted,
    TaskExecuted,
    TaskFeatures,
    TaskSubmitted,
    TaskValidated,
    ValidationLevel,
)
from models.jobs import (
    EscalationRaised,
    EscalationResolved,
    JobCompleted,
    JobDeadlinePassed,
    JobPlanned,
    JobSubmitted,
    MasterActivated,
    SubtaskCompleted,
    SubtaskSpec,
    WorkAssigned,
)

T0 = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


def _submitted(**over: object) -> TaskSubmitted:
    fields: dict[str, object] = {
        "task_id": "HumanEval/0", "kind": "code", "prompt": "def add(a, b):\n",
        "entry_point": "add", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "priority": 2, "budget_tokens": 4000,
        "metadata": {"source": "humaneval", "n": [1, 2.5, None]},
    }
    fields.update(over)
    return TaskSubmitted(**fields)  # type: ignore[arg-type]


def _payloads() -> dict[str, object]:
    """One valid, non-trivial instance of every payload type."""
    return {
        "TaskSubmitted": _submitted(),
        "FallbackSelected": FallbackSelected(
            task_id="t1", action="openai:single", from_providers=["openai"], to_provider="claude",
            reason="openai: rate_limited, server_error, rate_limited", attempt=1,
        ),
        "TaskAnalyzed": TaskAnalyzed(
            task_id="t1",
            analyses=[AnalyzerResult(name="complexity", confidence=0.8, issues=["long"],
                                     recommendations=["split"], action_items=["a1"],
                                     features={"loc": 12})],
            features=TaskFeatures(task_type="code_generation", complexity="medium"),
            action_items=["a1", "a2"],
            task=_submitted(task_id="t1"),
        ),
        "ProviderSelected": ProviderSelected(
            task_id="t1", state="none|code_generation|medium", action="openai+claude:vote",
            providers=["openai", "claude"], strategy="vote", policy="epsilon-greedy",
            epsilon=0.97, explored=True, action_probabilities={"a": 0.515, "b": 0.485},
            q_values={"a": 0.1, "b": -0.25}, skipped_open=["gemini"],
        ),
        "ProviderCallCompleted": ProviderCallCompleted(
            task_id="t1", provider="openai", model="gpt-4o-mini", attempt=1, latency_ms=123.4,
            input_tokens=100, output_tokens=50, cost_usd=0.000123, response_text="return a + b",
        ),
        "ProviderCallFailed": ProviderCallFailed(
            task_id="t1", provider="claude", model="claude-3-haiku", attempt=0, latency_ms=5.0,
            input_tokens=0, output_tokens=0, cost_usd=0.0, error_type="RateLimited",
            http_status=429, retry_after_s=1.5, message="slow down",
        ),
        "BreakerTransitioned": BreakerTransitioned(
            provider="openai", from_state="closed", to_state="open",
            reason="5 consecutive failures", failures=5, successes=0,
        ),
        "BreakerCommand": BreakerCommand(provider="openai", command="close", reason="key rotated",
                                         operator="ops"),
        "StageStalled": StageStalled(
            kind="consumer", worker="host:4242", stalled_ms=61_000.0, threshold_ms=60_000.0,
            stage="executor", topic="rmo.analyses", partition=2, lag=17, tasks=42,
            stack='File "agents/executor.py", line 300, in _execute',
        ),
        "TaskExecuted": TaskExecuted(
            task_id="t1", state="s", action="a",
            candidates=[Candidate(provider="openai", text="x"),
                        Candidate(provider="claude", text="y")],
            consensus_strategy="vote", chosen="openai", chosen_text="x", agreement=0.5,
            cost_usd=0.01, tokens=300, kind="code", entry_point="add", test="def check(c): pass",
            prompt="p", time_limit_ms=2500.0,
        ),
        "TaskValidated": TaskValidated(
            task_id="t1", levels=[ValidationLevel(level="syntax", passed=True),
                                  ValidationLevel(level="tests", passed=False, details="1/3")],
            passed=False, tests_passed=1, tests_total=3, duration_ms=12.5, state="s", action="a",
            provider="openai", cost_usd=0.01, tokens=300,
        ),
        "ErrorLogged": ErrorLogged(
            category="RUNTIME", error_type="ZeroDivisionError", message="division by zero",
            agent_id="validator", task_id="t1", context={"line": 3},
        ),
        "RewardComputed": RewardComputed(
            task_id="t1", state="s", action="a", next_state="openai|code_generation|medium",
            performance=0.5, cost_usd=0.01, cost_weight=10.0, reward=0.4, passed=False,
            provider="openai", tokens=300,
        ),
        # the learning subsystem's events (agents/patterns.py, agents/rules.py)
        "PatternDetected": PatternDetected(
            pattern="SYNTAX|*|string|*|gemini", category="SYNTAX", error_type="*",
            task_type="string", complexity="*", provider="gemini", occurrences=4,
            opportunities=4, confidence=0.8, events=5, truncated=3, first_seen=T0, last_seen=T0,
        ),
        **{name: model(rule_id="avoid_provider:string:gemini", kind="avoid_provider",
                       params={"task_type": "string", "provider": "gemini"},
                       pattern="SYNTAX|*|string|*|gemini", reason=name,
                       evidence=RuleEvidence(confidence=0.8, before_tasks=20, before_failed=4,
                                             measured_effect=-0.25))
           for name, model in (("ProtocolRuleProposed", ProtocolRuleProposed),
                               ("ProtocolRuleApplied", ProtocolRuleApplied),
                               ("ProtocolRuleRejected", ProtocolRuleRejected),
                               ("ProtocolRuleRolledBack", ProtocolRuleRolledBack))},
        "BudgetExceeded": BudgetExceeded(
            task_id="t1", provider="claude", line="global/all/total", priority=3,
            reserve_denied=True, worst_microusd=77_000, worst_tokens=1500,
        ),
        "ReserveGranted": ReserveGranted(
            task_id="t1", provider="grok", priority=5, worst_microusd=16_000, worst_tokens=1500,
        ),
        "TaskCompleted": TaskCompleted(
            task_id="t1", status="passed", result="return a + b", provider="openai", action="a",
            cost_usd=0.01, tokens=300, latency_ms=800.0, attempts=2,
        ),
        "MetricsSnapshot": MetricsSnapshot(
            window_start=T0, window_end=T0 + timedelta(seconds=5), counters={"tasks": 3},
            gauges={"q.updates": 7.0}, histograms={"provider:openai:latency_ms": {"p50": 1.0}},
        ),
        "DeadLettered": DeadLettered(
            reason="not_json: bad", error_type="not_json", stage="analyzer", source_topic="tasks",
            source_partition=2, source_offset=41, original_key_b64=None,
            original_value_b64="e30=",
        ),
        # Cortex jobs (models/jobs.py)
        **_job_payloads(),
    }


def _job_payloads() -> dict[str, object]:
    spec = SubtaskSpec(id="a", domain="development", kind="text", prompt="p", depends_on=[])
    return {
        "JobSubmitted": JobSubmitted(job_id="j1", subtasks=[spec], budget_tokens=1000, reserve_tokens=100),
        "JobDeadlinePassed": JobDeadlinePassed(job_id="j1", deadline=T0),
        "JobPlanned": JobPlanned(job_id="j1", subtasks=[spec], planner="openai", attempt=2),
        "MasterActivated": MasterActivated(job_id="j1", domain="development", subtasks=1, tokens=900,
                                           personal_tokens=558, workers_tokens=342),
        "WorkAssigned": WorkAssigned(job_id="j1", domain="development", subtask_id="a", task_id="j1.a",
                                     budget_tokens=900, from_reserve_tokens=10),
        "SubtaskCompleted": SubtaskCompleted(job_id="j1", subtask_id="a", task_id="j1.a",
                                             status="passed", answer="x", tokens=120),
        "EscalationRaised": EscalationRaised(escalation_id="j1/a", job_id="j1", subtask_id="a",
                                             domain="development", reason="subtask_failed",
                                             detail="task j1.a ended failed"),
        "EscalationResolved": EscalationResolved(escalation_id="j1/a", job_id="j1", subtask_id="a",
                                                 answer="by hand"),
        "JobCompleted": JobCompleted(job_id="j1", status="completed", tokens_used=120,
                                     artefacts={"a": "x"}),
    }


PAYLOAD_INSTANCES = _payloads()


def _envelope(payload: object, **over: object):
    kw: dict[str, object] = {"producer": "test", "occurred_at": T0, "event_id": "e-1"}
    kw.update(over)
    return make_event(payload, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- roundtrip


def test_every_event_type_has_a_sample() -> None:
    assert set(PAYLOAD_INSTANCES) == set(PAYLOADS) == set(EVENT_TYPES)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_encode_decode_roundtrip(name: str) -> None:
    event = _envelope(PAYLOAD_INSTANCES[name], correlation_id="corr-1")
    data = encode(event)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is EVENT_TYPES[name]
    assert back.event_type == name
    assert type(back.payload) is PAYLOADS[name]
    assert back == event
    # re-encoding the decoded event yields the very same bytes
    assert encode(back) == data


def test_encoded_record_is_plain_json_with_utc_timestamp() -> None:
    event = _envelope(PAYLOAD_INSTANCES["TaskSubmitted"])
    raw = json.loads(encode(event))
    assert raw["event_type"] == "TaskSubmitted"
    assert raw["payload"]["task_id"] == "HumanEval/0"
    assert datetime.fromisoformat(raw["occurred_at"]) == T0


def test_record_written_by_a_foreign_kafka_client_decodes() -> None:
    record = {
        "event_id": "0b8f5c1e-ext",
        "event_type": "TaskSubmitted",
        "occurred_at": "2024-05-01T12:30:15.5Z",
        "correlation_id": "HumanEval/7",
        "producer": "java-client",
        "payload": {
            "task_id": "HumanEval/7",
            "kind": "code",
            "prompt": "def f(x):\n",
            "entry_point": "f",
            "test": "def check(candidate):\n    assert candidate(1) == 1\n",
        },
    }
    event = decode(json.dumps(record).encode())
    assert isinstance(event, EVENT_TYPES["TaskSubmitted"])
    assert event.occurred_at == datetime(2024, 5, 1, 12, 30, 15, 500000, tzinfo=UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.causation_id is None
    assert event.schema_version == 1
    p = event.payload
    assert isinstance(p, TaskSubmitted)
    assert (p.task_id, p.kind, p.entry_point) == ("HumanEval/7", "code", "f")
    assert p.priority == 3 and p.budget_tokens is None and p.metadata == {}


def test_non_utc_offset_is_preserved_as_the_same_instant() -> None:
    raw = orjson.loads(encode(_envelope(PAYLOAD_INSTANCES["TaskSubmitted"])))
    raw["occurred_at"] = "2024-05-01T14:30:15.123456+02:00"
    event = decode(orjson.dumps(raw))
    assert event.occurred_at == T0
    assert event.occurred_at.utcoffset() == timedelta(hours=2)


# --------------------------------------------------------------------------- errors


def _valid_raw() -> dict:
    return orjson.loads(encode(_envelope(PAYLOAD_INSTANCES["TaskSubmitted"])))


def _kind(value: bytes | None) -> str:
    with pytest.raises(CodecError) as info:
        decode(value)
    assert str(info.value).startswith(info.value.kind + ":")
    assert isinstance(info.value, ValueError)
    return info.value.kind


@pytest.mark.parametrize("value", [None, b"", b"{", b"\xff\xfe", b"not json", b'{"a": 1,}'])
def test_not_json(value: bytes | None) -> None:
    assert _kind(value) == "not_json"


@pytest.mark.parametrize("value", [b"[]", b'[{"event_type": "TaskSubmitted"}]', b"42", b'"x"',
                                   b"null", b"true"])
def test_not_object(value: bytes) -> None:
    assert _kind(value) == "not_object"


@pytest.mark.parametrize("event_type", ["TaskSubmittedd", "tasksubmitted", "", "Envelope",
                                        "Frozen", 7, None])
def test_unknown_event_type(event_type: object) -> None:
    raw = _valid_raw()
    raw["event_type"] = event_type
    assert _kind(orjson.dumps(raw)) == "unknown_event_type"


def test_missing_event_type_is_unknown() -> None:
    raw = _valid_raw()
    del raw["event_type"]
    assert _kind(orjson.dumps(raw)) == "unknown_event_type"


@pytest.mark.parametrize("event_type", [[], ["TaskSubmitted"], {"a": 1}])
def test_unhashable_event_type_is_a_codec_error(event_type: object) -> None:
    raw = _valid_raw()
    raw["event_type"] = event_type
    assert _kind(orjson.dumps(raw)) in {"unknown_event_type", "schema"}


def _schema_error(mutate) -> str:
    raw = _valid_raw()
    mutate(raw)
    return _kind(orjson.dumps(raw))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: r["payload"].__setitem__("priority", 11), id="priority-11"),
        pytest.param(lambda r: r["payload"].__setitem__("priority", 0), id="priority-0"),
        pytest.param(lambda r: r["payload"].pop("prompt"), id="missing-prompt"),
        pytest.param(lambda r: r["payload"].__setitem__("colour", "red"), id="extra-payload-field"),
        pytest.param(lambda r: r.__setitem__("extra", 1), id="extra-envelope-field"),
        pytest.param(lambda r: r["payload"].__setitem__("kind", "image"), id="bad-kind"),
        pytest.param(lambda r: r["payload"].__setitem__("task_id", ""), id="empty-task-id"),
        pytest.param(lambda r: r["payload"].__setitem__("budget_tokens", 0), id="budget-0"),
        pytest.param(lambda r: r.__setitem__("event_id", ""), id="empty-event-id"),
        pytest.param(lambda r: r.pop("occurred_at"), id="missing-occurred-at"),
        pytest.param(lambda r: r.__setitem__("occurred_at", "yesterday"), id="bad-occurred-at"),
        pytest.param(lambda r: r.pop("payload"), id="missing-payload"),
        pytest.param(lambda r: r.__setitem__("payload", "x"), id="payload-not-object"),
        pytest.param(lambda r: r.__setitem__("event_type", "TaskCompleted"),
                     id="payload-of-other-type"),
    ],
)
def test_schema_errors(mutate) -> None:
    assert _schema_error(mutate) == "schema"


def test_schema_error_message_names_the_field() -> None:
    raw = _valid_raw()
    raw["payload"]["priority"] = 11
    with pytest.raises(CodecError) as info:
        decode(orjson.dumps(raw))
    assert "priority" in str(info.value)


def test_oversized_is_rejected_before_parsing() -> None:
    assert _kind(b"x" * (MAX_VALUE_BYTES + 1)) == "oversized"
    # even a structurally valid record is oversized once past the limit
    raw = _valid_raw()
    raw["payload"]["prompt"] = "p" * MAX_VALUE_BYTES
    assert _kind(orjson.dumps(raw)) == "oversized"


def test_record_of_exactly_the_limit_decodes() -> None:
    raw = _valid_raw()
    raw["payload"]["prompt"] = ""
    base = len(orjson.dumps(raw))
    raw["payload"]["prompt"] = "p" * (MAX_VALUE_BYTES - base)
    data = orjson.dumps(raw)
    assert len(data) == MAX_VALUE_BYTES
    assert decode(data).payload.prompt == "p" * (MAX_VALUE_BYTES - base)
    assert _kind(orjson.dumps({**raw, "payload": {**raw["payload"],
                                                  "prompt": raw["payload"]["prompt"] + "p"}})) \
        == "oversized"


# --------------------------------------------------------------------------- immutability


def test_envelope_and_payload_are_frozen() -> None:
    event = _envelope(PAYLOAD_INSTANCES["TaskSubmitted"])
    with pytest.raises(ValidationError):
        event.event_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        event.payload.prompt = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        PAYLOAD_INSTANCES["TaskValidated"].passed = True  # type: ignore[misc,union-attr]
    assert event.event_id == "e-1"
    assert event.payload.prompt == "def add(a, b):\n"


def test_models_reject_unknown_fields_on_construction() -> None:
    with pytest.raises(ValidationError):
        TaskSubmitted(task_id="t", kind="code", prompt="p", colour="red")  # type: ignore[call-arg]


# --------------------------------------------------------------------------- ids


def test_derive_event_id_is_deterministic_hex() -> None:
    a = derive_event_id("cause-1", "executor", 2, "openai")
    assert a == derive_event_id("cause-1", "executor", 2, "openai")
    assert len(a) == 32
    int(a, 16)


@pytest.mark.parametrize(
    "other",
    [
        ("cause-2", "executor", 2, "openai"),
        ("cause-1", "validator", 2, "openai"),
        ("cause-1", "executor", 3, "openai"),
        ("cause-1", "executor", 2, "claude"),
        ("cause-1", "executor", 2, ""),
    ],
)
def test_derive_event_id_differs_when_any_input_differs(other: tuple) -> None:
    assert derive_event_id("cause-1", "executor", 2, "openai") != derive_event_id(*other)


def test_derive_event_id_defaults() -> None:
    assert derive_event_id("c", "p") == derive_event_id("c", "p", 0, "")
    assert derive_event_id("c", "p") != derive_event_id("c", "p", 1)


def test_make_event_with_cause_inherits_correlation_and_sets_causation() -> None:
    root = make_event(PAYLOAD_INSTANCES["TaskSubmitted"], producer="cli", occurred_at=T0)
    child = make_event(PAYLOAD_INSTANCES["TaskAnalyzed"], producer="analyzer", cause=root,
                       attempt=1, discriminator="d")
    assert child.causation_id == root.event_id
    assert child.correlation_id == root.correlation_id == "HumanEval/0"
    assert child.event_id == derive_event_id(root.event_id, "analyzer", 1, "d")
    assert child.producer == "analyzer"
    assert child.event_type == "TaskAnalyzed"
    # re-processing the same cause reproduces the same id
    again = make_event(PAYLOAD_INSTANCES["TaskAnalyzed"], producer="analyzer", cause=root,
                       attempt=1, discriminator="d")
    assert again.event_id == child.event_id
    # grandchildren keep the root's correlation id even when the payload's task id differs
    grandchild = make_event(PAYLOAD_INSTANCES["BreakerTransitioned"], producer="breaker",
                            cause=child)
    assert grandchild.correlation_id == "HumanEval/0"
    assert grandchild.causation_id == child.event_id


def test_make_event_explicit_overrides_win_over_cause() -> None:
    root = make_event(PAYLOAD_INSTANCES["TaskSubmitted"], producer="cli")
    child = make_event(PAYLOAD_INSTANCES["TaskCompleted"], producer="x", cause=root,
                       correlation_id="corr-x", event_id="id-x", occurred_at=T0)
    assert (child.event_id, child.correlation_id, child.occurred_at) == ("id-x", "corr-x", T0)
    assert child.causation_id == root.event_id


def test_make_event_root_ids() -> None:
    a = make_event(PAYLOAD_INSTANCES["TaskSubmitted"], producer="cli")
    b = make_event(PAYLOAD_INSTANCES["TaskSubmitted"], producer="cli")
    assert a.event_id != b.event_id
    assert a.causation_id is None
    assert a.correlation_id == "HumanEval/0"  # the task id
    assert a.occurred_at.utcoffset() == timedelta(0)
    # without a task id the root's correlation id is its own event id
    c = make_event(PAYLOAD_INSTANCES["BreakerTransitioned"], producer="breaker")
    assert c.correlation_id == c.event_id


def test_make_event_rejects_non_payload_models() -> None:
    with pytest.raises(TypeError):
        make_event(Candidate(provider="p", text="t"), producer="x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- schemas


def test_json_schemas_has_one_schema_per_event_type() -> None:
    schemas = json_schemas()
    assert set(schemas) == set(EVENT_TYPES)
    for name, schema in schemas.items():
        assert schema["properties"]["event_type"]["const"] == name
        assert {"event_id", "event_type", "occurred_at", "payload"} <= set(schema["required"])
        json.dumps(schema)  # serializable as-is


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_samples_validate_against_exported_schema(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schemas()[name]
    instance = json.loads(encode(_envelope(PAYLOAD_INSTANCES[name])))
    jsonschema.validate(instance, schema)
    bad = dict(instance, event_type="Nope")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
