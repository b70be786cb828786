"""Task kinds code / json / text (SPEC §3 TaskSubmitted, §4 validator "external validation"):
the wire fields and their per-kind rules, the exported JSON Schema, the json and text
validator levels, the learning reward of an unverified answer and the sim's json answers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import ValidationError

from agents import validation
from agents.analyzers import analyze_batch
from agents.learning import UNVERIFIED_PERFORMANCE, RewardStage, performance
from agents.providers.answers import AnswerBook
from agents.providers.base import ProviderRequest
from agents.providers.sim import SimProvider, SimProviderConfig, schema_instance
from agents.validation import (
    JSON_LEVELS,
    ValidationOutcome,
    ValidationRequest,
    ValidatorConfig,
    ValidatorToolError,
    validate_batch,
)
from agents.validator import ValidatorStage
from models.codec import CodecError, decode, describe_validation, encode, json_schemas, make_event
from models.events import (
    Envelope,
    RewardComputed,
    TaskExecuted,
    TaskSubmitted,
    TaskValidated,
)
from streams.config import Settings

PERSON = {
    "type": "object",
    "required": ["name", "age"],
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                   "address": {"type": "object"}},
}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def submitted(**fields_: Any) -> TaskSubmitted:
    return TaskSubmitted.model_validate({"task_id": "t1", "prompt": "p", **fields_})


def problem(**fields_: Any) -> str:
    """The message a task with these fields is refused with (direct validation)."""
    with pytest.raises(ValidationError) as info:
        submitted(**fields_)
    return describe_validation(info.value, limit=10)


def envelope(payload: dict[str, Any]) -> bytes:
    """A TaskSubmitted record as a foreign Kafka client would write it."""
    return orjson.dumps({"event_id": "e1", "event_type": "TaskSubmitted",
                         "occurred_at": "2026-01-01T00:00:00Z", "correlation_id": "t1",
                         "producer": "raw", "payload": {"task_id": "t1", "prompt": "p", **payload}})


# --------------------------------------------------------------------------- the wire


@pytest.mark.parametrize(("task", "message"), [
    ({"kind": "json"}, "field 'schema': required for kind json"),
    ({"kind": "json", "schema": {"type": "objekt"}},
     "field 'schema': not a valid JSON Schema (Draft 2020-12): at schema.type:"),
    ({"kind": "json", "schema": {"properties": {"id": {"pattern": "(unclosed"}}}},
     "field 'schema': not a valid JSON Schema (Draft 2020-12): at schema.properties.id.pattern:"),
    ({"kind": "json", "schema": PERSON, "expected": ["Ada"]},
     "field 'expected': for kind json an object of field values, got list"),
    ({"kind": "text", "expected": 42}, "field 'expected': for kind text a string, got int"),
    ({"kind": "text", "must_match": "(a"}, "field 'must_match': not a valid regular expression"),
    ({"kind": "json", "schema": PERSON, "must_match": "a"},
     "field 'must_match': only for kind text (kind is json)"),
    ({"kind": "code", "must_contain": ["a"]}, "field 'must_contain': only for kind text (kind is code)"),
    ({"kind": "text", "schema": PERSON}, "field 'schema': only for kind json (kind is text)"),
    ({"kind": "code", "expected": "3"}, "field 'expected': only for kinds json and text"),
    ({"kind": "code", "test": "def check(candidate):\n    assert candidate()\n"},
     "field 'entry_point': required for kind code with a test"),
])
def test_a_task_missing_what_its_kind_needs_is_refused_naming_the_field(
        task: dict[str, Any], message: str) -> None:
    assert message in problem(**task)
    # a raw client's record fails decoding with the same words: the dead letter's reason
    with pytest.raises(CodecError) as info:
        decode(envelope(task))
    assert info.value.kind == "schema"
    assert message in str(info.value)


def test_every_problem_of_a_task_is_named() -> None:
    message = problem(kind="code", schema=PERSON, must_match="x")
    assert "field 'schema': only for kind json" in message
    assert "field 'must_match': only for kind text" in message


@pytest.mark.parametrize(("task", "field_name"), [
    ({"kind": "text", "must_contain": []}, "must_contain"),
    ({"kind": "text", "must_contain": ["ok", ""]}, "must_contain.1"),
    ({"kind": "text", "max_cost_usd": -0.01}, "max_cost_usd"),
    ({"kind": "sql"}, "kind"),
])
def test_field_constraints_name_their_field(task: dict[str, Any], field_name: str) -> None:
    assert problem(**task).startswith(f"field '{field_name}'")


def test_tasks_of_each_kind_are_accepted() -> None:
    assert submitted(kind="code", entry_point="f", test="def check(c):\n    assert c()\n").kind == "code"
    assert submitted(kind="code").test is None  # no test: nothing to name
    t = submitted(kind="json", schema=PERSON, expected={"age": 36, "address.city": "London"},
                  max_cost_usd=0.5)
    assert (t.json_schema, t.expected, t.max_cost_usd) == (PERSON, {"age": 36, "address.city": "London"}, 0.5)
    t = submitted(kind="text", expected="Paris", must_match=r"\bParis\b", must_contain=["Par"])
    assert (t.expected, t.must_match, t.must_contain) == ("Paris", r"\bParis\b", ["Par"])
    assert submitted(kind="text").expected is None  # no check: valid, completes unverified


def test_schema_is_the_wire_name_of_json_schema() -> None:
    task = submitted(kind="json", schema=PERSON, expected={"age": 1})
    raw = orjson.loads(encode(make_event(task, producer="test", occurred_at=T0)))
    assert raw["payload"]["schema"] == PERSON
    assert "json_schema" not in raw["payload"]
    assert decode(orjson.dumps(raw)).payload == task
    # the Python name is accepted on input too (validate_by_name)
    assert TaskSubmitted(task_id="t1", kind="json", prompt="p", json_schema=PERSON) == \
        submitted(kind="json", schema=PERSON)
    executed = TaskExecuted(task_id="t1", state="s", action="a", candidates=[],
                            consensus_strategy="single", chosen=None, chosen_text=None,
                            agreement=0.0, cost_usd=0.0, tokens=0, kind="json",
                            json_schema=PERSON, expected={"age": 1})
    raw = orjson.loads(encode(make_event(executed, producer="test", occurred_at=T0)))
    assert raw["payload"]["schema"] == PERSON and raw["payload"]["expected"] == {"age": 1}
    assert decode(orjson.dumps(raw)).payload == executed


def test_exported_json_schema_shows_the_kinds_and_their_fields() -> None:
    schemas = json_schemas()
    task = schemas["TaskSubmitted"]["$defs"]["TaskSubmitted"]
    assert set(task["properties"]["kind"]["enum"]) == {"code", "json", "text"}
    assert {"schema", "expected", "must_match", "must_contain", "max_cost_usd"} <= set(task["properties"])
    assert "json_schema" not in task["properties"]
    executed = schemas["TaskExecuted"]["$defs"]["TaskExecuted"]
    assert {"schema", "expected", "must_match", "must_contain"} <= set(executed["properties"])
    assert set(executed["properties"]["kind"]["enum"]) == {"code", "json", "text"}
    assert "unverified" in schemas["TaskCompleted"]["$defs"]["TaskCompleted"]["properties"]["status"]["enum"]

    # a producer in another language can check a task against the export alone
    def record(payload: dict[str, Any]) -> dict[str, Any]:
        return orjson.loads(envelope(payload))

    jsonschema.validate(record({"kind": "json", "schema": PERSON, "expected": {"age": 1}}),
                        schemas["TaskSubmitted"])
    for bad in ({"kind": "json"}, {"kind": "json", "schema": PERSON, "expected": "36"},
                {"kind": "text", "expected": 1}, {"kind": "code", "test": "def check(c): pass"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(record(bad), schemas["TaskSubmitted"])


def test_old_events_without_the_new_fields_still_decode() -> None:
    validated = TaskValidated(task_id="t", levels=[], passed=True, tests_passed=0, tests_total=0,
                              duration_ms=0.0, state="s", action="a", provider="p", cost_usd=0.0,
                              tokens=0)
    reward = RewardComputed(task_id="t", state="s", action="a", next_state="s2", performance=1.0,
                            cost_usd=0.0, cost_weight=1.0, reward=1.0, passed=True, provider="p",
                            tokens=0)
    assert validated.verified and reward.verified and reward.completion_status == "passed"


# --------------------------------------------------------------------------- validator levels


def json_request(answer: str, schema: dict[str, Any] | None = PERSON, expected: Any = None,
                 key: str = "j") -> ValidationRequest:
    return ValidationRequest(key, answer, None, None, kind="json", json_schema=schema,
                             expected=expected)


def text_request(answer: str, key: str = "t", **checks: Any) -> ValidationRequest:
    return ValidationRequest(key, answer, None, None, kind="text", **checks)


def validate(*requests: ValidationRequest, timeout_s: float = 2.0) -> list[ValidationOutcome]:
    return asyncio.run(validate_batch(list(requests), ValidatorConfig(check_timeout_s=timeout_s)))


def verdict(outcome: ValidationOutcome) -> tuple[list[tuple[str, bool]], list[tuple[str, str]]]:
    return ([(lv.level, lv.passed) for lv in outcome.levels],
            [(f.category, f.error_type) for f in outcome.failures])


def test_json_answers_pass_bare_or_fenced() -> None:
    bare, fenced, plain_fence = validate(
        json_request('{"name": "Ada", "age": 36}', expected={"age": 36}),
        json_request('Here it is:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?'),
        json_request('```\n{"name": "Ada", "age": 36}\n```'),
    )
    assert verdict(bare) == ([("json", True), ("schema", True), ("expected", True)], [])
    assert bare.passed and bare.verified
    for outcome in (fenced, plain_fence):
        assert verdict(outcome) == ([("json", True), ("schema", True)], [])
        assert outcome.levels[0].details == "a JSON object in a fenced block"
    assert [lv.level for lv in bare.levels] == list(JSON_LEVELS)


@pytest.mark.parametrize("answer", ["Ada is 36.", '{"name": "Ada", "age": 36', "",
                                    '{"name": "Ada", "age": NaN}', "```json\n{oops}\n```"])
def test_an_answer_that_is_not_json_fails_the_json_level(answer: str) -> None:
    [outcome] = validate(json_request(answer))
    assert verdict(outcome) == ([("json", False)], [("SCHEMA", "JSONDecodeError")])
    assert not outcome.passed and outcome.verified


def test_schema_failures_name_the_failing_path() -> None:
    [outcome] = validate(json_request('{"name": 7, "age": -1, "address": []}'))
    assert verdict(outcome)[0] == [("json", True), ("schema", False)]
    messages = [f.message for f in outcome.failures]
    assert messages == ["at $.address: [] is not of type 'object'",
                        "at $.age: -1 is less than the minimum of 0",
                        "at $.name: 7 is not of type 'string'"]
    assert {f.category for f in outcome.failures} == {"SCHEMA"}
    assert outcome.levels[1].message == messages[0]  # the level carries its first failure
    [missing] = validate(json_request('{"name": "Ada"}'))
    assert missing.failures[0].message == "at $: 'age' is a required property"


def test_expected_fields_are_compared_as_json_values() -> None:
    answer = json.dumps({"name": "Ada", "age": 36, "ok": True,
                         "address": {"city": "London", "lines": ["1 Main St", "Flat 2"]}})
    [good] = validate(json_request(answer, expected={
        "age": 36.0, "ok": True, "address.city": "London", "address.lines.1": "Flat 2",
        "address": {"city": "London", "lines": ["1 Main St", "Flat 2"]}}))
    assert good.passed and good.levels[-1].details == "5/5 expected fields equal"
    [bad] = validate(json_request(answer, expected={
        "age": 37, "ok": 1, "address.city": "Paris", "address.zip": "N1", "name": "Ada"}))
    assert verdict(bad)[0] == [("json", True), ("schema", True), ("expected", False)]
    assert [(f.category, f.error_type, f.message) for f in bad.failures] == [
        ("SCHEMA", "UnexpectedValue", "at $.age: expected 37, got 36"),
        ("SCHEMA", "UnexpectedValue", "at $.ok: expected 1, got true"),  # true is not 1
        ("SCHEMA", "UnexpectedValue", 'at $.address.city: expected "Paris", got "London"'),
        ("SCHEMA", "MissingField", 'at $.address.zip: missing (expected "N1")'),
    ]
    assert bad.levels[-1].details == "1/5 expected fields equal"


def test_a_field_name_with_a_dot_is_looked_up_before_a_path() -> None:
    [outcome] = validate(json_request('{"a.b": 1, "a": {"b": 2}}', schema={"type": "object"},
                                      expected={"a.b": 1}))
    assert outcome.passed


def test_a_json_task_event_without_its_schema_fails_the_schema_level() -> None:
    [outcome] = validate(json_request('{"name": "Ada", "age": 36}', schema=None))
    assert verdict(outcome) == ([("json", True), ("schema", False)], [("SCHEMA", "MissingSchema")])
    assert "field 'schema'" in outcome.failures[0].message


def test_a_schema_ref_is_never_fetched() -> None:
    schema = {"properties": {"x": {"$ref": "https://example.invalid/x.json"}}}
    [outcome] = validate(json_request('{"x": 1}', schema=schema))
    assert verdict(outcome) == ([("json", True), ("schema", False)], [("SCHEMA", "SchemaError")])
    assert "https://example.invalid/x.json" in outcome.failures[0].message


def test_text_checks_pass() -> None:
    [outcome] = validate(text_request("The capital of  France\nis Paris.",
                                      expected=" The capital of France is Paris. ",
                                      must_match=r"\bParis\b", must_contain=["France is"]))
    assert verdict(outcome) == ([("text", True)], [])
    assert outcome.passed and outcome.verified
    assert outcome.levels[0].details == "3/3 checks passed"


def test_text_check_failures_are_logic_failures() -> None:
    [outcome] = validate(text_request("Lyon is in France.", expected="Paris",
                                      must_match="^Paris", must_contain=["France", "Paris"]))
    assert verdict(outcome) == ([("text", False)], [("LOGIC", "ExpectedMismatch"),
                                                    ("LOGIC", "NoMatch"), ("LOGIC", "MissingText")])
    assert outcome.levels[0].details == "1/4 checks passed"
    assert outcome.failures[2].message == 'must_contain "Paris": not in the answer'
    [case] = validate(text_request("paris", expected="Paris"))
    assert not case.passed  # case matters


def test_a_text_task_without_checks_is_unverified_never_passed() -> None:
    [outcome] = validate(text_request("Paris."))
    assert (outcome.passed, outcome.verified, outcome.levels, outcome.failures) == (False, False, [], [])


def test_a_backtracking_regex_times_out_without_stalling_the_batch() -> None:
    runaway = text_request("a" * 40 + "b", key="runaway", must_match=r"^(a+)+$")
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(a+)+$"}}}
    runaway_schema = json_request(json.dumps({"id": "a" * 40 + "b"}), schema=schema, key="rs")
    fine = text_request("abc", key="fine", must_match="b")
    fine_schema = json_request('{"id": "aaa"}', schema=schema, key="fs")
    in_process = json_request('{"name": "Ada", "age": 36}', key="ip")
    outcomes = validate(runaway, runaway_schema, fine, fine_schema, in_process, timeout_s=0.5)
    by_key = {o.key: o for o in outcomes}
    assert verdict(by_key["runaway"]) == ([("text", False)], [("TIMEOUT", "Timeout")])
    assert verdict(by_key["rs"]) == ([("json", True), ("schema", False)], [("TIMEOUT", "Timeout")])
    assert "0.5 s" in by_key["rs"].failures[0].message
    assert by_key["fine"].passed and by_key["fs"].passed and by_key["ip"].passed
    assert by_key["ip"].duration_ms < by_key["fine"].duration_ms  # no child process for it


def test_a_checker_that_cannot_run_is_a_tool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "_CHECKER", "import sys; sys.stderr.write('broken'); sys.exit(3)")
    with pytest.raises(ValidatorToolError, match="status 3 after 0/1 jobs: broken"):
        validate(text_request("abc", must_match="b"))


# --------------------------------------------------------------------------- the stage


class RecordingTx:
    """What a stage emits (the runner's Tx queues the same calls)."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, Envelope]] = []

    def emit(self, role: str, event: Envelope, key: str | None = None) -> None:
        self.emitted.append((role, event))


def executed(task_id: str, answer: str, **task: Any) -> Envelope:
    payload = TaskExecuted(task_id=task_id, state="none|text|low", action="p:single",
                           candidates=[], consensus_strategy="single", chosen="p",
                           chosen_text=answer, agreement=1.0, cost_usd=0.001, tokens=10, **task)
    return make_event(payload, producer="executor", correlation_id=task_id, occurred_at=T0)


def test_validator_stage_emits_verdicts_and_categorised_errors() -> None:
    events = [
        executed("j-ok", '{"name": "Ada", "age": 36}', kind="json", json_schema=PERSON,
                 expected={"age": 36}),
        executed("j-bad", '{"name": "Ada", "age": "old"}', kind="json", json_schema=PERSON),
        executed("t-bad", "Lyon", kind="text", must_contain=["Paris"]),
        executed("t-none", "Paris", kind="text"),
    ]
    tx = RecordingTx()
    asyncio.run(ValidatorStage(Settings()).process(events, tx))  # type: ignore[arg-type]
    validated = {e.payload.task_id: e.payload for role, e in tx.emitted if role == "validations"}
    errors = {e.payload.task_id: e.payload for role, e in tx.emitted if role == "errors"}
    assert {t: (v.passed, v.verified) for t, v in validated.items()} == {
        "j-ok": (True, True), "j-bad": (False, True), "t-bad": (False, True), "t-none": (False, False)}
    assert set(errors) == {"j-bad", "t-bad"}  # unverified is not an error
    assert (errors["j-bad"].category, errors["j-bad"].message) == (
        "SCHEMA", "at $.age: 'old' is not of type 'integer'")
    assert (errors["t-bad"].category, errors["t-bad"].error_type) == ("LOGIC", "MissingText")


# --------------------------------------------------------------------------- learning


def validated_event(passed: bool, verified: bool, cost_usd: float = 0.002) -> Envelope:
    payload = TaskValidated(task_id="t", levels=[], passed=passed, tests_passed=0, tests_total=0,
                            duration_ms=1.0, state="none|text|low", action="p:single",
                            provider="p", cost_usd=cost_usd, tokens=10, verified=verified)
    return make_event(payload, producer="validator", correlation_id="t", occurred_at=T0)


@pytest.mark.parametrize(("passed", "verified", "perf", "status"), [
    (True, True, 1.0, "passed"),
    (False, True, 0.0, "failed"),
    (False, False, UNVERIFIED_PERFORMANCE, "unverified"),
])
def test_an_unverified_answer_is_rewarded_as_neither_pass_nor_failure(
        passed: bool, verified: bool, perf: float, status: str) -> None:
    event = validated_event(passed, verified)
    assert performance(event.payload) == perf
    tx = RecordingTx()
    stage = RewardStage(Settings(cost_weight=10.0))
    asyncio.run(stage.handle(event, tx))  # type: ignore[arg-type]
    [(role, reward)] = tx.emitted
    r: RewardComputed = reward.payload
    assert role == "rewards"
    assert (r.performance, r.passed, r.verified, r.completion_status) == (perf, passed, verified, status)
    assert r.reward == pytest.approx(perf - 0.002 * 10.0)
    # deterministic from the event: the same input gives the same reward and id (a re-run)
    again = RecordingTx()
    asyncio.run(stage.handle(event, again))  # type: ignore[arg-type]
    assert (again.emitted[0][1].event_id, again.emitted[0][1].payload) == (reward.event_id, r)
    assert 0.0 < UNVERIFIED_PERFORMANCE < 1.0


# --------------------------------------------------------------------------- analyzers, sim


def test_json_and_text_tasks_get_routing_features() -> None:
    tasks = [submitted(kind="json", schema=PERSON, prompt="Describe Ada Lovelace as JSON."),
             submitted(kind="text", prompt="What is the capital of France?")]
    for analyzed in asyncio.run(analyze_batch(tasks)):
        assert analyzed.features.task_type and analyzed.features.complexity


def json_request_for(task_id: str, schema: dict[str, Any] | None = PERSON,
                     prompt: str = "Describe a person as JSON.") -> ProviderRequest:
    return ProviderRequest(task_id=task_id, prompt=prompt, kind="json", entry_point=None,
                           task_type="text", json_schema=schema)


def sim(accuracy: float, **extra: Any) -> SimProvider:
    config = SimProviderConfig(id="s", model="grok-4", accuracy=accuracy, **extra)
    return SimProvider(config, answers=AnswerBook())


async def answers(provider: SimProvider, requests: list[ProviderRequest]) -> list[str]:
    return [(await provider.complete(r)).text for r in requests]


def test_the_request_never_carries_the_expected_answer() -> None:
    assert not {"expected", "must_match", "must_contain"} & {f.name for f in fields(ProviderRequest)}


def test_schema_instance_satisfies_common_schemas() -> None:
    schema = {"type": "object", "required": ["name", "age", "tags", "when", "kind", "score", "pet"],
              "properties": {"name": {"type": "string", "minLength": 2},
                             "age": {"type": "integer", "minimum": 18, "maximum": 99},
                             "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                             "when": {"type": "string", "format": "date"},
                             "kind": {"enum": ["cat", "dog"]},
                             "score": {"type": "number", "exclusiveMinimum": 0.5},
                             "pet": {"anyOf": [{"type": "null"}, {"type": "string"}]}}}
    instance = schema_instance(schema)
    assert instance == {"name": "xx", "age": 18, "tags": ["", ""], "when": "2024-01-01",
                        "kind": "cat", "score": 1, "pet": None}
    checker = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert list(checker.iter_errors(instance)) == []
    assert schema_instance(None) == {}


def test_sim_json_answers_are_deterministic_and_wrong_in_the_accuracy_share() -> None:
    requests = [json_request_for(f"t{i}") for i in range(200)]
    right = json.dumps(schema_instance(PERSON))
    oracle = asyncio.run(answers(sim(1.0), requests))
    assert set(oracle) == {right}
    mixed = asyncio.run(answers(sim(0.7), requests))
    assert mixed == asyncio.run(answers(sim(0.7), requests))  # same request, same answer
    share_right = sum(a == right for a in mixed) / len(mixed)
    assert 0.6 < share_right < 0.8
    # raising accuracy only turns wrong answers into right ones (one draw per request)
    better = asyncio.run(answers(sim(0.9), requests))
    assert all(b == right for a, b in zip(mixed, better) if a == right)
    # every wrong answer is caught by the validator: not JSON, or the schema fails
    wrong = [a for a in mixed if a != right]
    outcomes = validate(*(json_request(a, key=str(i)) for i, a in enumerate(wrong)))
    caught = {o.levels[-1].level for o in outcomes if not o.passed}
    assert caught <= {"json", "schema"}
    # a changed value may still satisfy the schema: only expected values could catch those
    assert sum(not o.passed for o in outcomes) >= len(wrong) // 2


def test_sim_json_answers_come_from_its_reference_file(tmp_path: Path) -> None:
    prompt = "Describe Ada Lovelace as JSON."
    references = tmp_path / "refs.jsonl"
    references.write_text(json.dumps({"prompt": prompt,
                                      "solution": '{"name": "Ada", "age": 36}\n'}) + "\n")
    provider = sim(1.0, reference_file=references)
    [text] = asyncio.run(answers(provider, [json_request_for("ada", prompt=prompt)]))
    assert text == '{"name": "Ada", "age": 36}'
    [outcome] = validate(json_request(text, expected={"name": "Ada", "age": 36}))
    assert outcome.passed
    # without a schema on the request and without a reference, an empty object
    [bare] = asyncio.run(answers(sim(1.0), [json_request_for("x", schema=None)]))
    assert bare == "{}"


KIND_CASES = [
    {"kind": "code", "schema": {"type": "object"}},
    {"kind": "code", "test": "def check(c): pass"},
    {"kind": "code", "test": "def check(c): pass", "entry_point": ""},
    {"kind": "code", "test": "def check(c): pass", "entry_point": "f"},
    {"kind": "code", "expected": 1},
    {"kind": "code", "must_match": "a"},
    {"kind": "code", "schema": None},
    {"kind": "json"},
    {"kind": "json", "schema": {"type": "object"}},
    {"kind": "json", "schema": {"type": "object"}, "expected": "x"},
    {"kind": "json", "schema": {"type": "object"}, "expected": {"a": 1}},
    {"kind": "json", "schema": {"type": "object"}, "must_contain": ["a"]},
    {"kind": "text", "schema": {"type": "object"}},
    {"kind": "text", "expected": {"a": 1}},
    {"kind": "text", "expected": "a", "must_match": "^a$", "must_contain": ["a"]},
]


@pytest.mark.parametrize("fields", KIND_CASES, ids=lambda f: json.dumps(f, sort_keys=True))
def test_the_exported_json_schema_accepts_exactly_what_the_model_accepts(fields: dict) -> None:
    # producers in other languages (and the API fuzzer) rely on `rmo schema` telling the truth
    body = {"task_id": "t", "prompt": "p", **fields}
    schema = TaskSubmitted.model_json_schema()  # the payload part of `rmo schema`
    by_schema = not list(jsonschema.Draft202012Validator(schema).iter_errors(body))
    try:
        TaskSubmitted.model_validate(body)
        by_model = True
    except ValidationError:
        by_model = False
    assert by_schema == by_model
