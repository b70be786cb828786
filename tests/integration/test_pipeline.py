"""The four stages end to end against the real broker and Redis, with a real worker process."""

from __future__ import annotations

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.projections import task_status
from tests.integration.helpers import (
    events,
    eventually,
    providers_file,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration


async def test_oracle_tasks_flow_through_every_stage(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(
        tmp_path, "providers:\n" + sim("oracle", accuracy=1.0))})
    tasks = humaneval_tasks(6)
    raw = humaneval_tasks(7)[6]
    with worker(s, tmp_path) as log:
        await submit(s, topics, tasks)
        # a record any Kafka client could write: plain JSON, no pydantic involved
        envelope = {"event_id": "raw-1", "event_type": "TaskSubmitted", "schema_version": 1,
                    "occurred_at": "2026-01-01T00:00:00Z", "correlation_id": raw.task_id,
                    "causation_id": None, "producer": "external",
                    "payload": {"task_id": raw.task_id, "kind": "code", "prompt": raw.prompt,
                                "entry_point": raw.entry_point, "test": raw.test}}
        producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
        await producer.start()
        await producer.send_and_wait(topics.name("tasks"), orjson.dumps(envelope), key=raw.task_id.encode())
        await producer.send_and_wait(topics.name("tasks"), b"{not json", key=b"poison")
        await producer.stop()
        ids = {t.task_id for t in tasks} | {raw.task_id}
        done = await wait_completed(s, topics, ids, log=log)
        r = Redis.from_url(s.redis_url, decode_responses=True)
        keys = Keys(s.namespace)

        async def all_passed() -> bool:
            return all([task_status(await r.hgetall(keys.task(t))) == "passed" for t in ids])

        assert await eventually(all_passed)

    assert {e.payload.status for e in done.values()} == {"passed"}
    analyses = await events(s, topics, "analyses")
    assert {e.payload.task_id for e in analyses} == ids
    assert all(e.payload.features.task_type and len(e.payload.analyses) == 5 for e in analyses)
    decisions = await events(s, topics, "decisions")
    assert {e.payload.task_id for e in decisions} == ids
    assert all(e.payload.policy == "thompson" and
               abs(sum(e.payload.action_probabilities.values()) - 1) < 1e-9 for e in decisions)
    calls = await events(s, topics, "calls")
    assert {e.event_type for e in calls} == {"ProviderCallCompleted"}
    validations = await events(s, topics, "validations")
    assert all(v.payload.passed and v.payload.tests_passed == v.payload.tests_total > 0
               for v in validations)
    rewards = await events(s, topics, "rewards")
    assert {e.payload.task_id for e in rewards} == ids
    # causation: each completion descends from its reward
    reward_ids = {e.event_id for e in rewards}
    assert all(e.causation_id in reward_ids for e in done.values())

    dead = await events(s, topics, "deadletter")
    assert len(dead) == 1 and dead[0].payload.error_type == "not_json"
    assert dead[0].payload.original_value_b64 == "e25vdCBqc29u"  # base64 of b"{not json"

    try:
        q = await r.hgetall(keys.qtable)
        assert q and all(float(v) > 0 for v in q.values())
        assert int(await r.hget(keys.qmeta, "updates")) == len(ids)
        assert (await r.hgetall(keys.breaker("oracle")))["state"] == "closed"
        assert int(await r.hget(keys.provider_stats("oracle"), "calls")) == len(ids)
    finally:
        await r.aclose()


async def test_wrong_answers_fail_validation_and_log_errors(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(
        tmp_path, "providers:\n" + sim("wrong", accuracy=0.0))})
    tasks = humaneval_tasks(5)
    with worker(s, tmp_path) as log:
        await submit(s, topics, tasks)
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
    assert {e.payload.status for e in done.values()} == {"failed"}
    errors = await events(s, topics, "errors")
    assert {e.payload.task_id for e in errors} == {t.task_id for t in tasks}
    assert {e.payload.category for e in errors} <= {"SYNTAX", "LOGIC", "RUNTIME", "TIMEOUT"}
    rewards = await events(s, topics, "rewards")
    assert all(e.payload.performance < 1.0 and e.payload.reward < 1.0 for e in rewards)


async def test_breaker_opens_on_failures_and_provider_is_skipped(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(
        tmp_path, "providers:\n" + sim("flaky", error_rate=1.0))})
    first = humaneval_tasks(4)  # 4 tasks x 3 attempts = 12 failures > threshold 5
    later = humaneval_tasks(8)[4:]
    with worker(s, tmp_path) as log:
        await submit(s, topics, first)
        await wait_completed(s, topics, {t.task_id for t in first}, log=log)
        await submit(s, topics, later)
        done = await wait_completed(s, topics, {t.task_id for t in later}, log=log)
    transitions = [e.payload for e in await events(s, topics, "system")
                   if e.event_type == "BreakerTransitioned"]
    assert [(t.from_state, t.to_state) for t in transitions][:1] == [("closed", "open")]
    assert all(e.payload.status == "failed" for e in done.values())
    calls_for_later = [e for e in await events(s, topics, "calls")
                       if e.payload.task_id in {t.task_id for t in later}]
    assert calls_for_later == []  # the open breaker refused them: no call went out
    errors = [e.payload for e in await events(s, topics, "errors")
              if e.payload.task_id in {t.task_id for t in later}]
    assert errors and {e.category for e in errors} == {"PROVIDER"}
