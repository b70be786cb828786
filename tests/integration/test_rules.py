"""Error patterns become tested rules, end to end (agents/patterns.py, agents/rules.py): a real
worker, two sim providers, one of them failing every string task with a syntax error. Its
SYNTAX errors become a PatternDetected, the pattern's avoid_provider rule is proposed and
applied, later string tasks are not routed to it, and the log rebuilds the live state exactly
(`rmo replay --verify`, which covers the patterns, outcomes and rules projections)."""

from __future__ import annotations

import secrets

import orjson
import pytest
from redis.asyncio import Redis

from agents.analyzers import analyze_batch
from agents.rules import ActiveRules
from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.pipeline import wait_caught_up
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

DEFECTIVE = ("  - id: broken\n    kind: sim\n    model: gemini-2.5-pro\n"
             "    accuracy: {default: 1.0, string: 0.0}\n"
             "    wrong_answer_mix: {mutation: 0.0, syntax_error: 1.0}\n"
             "    error_rate: 0.0\n    timeout_rate: 0.0\n    latency_ms: {mean: 1, p95: 2}\n")
RULE = "avoid_provider:string:broken"


async def test_a_provider_failing_a_task_type_is_routed_away_from_it(settings, topics, tmp_path,
                                                                     monkeypatch):
    # every usable action equally likely: the defective provider gets string tasks until the
    # rule removes it; syntax is the only level needed to see its answers fail
    monkeypatch.setenv("RMO_POLICY", "random")
    monkeypatch.setenv("RMO_STRATEGIES", '["single"]')
    path = providers_file(tmp_path, "providers:\n" + DEFECTIVE + sim("good", accuracy=1.0))
    s = settings.model_copy(update={"providers_file": path, "sandbox": "off",
                                    "validator_levels": ("syntax",)})
    tasks = humaneval_tasks()
    strings = [t for t, a in zip(tasks, await analyze_batch(tasks)) if a.features.task_type == "string"]
    first, later = strings[:24], strings[24:]
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    keys = Keys(s.namespace)
    target = f"{s.namespace}-r{secrets.token_hex(3)}"
    try:
        with worker(s, tmp_path) as log:
            await submit(s, topics, first)
            await wait_completed(s, topics, {t.task_id for t in first}, log=log)

            async def in_force() -> bool:
                rules = ActiveRules.from_hash(await redis.hgetall(keys.active_rules))
                return rules.avoided("string") == {"broken"}

            assert await eventually(in_force, timeout_s=20), (await events(s, topics, "learning"),
                                                             log.read_text()[-2000:])
            await submit(s, topics, later)
            done = await wait_completed(s, topics, {t.task_id for t in later}, log=log)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)

        learning = await events(s, topics, "learning")
        # the errors and the rewards consumers may both detect it: one id, the copy is dropped
        (detected,) = {e.event_id: e.payload for e in learning if e.event_type == "PatternDetected"
                       and e.payload.provider == "broken"}.values()
        assert (detected.category, detected.task_type) == ("SYNTAX", "string")
        assert detected.occurrences >= 3 and detected.confidence >= 0.7
        decisions = [(e.event_type, e.payload.rule_id) for e in learning
                     if e.event_type.startswith("ProtocolRule")]
        assert ("ProtocolRuleProposed", RULE) in decisions and ("ProtocolRuleApplied", RULE) in decisions
        assert ("ProtocolRuleRolledBack", RULE) not in decisions
        applied = next(e.payload for e in learning if e.event_type == "ProtocolRuleApplied"
                       and e.payload.rule_id == RULE)
        ev = applied.evidence
        assert ev.confidence >= 0.8 and ev.provider_failed == ev.provider_tasks >= 4
        assert ev.other_failed == 0 and ev.other_tasks >= 5

        selected = {e.payload.task_id: e.payload.action for e in await events(s, topics, "decisions")
                    if e.event_type == "ProviderSelected"}
        assert "broken:single" in {selected[t.task_id] for t in first}
        assert {selected[t.task_id] for t in later} == {"good:single"}
        assert {e.payload.status for e in done.values()} == {"passed"}

        out = rmo("rules", "--json", env=cli_env(s))
        assert out.returncode == 0, out.stderr
        report = orjson.loads(out.stdout)
        (rule,) = [r for r in report["rules"] if r["id"] == RULE]
        assert rule["state"] == "applied" and [x["stage"] for x in rule["stages"]] == ["proposed", "applied"]
        # measured since the rule applied: the later tasks, and first ones still in flight then
        assert rule["measured"]["after_tasks"] >= len(later) and rule["measured"]["measured_effect"] > 0
        assert any(p["key"] == "SYNTAX|*|string|*|broken" for p in report["patterns"])

        out = rmo("replay", "--verify", "--namespace", target, "--json",
                  env=cli_env(s, RMO_PROVIDERS_FILE=str(path)))
        assert out.returncode == 0, out.stdout + out.stderr
        replayed = orjson.loads(out.stdout)
        assert replayed["verified"] is True
        assert {"learning.patterns", "learning.rules", "learning.outcomes"} <= set(replayed["per_consumer"])
        rebuilt = Keys(target)
        assert await redis.hgetall(rebuilt.active_rules) == await redis.hgetall(keys.active_rules) != {}
    finally:
        async for key in redis.scan_iter(Keys(target).pattern(), count=1000):
            await redis.delete(key)
        await redis.aclose()
