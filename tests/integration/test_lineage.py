"""Lineage (SPEC §6): `rmo lineage TASK_ID` prints the causation tree of one task's events,
each node with the topic/partition/offset where the event really is in the log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from models.codec import decode
from streams.config import Settings
from streams.demo import humaneval_tasks
from tests.integration.helpers import providers_file, sim, submit, wait_completed, worker

pytestmark = pytest.mark.integration


def rmo(s: Settings, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=s.require_kafka(), REDIS_URL=s.redis_url,
               RMO_NAMESPACE=s.namespace)
    exe = Path(sys.executable).with_name("rmo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streams.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def walk(node: dict):
    yield node
    for child in node["children"]:
        yield from walk(child)


def only_child(node: dict, event_type: str) -> dict:
    matches = [c for c in node["children"] if c["event_type"] == event_type]
    assert len(matches) == 1, (node["event_type"], event_type, [c["event_type"] for c in node["children"]])
    return matches[0]


async def event_ids_at(s: Settings, nodes: list[dict]) -> dict[tuple[str, int, int], str]:
    """(topic, partition, offset) -> event id of the record stored there, read back one by one."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.require_kafka(), enable_auto_commit=False,
                                group_id=None, fetch_max_wait_ms=100)
    await consumer.start()
    found = {}
    try:
        for n in nodes:
            tp = TopicPartition(n["topic"], n["partition"])
            consumer.assign([tp])
            consumer.seek(tp, n["offset"])
            m = await consumer.getone()
            assert (m.topic, m.partition, m.offset) == (n["topic"], n["partition"], n["offset"])
            found[(m.topic, m.partition, m.offset)] = decode(m.value).event_id
    finally:
        await consumer.stop()
    return found


async def test_lineage_is_the_causation_tree_with_real_log_positions(settings, topics, tmp_path):
    s = settings.model_copy(update={"providers_file": providers_file(
        tmp_path, "providers:\n" + sim("oracle", accuracy=1.0))})
    tasks = humaneval_tasks(3)
    with worker(s, tmp_path) as log:
        await submit(s, topics, tasks)
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
    task_id = tasks[1].task_id
    assert done[task_id].payload.status == "passed"

    out = rmo(s, "lineage", task_id, "--json")
    assert out.returncode == 0, out.stderr
    roots = orjson.loads(out.stdout)
    assert [r["event_type"] for r in roots] == ["TaskSubmitted"]
    root = roots[0]
    assert root["topic"] == topics.name("tasks")

    analyzed = only_child(root, "TaskAnalyzed")
    assert analyzed["topic"] == topics.name("analyses")
    selected = only_child(analyzed, "ProviderSelected")
    call = only_child(analyzed, "ProviderCallCompleted")
    executed = only_child(analyzed, "TaskExecuted")
    assert (selected["topic"], call["topic"], executed["topic"]) == (
        topics.name("decisions"), topics.name("calls"), topics.name("executions"))
    validated = only_child(executed, "TaskValidated")
    reward = only_child(validated, "RewardComputed")
    completed = only_child(reward, "TaskCompleted")
    assert completed["event_id"] == done[task_id].event_id
    assert (validated["topic"], reward["topic"], completed["topic"]) == (
        topics.name("validations"), topics.name("rewards"), topics.name("tasks"))

    nodes = list(walk(root))
    assert len({n["event_id"] for n in nodes}) == len(nodes)
    # every node points at the record that really holds its event
    assert await event_ids_at(s, nodes) == {(n["topic"], n["partition"], n["offset"]): n["event_id"]
                                           for n in nodes}

    # the plain rendering names the same events, one line each
    text = rmo(s, "lineage", task_id)
    assert text.returncode == 0, text.stderr
    assert [line.split()[0] for line in text.stdout.splitlines()] == [n["event_type"] for n in nodes]


async def test_lineage_of_an_unknown_task_exits_1(settings, topics):
    out = rmo(settings, "lineage", "no-such-task", "--json")
    assert out.returncode == 1
    assert "no-such-task" in out.stderr
    assert out.stdout.strip() == ""
