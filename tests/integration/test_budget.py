"""Budgets end to end (agents/budget.py): a budget that runs out midway never lets the calls
cost more than its limit, the rest of the tasks complete ``budget_exceeded``, and replay
rebuilds the spent amounts exactly."""

from __future__ import annotations

import orjson
import pytest

from models.events import TaskSubmitted
from streams.demo import humaneval_tasks
from tests.integration.helpers import (
    cli_env,
    events,
    providers_file,
    rmo,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration


def budgets_file(tmp_path, body: str):
    path = tmp_path / "budgets.yaml"
    path.write_text(body)
    return path


def call_cost(calls) -> float:
    return sum(e.payload.cost_usd for e in calls
               if e.event_type in ("ProviderCallCompleted", "ProviderCallFailed"))


async def test_demo_under_a_global_budget_stops_calling_at_the_limit(settings, topics, tmp_path):
    # the default sim profiles: 40 tasks cost at least 40 x ~$0.0006 (gemini's answers, the
    # cheapest) = ~$0.023 whatever the policy routes, so $0.015 runs out midway; gemini's worst
    # case (~$0.0105) fits, grok's (~$0.017) and claude's (~$0.08) never do, so their calls are
    # refused and the tasks fall back; the issue's $0.05 needs all 164
    limit = 0.015
    budgets = budgets_file(tmp_path, f"budgets:\n  - {{scope: global, period: total, limit_usd: {limit}}}\n")
    env = cli_env(settings, RMO_SANDBOX="subprocess")
    out = rmo("demo", "--json", "--limit", "40", "--budgets", str(budgets), env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = orjson.loads(out.stdout)
    assert summary["completed"] == 40
    statuses = summary["statuses"]
    assert sum(statuses.values()) == 40
    assert statuses.get("budget_exceeded", 0) > 0, statuses
    assert statuses.get("passed", 0) > 0, statuses

    calls = await events(settings, topics, "calls")
    assert 0 < call_cost(calls) <= limit
    done = [e for e in await events(settings, topics, "tasks") if e.event_type == "TaskCompleted"]
    refused = [e for e in done if e.payload.status == "budget_exceeded"]
    assert {e.payload.result for e in refused} == {"global/all/total"}
    errors = await events(settings, topics, "errors")
    assert any(e.event_type == "BudgetExceeded" for e in errors)

    [line] = summary["budgets"]
    assert line["line"] == "global/all/total" and line["limit_usd"] == limit
    # spent is the ceiling of every call's micro-USD: at least the float sum, at most the limit
    assert call_cost(calls) - 1e-9 <= line["spent_usd"] <= limit
    assert line["reserved_usd"] == 0 and line["pending_usd"] == 0

    report = rmo("budget", "--json", "--budgets", str(budgets), env=env)
    assert report.returncode == 0, report.stderr
    assert orjson.loads(report.stdout)[0]["spent_usd"] == line["spent_usd"]
    # spent is projected independently of the budgets file: replay needs none to verify
    verify = rmo("replay", "--verify", "--json", env=env, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert orjson.loads(verify.stdout)["verified"] is True


async def test_two_workers_share_one_global_budget(settings, topics, tmp_path):
    # 500 tasks at once over two worker processes; each call reserves its worst case
    # (~$0.017 at grok-4 prices) in the shared Lua-guarded budget
    limit = 0.06
    s = settings.model_copy(update={
        "providers_file": providers_file(tmp_path, "providers:\n" + sim("a") + sim("b")),
        "budgets_file": budgets_file(tmp_path, f"budgets:\n  - {{scope: global, limit_usd: {limit}}}\n"),
        "sandbox": "subprocess"})
    base = humaneval_tasks(164)
    tasks = [TaskSubmitted(**(base[i % 164].model_dump(by_alias=True) | {"task_id": f"b{i}"}))
             for i in range(500)]
    (tmp_path / "w2").mkdir()
    with worker(s, tmp_path) as log, worker(s, tmp_path / "w2"):
        await submit(s, topics, tasks)
        done = await wait_completed(s, topics, {t.task_id for t in tasks}, timeout_s=240, log=log)
    statuses = [e.payload.status for e in done.values()]
    assert statuses.count("budget_exceeded") > 0
    assert statuses.count("passed") > 0
    calls = await events(s, topics, "calls")
    assert 0 < call_cost(calls) <= limit
