"""Poison records (SPEC §5, dead letters): records that are not JSON, JSON that fails the
schema, unknown event types, oversized values and events on which a stage raises all go to
the deadletter topic with the reason, the original bytes and the source topic/partition/
offset, while the rest of the pipeline keeps flowing. Real Tansu broker, real Redis, a real
worker process; the poison is written with plain aiokafka as any Kafka client could."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from agents.analyzer import AnalyzerStage
from models.codec import MAX_VALUE_BYTES, encode, make_event
from models.events import Envelope
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.pipeline import wait_caught_up
from streams.projections import task_status
from streams.stage import BatchRunner, Context
from streams.topics import TopicRegistry
from tests.integration.helpers import (
    events,
    eventually,
    providers_file,
    sim,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration

ORACLE = "providers:\n" + sim("oracle", accuracy=1.0)


def rmo(s: Settings, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the `rmo` CLI against this test's broker, Redis and namespace."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=s.require_kafka(), REDIS_URL=s.redis_url,
               RMO_NAMESPACE=s.namespace)
    exe = Path(sys.executable).with_name("rmo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streams.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def raw_envelope(event_type: str, payload: dict, event_id: str, correlation_id: str) -> dict:
    return {"event_id": event_id, "event_type": event_type, "schema_version": 1,
            "occurred_at": "2026-01-01T00:00:00Z", "correlation_id": correlation_id,
            "causation_id": None, "producer": "poison-test", "payload": payload}


async def dead_letters(s: Settings, registry: TopicRegistry) -> list[Envelope]:
    return [e for e in await events(s, registry, "deadletter") if e.event_type == "DeadLettered"]


async def count_records(s: Settings, registry: TopicRegistry, role: str) -> int:
    """Every record of a topic, decodable or not (events() drops undecodable ones)."""
    return sum([1 async for _ in read_topic(s.require_kafka(), registry.name(role))])


async def read_at(s: Settings, topic: str, partition: int, offset: int) -> tuple[bytes | None, bytes | None]:
    """(key, value) of the record at exactly topic[partition]@offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.require_kafka(), enable_auto_commit=False,
                                group_id=None, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        m = await consumer.getone()
        assert (m.topic, m.partition, m.offset) == (topic, partition, offset)
        return m.key, m.value
    finally:
        await consumer.stop()


def find_letter(letters: list[Envelope], md) -> list[Envelope]:
    return [e for e in letters if (e.payload.source_topic, e.payload.source_partition,
                                   e.payload.source_offset) == (md.topic, md.partition, md.offset)]


async def test_poison_records_are_dead_lettered_and_the_pipeline_keeps_flowing(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(tmp_path, ORACLE)})
    tasks = humaneval_tasks(10)
    good_ids = {t.task_id for t in tasks}
    tasks_topic, analyses_topic = topics.name("tasks"), topics.name("analyses")

    # (name, topic, key, value, error_type, stage, text the reason must contain)
    bad_task = raw_envelope("TaskSubmitted", {"task_id": "bad-priority", "kind": "code",
                                              "prompt": "def f():\n    pass\n", "priority": 11},
                            "poison-schema", "bad-priority")
    unknown = raw_envelope("TaskTeleported", {"task_id": "nowhere"}, "poison-unknown", "nowhere")
    headless = raw_envelope("TaskAnalyzed", {"task_id": "headless", "analyses": [],
                                             "features": {"task_type": "math", "complexity": "low"},
                                             "action_items": []},
                            "poison-headless", "headless")
    poison = [
        ("not_json", tasks_topic, b"p-1", b"\x00\xff{definitely not json", "not_json", "analyzer", "not_json"),
        ("array", tasks_topic, b"p-2", b'[1, 2, {"event_type": "TaskSubmitted"}]', "not_object", "analyzer",
         "expected a JSON object, got list"),
        ("schema", tasks_topic, b"bad-priority", orjson.dumps(bad_task), "schema", "analyzer", "priority"),
        ("unknown", tasks_topic, b"nowhere", orjson.dumps(unknown), "unknown_event_type", "analyzer",
         "TaskTeleported"),
        ("raises", analyses_topic, b"headless", orjson.dumps(headless), "ValueError", "executor",
         "TaskAnalyzed without its task"),
    ]
    sent: dict[str, object] = {}
    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        with worker(s, tmp_path) as log:
            producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
            await producer.start()
            try:
                for i, task in enumerate(tasks):
                    await producer.send_and_wait(tasks_topic, encode(make_event(task, producer="test")),
                                                 key=task.task_id.encode())
                    if i < len(poison):
                        name, topic, key, value, *_ = poison[i]
                        sent[name] = await producer.send_and_wait(topic, value, key=key)
            finally:
                await producer.stop()

            done = await wait_completed(s, topics, good_ids | {"headless"}, log=log)
            assert {t: done[t].payload.status for t in good_ids} == {t: "passed" for t in good_ids}
            assert done["headless"].payload.status == "dead_lettered"
            assert "TaskAnalyzed without its task" in (done["headless"].payload.result or "")

            async def projected() -> bool:
                statuses = [task_status(await redis.hgetall(Keys(s.namespace).task(t))) for t in good_ids]
                return statuses == ["passed"] * len(good_ids) and task_status(
                    await redis.hgetall(Keys(s.namespace).task("headless"))) == "dead_lettered"

            assert await eventually(projected)

            async def all_letters() -> list[Envelope] | None:
                got = await dead_letters(s, topics)
                return got if len(got) >= len(poison) else None

            letters = await eventually(all_letters)
            assert letters, f"dead letters: {await dead_letters(s, topics)}"
            assert len(letters) == len(poison), [e.payload.reason for e in letters]
            for name, topic, key, value, error_type, stage, reason in poison:
                md = sent[name]
                match = find_letter(letters, md)
                assert len(match) == 1, f"{name}: {len(match)} dead letters at {md}"
                p = match[0].payload
                assert (p.error_type, p.stage) == (error_type, stage), name
                assert reason in p.reason, (name, p.reason)
                assert base64.b64decode(p.original_value_b64) == value, name
                assert p.original_value_b64 == base64.b64encode(value).decode(), name
                assert p.original_key_b64 == base64.b64encode(key).decode(), name
                assert (p.source_topic, p.source_partition, p.source_offset) == (topic, md.partition, md.offset)

            # `rmo deadletter --json`: one JSON object per line
            out = rmo(s, "deadletter", "--json")
            assert out.returncode == 0, out.stderr
            listed = [orjson.loads(line) for line in out.stdout.splitlines() if line.strip()]
            assert {d["id"] for d in listed} == {e.event_id for e in letters}
            by_id = {d["id"]: d for d in listed}
            for e in letters:
                d = by_id[e.event_id]
                assert (d["source_topic"], d["source_partition"], d["source_offset"], d["reason"],
                        d["original_value_b64"], d["error_type"]) == (
                    e.payload.source_topic, e.payload.source_partition, e.payload.source_offset,
                    e.payload.reason, e.payload.original_value_b64, e.payload.error_type)

            # retry the not-JSON record: its original bytes go back to the source topic, where
            # the analyzer dead-letters them again, at the new offset
            first = find_letter(letters, sent["not_json"])[0]
            out = rmo(s, "deadletter", "--retry", first.event_id)
            assert out.returncode == 0, out.stderr
            m = re.search(r"re-submitted (\S+) to (\S+)\[(\d+)\]@(\d+)", out.stdout)
            assert m and m.group(1) == first.event_id, out.stdout
            topic, partition, offset = m.group(2), int(m.group(3)), int(m.group(4))
            assert topic == tasks_topic
            assert offset > sent["not_json"].offset or partition != sent["not_json"].partition
            assert await read_at(s, topic, partition, offset) == (b"p-1", poison[0][3])

            async def second_letter() -> list[Envelope]:
                return [e for e in await dead_letters(s, topics)
                        if (e.payload.source_topic, e.payload.source_partition,
                            e.payload.source_offset) == (topic, partition, offset)]

            again = await eventually(second_letter)
            assert len(again) == 1 and again[0].event_id != first.event_id
            assert again[0].payload.error_type == "not_json"
            assert again[0].payload.original_value_b64 == first.payload.original_value_b64

            # retry the event the executor raised on: the executor had recorded its id as
            # applied, so the retry is a copy with an id of its own, which the executor runs
            # (and, the event being still headless, dead-letters again); a second retry of the
            # same dead letter is the same copy, which the executor drops as already applied
            raised = find_letter(letters, sent["raises"])[0]
            for _ in range(2):
                out = rmo(s, "deadletter", "--retry", raised.event_id)
                assert out.returncode == 0, out.stderr
                m = re.search(r"re-submitted \S+ to (\S+)\[(\d+)\]@(\d+) as event (\w+)", out.stdout)
                assert m and m.group(1) == analyses_topic, out.stdout
            copy_id = m.group(4)
            assert copy_id != orjson.loads(base64.b64decode(raised.payload.original_value_b64))["event_id"]

            async def copy_letters() -> list[Envelope]:
                return [e for e in await dead_letters(s, topics) if e.payload.stage == "executor"
                        and orjson.loads(base64.b64decode(e.payload.original_value_b64))["event_id"] == copy_id]

            (retried,) = await eventually(copy_letters)
            assert retried.payload.error_type == "ValueError"
            assert "TaskAnalyzed without its task" in retried.payload.reason
            assert await wait_caught_up(s, topics, redis, timeout_s=30)
            assert len(await copy_letters()) == 1  # the second retry was dropped, not run again

        letters_before = await count_records(s, topics, "deadletter")
        completions_before = await count_records(s, topics, "tasks")
        assert letters_before == len(poison) + 2

        # a restarted worker on the same namespace: it consumes new work, but nothing it
        # had already dead-lettered is dead-lettered again
        extra = humaneval_tasks(11)[10]
        with worker(s, tmp_path) as log:
            producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
            await producer.start()
            try:
                await producer.send_and_wait(tasks_topic, encode(make_event(extra, producer="test")),
                                             key=extra.task_id.encode())
            finally:
                await producer.stop()
            assert (await wait_completed(s, topics, {extra.task_id}, log=log))[extra.task_id].payload.status == "passed"
            assert await wait_caught_up(s, topics, redis, timeout_s=30)
        assert await count_records(s, topics, "deadletter") == letters_before
        # the extra task's TaskSubmitted and TaskCompleted, nothing re-emitted for the others
        assert await count_records(s, topics, "tasks") == completions_before + 2
    finally:
        await redis.aclose()


async def test_oversized_record_is_dead_lettered_and_the_pipeline_keeps_flowing(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(tmp_path, ORACLE)})
    before, after = humaneval_tasks(2)
    tasks_topic = topics.name("tasks")
    # a well-formed TaskSubmitted, only too big: the codec must refuse it unread
    big = raw_envelope("TaskSubmitted", {"task_id": "huge", "kind": "code", "prompt": ""},
                       "poison-oversized", "huge")
    big["payload"]["prompt"] = "x" * (MAX_VALUE_BYTES + 100 - len(orjson.dumps(big)))
    value = orjson.dumps(big)
    assert MAX_VALUE_BYTES < len(value) < (1 << 20)  # under aiokafka's default fetch size
    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        with worker(s, tmp_path) as log:
            producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka(), max_request_size=4 << 20)
            await producer.start()
            try:
                await producer.send_and_wait(tasks_topic, encode(make_event(before, producer="test")),
                                             key=before.task_id.encode())
                md = await producer.send_and_wait(tasks_topic, value, key=b"huge")
                await producer.send_and_wait(tasks_topic, encode(make_event(after, producer="test")),
                                             key=after.task_id.encode())
            finally:
                await producer.stop()
            # the broker accepted and stores the record as sent
            assert await read_at(s, tasks_topic, md.partition, md.offset) == (b"huge", value)

            done = await wait_completed(s, topics, {before.task_id, after.task_id}, timeout_s=20, log=log)
            assert {e.payload.status for e in done.values()} == {"passed"}
            letters = await eventually(lambda: _letters_at(s, topics, md), timeout_s=20)
            assert letters and len(letters) == 1, log.read_text()[-3000:]
            p = letters[0].payload
            assert (p.error_type, p.stage) == ("oversized", "analyzer")
            assert str(MAX_VALUE_BYTES) in p.reason
            assert base64.b64decode(p.original_value_b64) == value
            # its key names the task (SPEC §3), so that task completes as dead_lettered

            async def huge_done() -> dict[str, str] | None:
                h = await redis.hgetall(Keys(s.namespace).task("huge"))
                return h if task_status(h) == "dead_lettered" else None

            h = await eventually(huge_done)
            assert h, await redis.hgetall(Keys(s.namespace).task("huge"))
            assert "oversized" in h["result"] and str(MAX_VALUE_BYTES) in h["result"]
    finally:
        await redis.aclose()


async def _letters_at(s: Settings, registry: TopicRegistry, md) -> list[Envelope]:
    return find_letter(await dead_letters(s, registry), md)


async def test_redelivered_poison_below_the_checkpoint_is_not_dead_lettered_again(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(tmp_path, ORACLE)})
    task = humaneval_tasks(1)[0]
    tasks_topic = topics.name("tasks")
    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        with worker(s, tmp_path) as log:
            producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
            await producer.start()
            try:
                md = await producer.send_and_wait(tasks_topic, b"not json at all", key=b"p-1")
                await producer.send_and_wait(tasks_topic, encode(make_event(task, producer="test")),
                                             key=task.task_id.encode())
            finally:
                await producer.stop()
            await wait_completed(s, topics, {task.task_id}, log=log)
            assert len(await eventually(lambda: _letters_at(s, topics, md))) == 1
            assert await wait_caught_up(s, topics, redis, timeout_s=30)
        letters = await count_records(s, topics, "deadletter")
        analyses = await count_records(s, topics, "analyses")
        assert letters == 1

        # the analyzer's records handed over again, as after a crash or rebalance between the
        # Redis commit (stage.py step 7) and the Kafka offset commit (step 8); the checkpoints
        # in Redis already cover every one of them
        records = [r async for r in read_topic(s.require_kafka(), tasks_topic)]
        for r in records:
            mark = await redis.get(Keys(s.namespace).checkpoint("analyzer", r.topic, r.partition))
            assert mark is not None and int(mark) >= r.offset
        async with EventProducer(s.require_kafka()) as out:
            ctx = Context(settings=s, keys=Keys(s.namespace), topics=topics, redis=redis, producer=out)
            tx = await BatchRunner(AnalyzerStage(), ctx).run(records)
            assert tx.emitted == [] and tx.writes == []
            assert await count_records(s, topics, "analyses") == analyses  # no stage re-run
            assert await count_records(s, topics, "deadletter") == letters  # no second letter

            # the same redelivered records followed by one new poison record: only that one is
            # dead-lettered
            fut = await out.send(tasks_topic, b"p-2", b"\xfe fresh poison")
            md2 = await fut
            records = [r async for r in read_topic(s.require_kafka(), tasks_topic)]
            tx = await BatchRunner(AnalyzerStage(), ctx).run(records)
            assert [e.event_type for _, _, e in tx.emitted] == ["DeadLettered"]
        assert await count_records(s, topics, "deadletter") == letters + 1
        assert len(await _letters_at(s, topics, md)) == 1
        assert [e.payload.error_type for e in await _letters_at(s, topics, md2)] == ["not_json"]
    finally:
        await redis.aclose()
