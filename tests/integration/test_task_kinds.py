"""Task kinds end to end (SPEC §3 TaskSubmitted kinds, §4 validator "external validation"):
json tasks pass or fail by their schema and expected values, text tasks by their checks, a
text task without checks completes ``unverified``, a json task without its schema is
dead-lettered naming the field, and `rmo replay --verify` finds no difference afterwards.

Real Tansu broker, real Redis, a real worker process answered by a sim provider whose
``reference_file`` holds the json answers, so every verdict is known in advance.

Three runs, so that a failure says which part of the pipeline is at fault:
- from TaskSubmitted through every stage (needs the executor to carry the task's kind
  fields onto TaskExecuted);
- from TaskExecuted written by a raw client: the validator and learning stages alone;
- a raw client's json task without a schema: dead-lettered, the task ``dead_lettered``.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from agents.learning import UNVERIFIED_PERFORMANCE
from models.codec import make_event
from models.events import Envelope, TaskExecuted, TaskSubmitted
from streams.config import Settings
from streams.keys import Keys
from streams.pipeline import wait_caught_up
from streams.projections import task_status
from streams.topics import TopicRegistry
from tests.integration.helpers import (
    cli_env,
    events,
    eventually,
    providers_file,
    rmo,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration

PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}
# json prompts -> the document the sim answers with (accuracy 1.0: always its reference)
REFERENCES = {
    "Describe Ada Lovelace as a JSON object.": '{"name": "Ada", "age": 36}',
    "Describe Bob as a JSON object.": '{"name": "Bob", "age": "old"}',
    "Describe Cy as a JSON object.": '{"name": "Cy", "age": 40}',
}
TEXT_PROMPT = "Name the capital of France. Reply in one sentence."
# what the sim answers a text prompt with: its first sentence, restated
TEXT_ANSWER = "Answer: Name the capital of France"


def oracle_with_references(tmp_path: Path) -> Path:
    refs = tmp_path / "json-references.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "solution": s}) + "\n"
                            for p, s in REFERENCES.items()))
    return providers_file(tmp_path, "providers:\n" + sim("oracle", accuracy=1.0)
                          + f"    reference_file: {refs}\n")


def kinds_tasks() -> list[TaskSubmitted]:
    ada, bob, cy = REFERENCES
    return [
        TaskSubmitted(task_id="json-pass", kind="json", prompt=ada, json_schema=PERSON,
                      expected={"name": "Ada", "age": 36}),
        TaskSubmitted(task_id="json-schema-fail", kind="json", prompt=bob, json_schema=PERSON),
        TaskSubmitted(task_id="json-expected-fail", kind="json", prompt=cy, json_schema=PERSON,
                      expected={"age": 41}),
        # no reference: the sim builds the document from the schema ({"name": "", "age": 0})
        TaskSubmitted(task_id="json-from-schema", kind="json",
                      prompt="Describe anyone as a JSON object.", json_schema=PERSON),
        TaskSubmitted(task_id="text-pass", kind="text", prompt=TEXT_PROMPT,
                      must_contain=["capital of France"], must_match=r"^Answer: "),
        TaskSubmitted(task_id="text-fail", kind="text", prompt=TEXT_PROMPT, must_contain=["Paris"]),
        TaskSubmitted(task_id="text-unchecked", kind="text", prompt=TEXT_PROMPT),
    ]


EXPECTED_STATUS = {"json-pass": "passed", "json-schema-fail": "failed",
                   "json-expected-fail": "failed", "json-from-schema": "passed",
                   "text-pass": "passed", "text-fail": "failed", "text-unchecked": "unverified"}


async def statuses(s: Settings, ids: set[str]) -> dict[str, str]:
    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        return {t: task_status(await redis.hgetall(Keys(s.namespace).task(t))) for t in ids}
    finally:
        await redis.aclose()


async def assert_caught_up(s: Settings, registry: TopicRegistry) -> None:
    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        assert await wait_caught_up(s, registry, redis, timeout_s=60)
    finally:
        await redis.aclose()


async def assert_replay_verifies(s: Settings) -> None:
    """`rmo replay --verify` into a fresh namespace: no difference with the live one."""
    target = f"{s.namespace}-r{secrets.token_hex(3)}"
    env = cli_env(s, RMO_PROVIDERS_FILE=str(s.providers_file))
    try:
        out = rmo("replay", "--verify", "--namespace", target, "--json", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        report = orjson.loads(out.stdout)
        assert report["verified"] is True and report["differences"] == [] and report["events"] > 0
    finally:
        redis = Redis.from_url(s.redis_url)
        async for key in redis.scan_iter(Keys(target).pattern(), count=1000):
            await redis.delete(key)
        await redis.aclose()


async def assert_verdicts(s: Settings, registry: TopicRegistry, done: dict[str, Envelope]) -> None:
    """What the validations, errors and rewards topics and `rmo status` say of the tasks
    of :func:`kinds_tasks` (or their TaskExecuted stand-ins)."""
    assert {t: e.payload.status for t, e in done.items()} == EXPECTED_STATUS
    validated = {e.payload.task_id: e.payload for e in await events(s, registry, "validations")}
    levels = {t: [(lv.level, lv.passed) for lv in v.levels] for t, v in validated.items()}
    assert levels == {
        "json-pass": [("json", True), ("schema", True), ("expected", True)],
        "json-schema-fail": [("json", True), ("schema", False)],
        "json-expected-fail": [("json", True), ("schema", True), ("expected", False)],
        "json-from-schema": [("json", True), ("schema", True)],
        "text-pass": [("text", True)],
        "text-fail": [("text", False)],
        "text-unchecked": [],
    }
    assert {t for t, v in validated.items() if not v.verified} == {"text-unchecked"}
    errors = {}
    for e in await events(s, registry, "errors"):
        errors.setdefault(e.payload.task_id, []).append((e.payload.category, e.payload.message))
    assert errors == {
        "json-schema-fail": [("SCHEMA", "at $.age: 'old' is not of type 'integer'")],
        "json-expected-fail": [("SCHEMA", "at $.age: expected 41, got 40")],
        "text-fail": [("LOGIC", 'must_contain "Paris": not in the answer')],
    }
    rewards = {e.payload.task_id: e.payload for e in await events(s, registry, "rewards")}
    assert rewards["text-unchecked"].performance == UNVERIFIED_PERFORMANCE
    assert {t: r.completion_status for t, r in rewards.items()} == EXPECTED_STATUS

    assert await eventually(lambda: _projected(s)), await statuses(s, set(EXPECTED_STATUS))
    env = cli_env(s)
    out = rmo("status", "text-unchecked", env=env)
    assert out.returncode == 0 and out.stdout.startswith("text-unchecked: unverified"), out
    out = rmo("status", "json-schema-fail", env=env)
    assert out.returncode == 0, out.stderr
    assert "failed level: schema (schema:type): at $.age: 'old' is not of type 'integer'" in out.stdout


async def _projected(s: Settings) -> bool:
    return await statuses(s, set(EXPECTED_STATUS)) == EXPECTED_STATUS


async def test_json_and_text_tasks_through_every_stage(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": oracle_with_references(tmp_path)})
    tasks = kinds_tasks()
    with worker(s, tmp_path) as log:
        await submit(s, topics, tasks)
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
        executed = {e.payload.task_id: e.payload for e in await events(s, topics, "executions")}
        # the executor carries each task's checks on, so the validator needs no lookup
        for t in tasks:
            x = executed[t.task_id]
            assert (x.kind, x.json_schema, x.expected, x.must_match, x.must_contain) == (
                t.kind, t.json_schema, t.expected, t.must_match, t.must_contain), t.task_id
        assert executed["json-from-schema"].chosen_text == '{"name": "", "age": 0}'
        assert executed["text-unchecked"].chosen_text == TEXT_ANSWER
        await assert_verdicts(s, topics, done)
        await assert_caught_up(s, topics)
    await assert_replay_verifies(s)


def executed_stand_in(task: TaskSubmitted) -> Envelope:
    """The TaskExecuted the executor makes of ``task`` with the oracle's answer, written
    here so that the validator and learning stages are tested on their own."""
    answer = (REFERENCES.get(task.prompt, '{"name": "", "age": 0}') if task.kind == "json"
              else TEXT_ANSWER)
    payload = TaskExecuted(task_id=task.task_id, state="none|text|low", action="oracle:single",
                           candidates=[], consensus_strategy="single", chosen="oracle",
                           chosen_text=answer, agreement=1.0, cost_usd=0.0001, tokens=20,
                           kind=task.kind, prompt=task.prompt, json_schema=task.json_schema,
                           expected=task.expected, must_match=task.must_match,
                           must_contain=task.must_contain)
    return make_event(payload, producer="test.executor", correlation_id=task.task_id)


async def test_validator_and_learning_judge_each_kind(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": oracle_with_references(tmp_path)})
    tasks = kinds_tasks()
    with worker(s, tmp_path) as log:
        producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
        await producer.start()
        try:
            for t in tasks:
                # plain JSON with "schema" as the field's name, as any Kafka client writes it
                record = orjson.loads(orjson.dumps(executed_stand_in(t).model_dump(mode="json")))
                assert ("schema" in record["payload"]) and "json_schema" not in record["payload"]
                await producer.send_and_wait(topics.name("executions"), orjson.dumps(record),
                                             key=t.task_id.encode())
        finally:
            await producer.stop()
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
        await assert_verdicts(s, topics, done)
        await assert_caught_up(s, topics)
    await assert_replay_verifies(s)


async def test_a_json_task_without_its_schema_is_dead_lettered_naming_the_field(
        settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": oracle_with_references(tmp_path)})
    payload: dict[str, Any] = {"task_id": "json-no-schema", "kind": "json",
                               "prompt": "Describe Ada Lovelace as a JSON object.",
                               "expected": {"age": 36}}
    value = orjson.dumps({"event_id": "raw-json-1", "event_type": "TaskSubmitted",
                          "schema_version": 1, "occurred_at": "2026-01-01T00:00:00Z",
                          "correlation_id": "json-no-schema", "causation_id": None,
                          "producer": "external", "payload": payload})
    good = kinds_tasks()[0]
    with worker(s, tmp_path) as log:
        producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
        await producer.start()
        try:
            await producer.send_and_wait(topics.name("tasks"), value, key=b"json-no-schema")
        finally:
            await producer.stop()
        await submit(s, topics, [good])  # the pipeline keeps flowing

        async def letter() -> Envelope | None:
            return next((e for e in await events(s, topics, "deadletter")
                         if e.payload.original_key_b64 == base64.b64encode(b"json-no-schema").decode()),
                        None)

        dead = await eventually(letter)
        assert dead is not None, "no dead letter for the json task without a schema"
        assert (dead.payload.error_type, dead.payload.stage) == ("schema", "analyzer")
        assert "field 'schema': required for kind json" in dead.payload.reason
        assert base64.b64decode(dead.payload.original_value_b64) == value

        done = await wait_completed(s, topics, {"json-no-schema", good.task_id}, log=log)
        assert done[good.task_id].payload.status == "passed"
        assert done["json-no-schema"].payload.status == "dead_lettered"
        assert "field 'schema': required for kind json" in (done["json-no-schema"].payload.result or "")
        async def projected() -> bool:
            return await statuses(s, {"json-no-schema"}) == {"json-no-schema": "dead_lettered"}

        assert await eventually(projected)
        out = rmo("status", "json-no-schema", env=cli_env(s))
        assert out.stdout.startswith("json-no-schema: dead_lettered"), out
        assert "field 'schema': required for kind json" in out.stdout
        await assert_caught_up(s, topics)
    await assert_replay_verifies(s)
