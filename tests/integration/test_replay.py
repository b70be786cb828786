"""Replay and re-execution (SPEC §5): the log rebuilds every projection exactly, `--verify`
finds any difference, a replay never writes into a namespace that holds keys, two replays are
identical, and a task re-executed with the replay provider reaches its original outcome with
no new provider call and no new event on the live topics.

One worker run (module fixture) produces the history every test reads: 20-40 HumanEval tasks
through the default sim profiles plus a provider that always fails (its breaker trips), so
the Q-table, experience buffer, breakers, provider stats, task statuses and counters all
exist.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiokafka.partitioner import murmur2
from redis.asyncio import Redis

import agents.providers
from agents.providers.registry import load_providers
from models.codec import make_event
from models.events import Envelope
from streams.client import EventProducer, high_watermarks
from streams.config import Settings
from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.pipeline import build_consumers, wait_caught_up
from streams.reexecute import reexecute
from streams.replay import ReplayTargetError, projection_state, replay, verify
from streams.topics import TopicRegistry, create_topics, load_topics
from tests.integration.helpers import events, providers_file, sim, wait_completed, worker

pytestmark = pytest.mark.integration

WAVE = 10
MAX_WAVES = 4
DEFAULTS = (Path(agents.providers.__file__).parent / "defaults.yaml").read_text()


def rmo(s: Settings, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run the `rmo` CLI against this history's broker, Redis and namespace."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=s.require_kafka(), REDIS_URL=s.redis_url,
               RMO_NAMESPACE=s.namespace)
    if s.providers_file:
        env["RMO_PROVIDERS_FILE"] = str(s.providers_file)
    exe = Path(sys.executable).with_name("rmo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streams.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@dataclass
class History:
    settings: Settings
    registry: TopicRegistry
    redis: Redis
    completed: dict[str, Envelope]
    scratch: list[str] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.namespace)

    def target(self) -> str:
        """A fresh namespace for a rebuild (deleted when the module ends)."""
        ns = f"{self.settings.namespace}-r{secrets.token_hex(3)}"
        self.scratch.append(ns)
        return ns

    async def replay(self, target: str):
        s = self.settings
        return await replay(s, self.registry, build_consumers(s, load_providers(s.providers_file, seed=s.seed)),
                            self.redis, target)

    async def watermarks(self) -> dict[str, dict[int, int]]:
        return {spec.role: await high_watermarks(self.settings.require_kafka(), spec.name)
                for spec in self.registry}


async def drop_namespace(redis: Redis, ns: str) -> None:
    async for key in redis.scan_iter(Keys(ns).pattern(), count=1000):
        await redis.delete(key)


async def raw_state(redis: Redis, ns: str) -> dict[str, object]:
    """Every key of a namespace, bookkeeping (checkpoints, applied ids) included."""
    return await projection_state(redis, Keys(ns), bookkeeping=True)


@pytest.fixture(scope="module")
async def history(kafka, redis_url, tmp_path_factory) -> AsyncIterator[History]:
    tmp = tmp_path_factory.mktemp("replay")
    ns = f"t{secrets.token_hex(4)}"
    body = DEFAULTS if DEFAULTS.endswith("\n") else DEFAULTS + "\n"
    s = Settings(namespace=ns, kafka_bootstrap_servers=kafka, redis_url=redis_url,
                 providers_file=providers_file(tmp, body + sim("flaky", error_rate=1.0)))
    registry = load_topics(ns)
    await create_topics(s.require_kafka(), registry)
    redis = Redis.from_url(redis_url, decode_responses=True)
    tasks = humaneval_tasks(WAVE * MAX_WAVES)
    h = History(s, registry, redis, {})
    try:
        with worker(s, tmp) as log:
            async with EventProducer(s.require_kafka()) as p:
                # waves of tasks, each routed by the Q-table the earlier ones trained, until
                # the always-failing provider's breaker tripped (exploration picks it often)
                for n in range(MAX_WAVES):
                    wave = tasks[n * WAVE:(n + 1) * WAVE]
                    await p.send_events(registry.name("tasks"), [make_event(t, producer="test") for t in wave])
                    h.completed.update(await wait_completed(s, registry, {t.task_id for t in wave}, log=log))
                    assert await wait_caught_up(s, registry, redis, timeout_s=60)
                    if n >= 1 and int(await redis.hget(h.keys.provider_stats("flaky"), "trips") or 0):
                        break
        yield h
    finally:
        for target in [ns, *h.scratch]:
            await drop_namespace(redis, target)
        await redis.aclose()


async def test_history_has_every_kind_of_state(history):
    """The precondition of every other test here: the live namespace holds each projection."""
    state = await projection_state(history.redis, history.keys)
    assert {"q:table", "q:meta", "q:experience", "counters", "providers", "breaker:flaky",
            "provider:flaky"} <= set(state)
    assert {f"task:{t}" for t in history.completed} <= set(state)
    assert int(state["q:meta"]["updates"]) == len(history.completed) == len(state["q:experience"])
    assert int(state["provider:flaky"]["trips"]) >= 1
    assert int(state["provider:flaky"]["failures"]) == int(state["provider:flaky"]["calls"]) > 0
    assert {e.payload.status for e in history.completed.values()} == {"passed", "failed"}


async def test_replay_rebuilds_the_live_state_exactly(history):
    target = history.target()
    report = await history.replay(target)
    assert report.events > 0 and set(report.per_consumer) == {
        "analyzer", "executor", "executor.breaker", "validator", "learning", "learning.qtable",
        "learning.patterns", "learning.rules", "learning.outcomes", "coordinator"}
    assert report.per_consumer["learning.qtable"] == len(history.completed)

    assert await verify(history.redis, history.keys, Keys(target)) == []
    live = await projection_state(history.redis, history.keys)
    rebuilt = await projection_state(history.redis, Keys(target))
    assert live and set(rebuilt) == set(live)
    assert {"q:table", "q:experience", "breaker:flaky", "counters"} <= set(rebuilt)
    assert any(k.startswith("breaker:") and k != "breaker:flaky" for k in rebuilt)
    assert sum(k.startswith("task:") for k in rebuilt) == len(history.completed)
    assert rebuilt == live


async def test_cli_verify_exits_1_on_a_tampered_q_value_and_0_otherwise(history):
    out = rmo(history.settings, "replay", "--verify", "--namespace", history.target(), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = orjson.loads(out.stdout)
    assert report["verified"] is True and report["differences"] == [] and report["events"] > 0

    q = history.keys.qtable
    field_, value = min((await history.redis.hgetall(q)).items())
    await history.redis.hset(q, field_, repr(float(value) + 0.125))
    try:
        out = rmo(history.settings, "replay", "--verify", "--namespace", history.target(), "--json")
    finally:
        await history.redis.hset(q, field_, value)
    assert out.returncode == 1, out.stdout + out.stderr
    report = orjson.loads(out.stdout)
    assert report["verified"] is False
    assert len(report["differences"]) == 1 and report["differences"][0].startswith("q:table")
    assert field_ in report["differences"][0]


async def test_replay_refuses_a_namespace_that_holds_keys(history):
    before = await raw_state(history.redis, history.settings.namespace)
    with pytest.raises(ReplayTargetError, match="--namespace"):
        await history.replay(history.settings.namespace)
    out = rmo(history.settings, "replay", "--namespace", history.settings.namespace)
    assert out.returncode != 0
    assert "--namespace" in out.stderr
    assert await raw_state(history.redis, history.settings.namespace) == before


async def test_two_replays_of_one_log_are_identical(history):
    a, b = history.target(), history.target()
    await history.replay(a)
    await history.replay(b)
    assert await verify(history.redis, Keys(a), Keys(b)) == []
    # checkpoints and applied ids too: the same log, the same bookkeeping
    state_a = await raw_state(history.redis, a)
    assert state_a and state_a == await raw_state(history.redis, b)
    assert any(k.startswith("ckpt:") for k in state_a)


def _descends(events: list[dict], root_id: str) -> bool:
    by_id = {e["event_id"]: e for e in events}
    for e in events:
        seen = set()
        cur = e
        while cur["event_id"] != root_id:
            if cur["event_id"] in seen or cur["causation_id"] not in by_id:
                return False
            seen.add(cur["event_id"])
            cur = by_id[cur["causation_id"]]
    return True


async def _pick(history: History, status: str) -> str:
    """A task with this final status whose decision called one provider (see the xfail test
    below for multi-provider actions)."""
    decisions = {e.payload.task_id: e.payload for e in await events(history.settings, history.registry, "decisions")
                 if e.event_type == "ProviderSelected"}
    for task_id, done in sorted(history.completed.items()):
        if done.payload.status == status and task_id in decisions and len(decisions[task_id].providers) == 1:
            return task_id
    pytest.fail(f"no {status} task with a single-provider decision in {history.completed}")


@pytest.mark.parametrize("status", ["passed", "failed"])
async def test_reexecution_reaches_the_original_outcome_from_recorded_calls(history, status):
    task_id = await _pick(history, status)
    submitted = [e for e in await events(history.settings, history.registry, "tasks")
                 if e.event_type == "TaskSubmitted" and e.payload.task_id == task_id]
    assert len(submitted) == 1
    before = await history.watermarks()

    out = rmo(history.settings, "replay", "--task", task_id, "--reexecute", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = orjson.loads(out.stdout)
    assert result["original_passed"] is (status == "passed")
    assert result["passed"] is (status == "passed") and result["same_outcome"] is True
    assert result["replayed_calls"] >= 1 and result["new_provider_calls"] == 0

    new = result["events"]
    root = new[0]
    assert root["event_type"] == "TaskSubmitted" and root["causation_id"] == submitted[0].event_id
    assert root["payload"]["metadata"]["reexecution_of"] == submitted[0].event_id
    assert root["event_id"] != submitted[0].event_id
    types = [e["event_type"] for e in new]
    assert {"TaskAnalyzed", "ProviderSelected", "TaskExecuted", "TaskValidated"} <= set(types)
    assert types.count("ProviderCallCompleted") + types.count("ProviderCallFailed") == result["replayed_calls"]
    assert all(e["correlation_id"] == task_id for e in new)
    assert _descends(new, root["event_id"])
    # re-running history publishes nothing
    assert await history.watermarks() == before


async def test_reexecution_of_an_unknown_task_fails_with_a_message(history):
    out = rmo(history.settings, "replay", "--task", "no-such-task", "--reexecute", "--json")
    assert out.returncode != 0
    assert "no-such-task" in out.stderr and "lineage" in out.stderr


def _same_partition(first: str, candidates: list[str], partitions: int) -> str:
    """A candidate id whose records land on the same partition as ``first``'s (murmur2, the
    default partitioner of Kafka clients)."""
    target = (murmur2(first.encode()) & 0x7FFFFFFF) % partitions
    return next(c for c in candidates if (murmur2(c.encode()) & 0x7FFFFFFF) % partitions == target)


async def test_reexecution_keeps_the_recorded_provider_order(settings, topics, tmp_path, monkeypatch):
    # only multi-provider majority: every task asks both providers. `zeta` (always right, slow)
    # comes first in the providers file, so it wins every tie live; `alpha` (always wrong,
    # fast) answers first, so its calls come first in the log (same partition of `calls`)
    monkeypatch.setenv("RMO_STRATEGIES", '["majority"]')
    alpha = _same_partition("zeta", ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"],
                            topics.specs["calls"].partitions)
    body = ("providers:\n"
            "  - id: zeta\n    kind: sim\n    model: grok-4\n    accuracy: 1.0\n    error_rate: 0.0\n"
            "    timeout_rate: 0.0\n    latency_ms: {mean: 300, p95: 400}\n"
            f"  - id: {alpha}\n    kind: sim\n    model: grok-4\n    accuracy: 0.0\n    error_rate: 0.0\n"
            "    timeout_rate: 0.0\n    latency_ms: {mean: 1, p95: 2}\n"
            "    wrong_answer_mix: {mutation: 1.0, syntax_error: 0.0}\n")
    s = settings.model_copy(update={"providers_file": providers_file(tmp_path, body),
                                    "strategies": ("majority",)})
    tasks = humaneval_tasks(6)
    with worker(s, tmp_path) as log:
        async with EventProducer(s.require_kafka()) as p:
            await p.send_events(topics.name("tasks"), [make_event(t, producer="test") for t in tasks])
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
    executed = {e.payload.task_id: e.payload for e in await events(s, topics, "executions")}
    assert all(x.action == "all:majority" for x in executed.values())
    # live, the tie-breaking earliest candidate is zeta's (the configured order)
    ties = [t for t, x in executed.items() if [c.provider for c in x.candidates] == ["zeta", alpha]
            and x.chosen == "zeta" and done[t].payload.status == "passed"]
    assert ties, {t: (x.chosen, x.agreement) for t, x in executed.items()}

    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        outcomes = {}
        for task_id in ties:
            r = await reexecute(s, topics, redis, task_id)
            x = next(e.payload for e in r.events if e.event_type == "TaskExecuted")
            outcomes[task_id] = ([c.provider for c in x.candidates], x.chosen, r.passed)
    finally:
        await redis.aclose()
    assert outcomes == {t: (["zeta", alpha], "zeta", True) for t in ties}
