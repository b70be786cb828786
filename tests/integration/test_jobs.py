"""Cortex jobs end to end (agents/cortex): a real worker, a real broker and Redis, sim
providers. A job fans out into the task pipeline as its dependencies allow, fans in through
the validator's verdicts, escalates a failed subtask to a person who answers it through
`rmo escalations`, never spends over its budget, fans in exactly once across worker
SIGKILLs, and `rmo replay --verify` rebuilds the coordinator's state exactly."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from agents.cortex.job import JobState
from models.jobs import SubtaskSpec
from streams.demo import humaneval_tasks, spawn_worker, stop_worker
from streams.keys import Keys
from streams.pipeline import wait_caught_up
from tests.integration.helpers import cli_env, events, kill_worker, providers_file, rmo, sim, worker

pytestmark = pytest.mark.integration


def _code(task, domain: str, **extra) -> dict:
    return SubtaskSpec(id=task.task_id.replace("/", "-"), domain=domain, kind="code",
                       prompt=task.prompt, entry_point=task.entry_point, test=task.test,
                       **extra).model_dump(by_alias=True, exclude_none=True)


async def _wait_job(s, topics, job_id: str, log: Path, timeout_s: float = 120.0) -> dict:
    """Poll the jobs topic for the job's JobCompleted; its payload."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in await events(s, topics, "jobs"):
            if e.event_type == "JobCompleted" and e.payload.job_id == job_id:
                return e.payload.model_dump()
        await asyncio.sleep(0.5)
    raise AssertionError(f"job {job_id} did not complete in {timeout_s:.0f} s\n"
                         + log.read_text(errors="replace")[-3000:])


async def _wait_escalation(env: dict, job_id: str, timeout_s: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = rmo("escalations", "list", "--json", env=env)
        assert out.returncode == 0, out.stderr
        found = orjson.loads(out.stdout)
        if found:
            return found
        await asyncio.sleep(0.5)
    status = rmo("job", "status", job_id, env=env)
    raise AssertionError(f"no escalation was raised:\n{status.stdout}{status.stderr}")


def _submit(tmp_path: Path, env: dict, job: dict) -> None:
    path = tmp_path / f"{job['job_id']}.json"
    path.write_bytes(orjson.dumps(job))
    out = rmo("job", "submit", str(path), env=env)
    assert out.returncode == 0 and out.stdout.strip() == job["job_id"], out.stdout + out.stderr


def _verify(s, path: Path | None) -> None:
    """`rmo replay --verify` into ``{namespace}-r...`` (the tests delete those keys)."""
    target = f"{s.namespace}-r{secrets.token_hex(3)}"
    extra = {"RMO_PROVIDERS_FILE": str(path)} if path else {}
    out = rmo("replay", "--verify", "--namespace", target, "--json", env=cli_env(s, **extra))
    assert out.returncode == 0, out.stdout + out.stderr
    assert orjson.loads(out.stdout)["differences"] == []


async def test_job_fans_out_after_dependencies_fans_in_and_replays(settings, topics, tmp_path):
    path = providers_file(tmp_path, "providers:\n" + sim("good", accuracy=1.0))
    s = settings.model_copy(update={"providers_file": path, "sandbox": "off",
                                    "validator_levels": ("syntax", "tests")})
    problems = humaneval_tasks(4)
    subtasks = [_code(problems[0], "development"), _code(problems[1], "development"),
                _code(problems[2], "security", priority=9), _code(problems[3], "security")]
    deps = [subtasks[0]["id"], subtasks[2]["id"]]
    subtasks.append({"id": "summary", "domain": "testing", "kind": "text",
                     "prompt": "Summarise the two solutions.", "depends_on": deps})
    budget = 200_000
    job = {"job_id": "job-fan", "budget_tokens": budget, "reserve_tokens": 20_000,
           "subtasks": subtasks}
    env = cli_env(s)
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    try:
        with worker(s, tmp_path) as log:
            _submit(tmp_path, env, job)
            done = await _wait_job(s, topics, "job-fan", log)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)
            status = rmo("job", "status", "job-fan", "--json", env=env)
            listed = orjson.loads(rmo("job", "list", "--json", env=env).stdout)
        assert [(j["job_id"], j["phase"], j["accepted"]) for j in listed] == [("job-fan", "done", 5)]
        assert status.returncode == 0, status.stderr
        report = orjson.loads(status.stdout)
        assert report["phase"] == "done" and report["status"] == "completed"

        assert done["status"] == "completed"
        assert set(done["artefacts"]) == {x["id"] for x in subtasks}
        masters = {m["domain"]: m for m in done["masters"]}
        assert set(masters) == {"development", "security", "testing"}
        # the active budget is split exactly, and what was used stays within it
        assert sum(m["tokens_allocated"] for m in masters.values()) == budget - 20_000
        assert all(m["tokens_used"] <= m["tokens_allocated"] for m in masters.values())
        assert done["tokens_used"] <= budget
        assert masters["development"]["passed"] == 2 and masters["security"]["passed"] == 2

        log_events = await events(s, topics, "jobs")
        kinds = [(e.event_type, getattr(e.payload, "subtask_id", None)) for e in log_events
                 if e.payload.job_id == "job-fan"]
        # the dependent subtask is assigned only after both its dependencies completed
        assigned = kinds.index(("WorkAssigned", "summary"))
        for dep in deps:
            assert kinds.index(("SubtaskCompleted", dep)) < assigned
        tasks = {e.payload.task_id: e for e in await events(s, topics, "tasks")
                 if e.event_type == "TaskSubmitted"}
        summary = tasks["job-fan.summary"]
        assert summary.correlation_id == "job-fan"
        assert all(done["artefacts"][d] in summary.payload.prompt for d in deps)
        # each subtask's cap is what its WorkAssigned held
        caps = {e.payload.task_id: e.payload.budget_tokens for e in log_events
                if e.event_type == "WorkAssigned"}
        assert all(tasks[t].payload.budget_tokens == c for t, c in caps.items())
        out = rmo("job", "report", "job-fan", "--out", str(tmp_path / "report"), "--json", env=env)
        assert out.returncode == 0, out.stderr
        written = orjson.loads(out.stdout)
        md = Path(written["markdown"]).read_text()
        for section in ("## Executive summary", "## Masters", "## Timeline", "## Artefacts"):
            assert section in md
        assert "Outcome: completed" in md and "| security |" in md
        page = Path(written["html"]).read_text()
        assert 'id="plot-budget-flow"' in page and 'id="plot-timeline"' in page
        assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
        _verify(s, path)
    finally:
        async for key in redis.scan_iter(f"{s.namespace}-r*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def test_failed_subtask_escalates_and_a_persons_answer_completes_the_job(settings, topics, tmp_path):
    # accuracy 0: every answer is wrong, so the code subtask fails validation
    path = providers_file(tmp_path, "providers:\n" + sim("wrong", accuracy=0.0))
    # the tests level runs the code (in the bwrap sandbox): a wrong answer fails it
    s = settings.model_copy(update={"providers_file": path, "validator_levels": ("syntax", "tests")})
    [problem] = humaneval_tasks(1)
    first = _code(problem, "development")
    job = {"job_id": "job-esc", "subtasks": [
        first, {"id": "review", "domain": "testing", "kind": "text", "prompt": "Review it.",
                "depends_on": [first["id"]]}]}
    env = cli_env(s)
    answer = tmp_path / "answer.py"
    answer.write_text("def fixed():\n    return 'by hand'\n")
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    try:
        with worker(s, tmp_path) as log:
            _submit(tmp_path, env, job)
            [esc] = await _wait_escalation(env, "job-esc")
            assert (esc["job_id"], esc["subtask_id"], esc["reason"]) == \
                ("job-esc", first["id"], "subtask_failed")
            raised = [e for e in await events(s, topics, "system") if e.event_type == "EscalationRaised"]
            assert [e.payload.escalation_id for e in raised] == [esc["escalation_id"]]
            # nothing runs until a person answers: a poller can stop here
            waiting = orjson.loads(rmo("job", "status", "job-esc", "--json", env=env).stdout)
            assert waiting["phase"] == "running" and waiting["awaiting_operator"] is True
            out = rmo("escalations", "resolve", esc["escalation_id"], "--answer", str(answer), env=env)
            assert out.returncode == 0, out.stderr
            done = await _wait_job(s, topics, "job-esc", log)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)
        assert done["status"] == "completed"
        assert done["artefacts"][first["id"]] == answer.read_text()
        review = next(e.payload for e in await events(s, topics, "tasks")
                      if e.event_type == "TaskSubmitted" and e.payload.task_id == "job-esc.review")
        assert "by hand" in review.prompt  # the dependent got the person's answer
        masters = {m["domain"]: m for m in done["masters"]}
        assert masters["development"]["failed"] == 1 and masters["development"]["resolved"] == 1
        again = rmo("escalations", "resolve", esc["escalation_id"], "--skip", env=env)
        assert again.returncode == 1 and "no open escalation" in again.stderr
        assert orjson.loads(rmo("escalations", "list", "--json", env=env).stdout) == []
        ended = orjson.loads(rmo("job", "status", "job-esc", "--json", env=env).stdout)
        assert ended["phase"] == "done" and ended["awaiting_operator"] is False
        _verify(s, path)
    finally:
        async for key in redis.scan_iter(f"{s.namespace}-r*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def test_a_small_budget_escalates_instead_of_overspending(settings, topics, tmp_path):
    path = providers_file(tmp_path, "providers:\n" + sim("good", accuracy=1.0))
    s = settings.model_copy(update={"providers_file": path, "sandbox": "off",
                                    "validator_levels": ("syntax",)})
    problems = humaneval_tasks(6)
    # one call's worst case (about 1,700 tokens for these prompts) fits the active budget, a
    # call uses about 150: subtasks run one at a time, waiting for the budget the previous
    # one did not use, until what is left is below a call's worst case
    budget = 2_400
    job = {"job_id": "job-small", "budget_tokens": budget, "reserve_tokens": 100,
           "subtasks": [_code(p, "development") for p in problems]}
    env = cli_env(s)
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    try:
        with worker(s, tmp_path) as log:
            _submit(tmp_path, env, job)
            deadline = time.monotonic() + 120
            while True:
                st = orjson.loads(rmo("job", "status", "job-small", "--json", env=env).stdout or "null")
                if st and not any(x["status"] in ("running", "waiting") for x in st["subtasks"]):
                    break
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                await asyncio.sleep(0.5)
            assert await wait_caught_up(s, topics, redis, timeout_s=60)
        reasons = {x["subtask_id"]: x["detail"] for x in st["subtasks"] if x["status"] == "escalated"}
        assert reasons, st
        assert any("reserve denied" in d for d in reasons.values())
        spent = sum(e.payload.tokens for e in await events(s, topics, "tasks")
                    if e.event_type == "TaskCompleted" and e.payload.task_id.startswith("job-small."))
        assert 0 < spent <= budget
        assert st["tokens_used"] == spent
        _verify(s, path)
    finally:
        async for key in redis.scan_iter(f"{s.namespace}-r*", count=1000):
            await redis.delete(key)
        await redis.aclose()


def test_a_cyclic_job_is_refused_naming_the_cycle(settings, tmp_path):
    job = {"job_id": "job-cycle", "subtasks": [
        {"id": "a", "domain": "d", "kind": "text", "prompt": "x", "depends_on": ["b"]},
        {"id": "b", "domain": "d", "kind": "text", "prompt": "y", "depends_on": ["a"]}]}
    path = tmp_path / "cycle.json"
    path.write_bytes(orjson.dumps(job))
    out = rmo("job", "submit", str(path), env=cli_env(settings))
    assert out.returncode == 2
    assert "dependency cycle: a -> b -> a" in out.stderr and len(out.stderr.strip().splitlines()) == 1


async def test_fan_in_is_exactly_once_across_worker_sigkills(settings, topics, tmp_path):
    # a restarted worker rejoins once the killed member's session ends: a short one
    session = {"RMO_SESSION_TIMEOUT_S": "3"}
    path = providers_file(tmp_path, "providers:\n" + sim("good", accuracy=1.0))
    s = settings.model_copy(update={"providers_file": path, "sandbox": "off",
                                    "validator_levels": ("syntax",)})
    domains = ("development", "security", "inventory", "cicd")
    code = [_code(p, domains[i % 4]) for i, p in enumerate(humaneval_tasks(40))]
    reviews = [{"id": f"review-{c['id']}", "domain": "testing", "kind": "text",
                "prompt": f"Review {c['id']}.", "depends_on": [c["id"]]} for c in code]
    summary = {"id": "summary", "domain": "monitoring", "kind": "text", "prompt": "Summarise.",
               "depends_on": [r["id"] for r in reviews]}
    subtasks = [*code, *reviews, summary]
    job = {"job_id": "job-kill", "budget_tokens": 5_000_000, "reserve_tokens": 25_000,
           "subtasks": subtasks}
    env = cli_env(s)
    keys = Keys(s.namespace)
    log = tmp_path / "worker.log"
    redis = Redis.from_url(s.require_redis(), decode_responses=True)
    proc = spawn_worker(s, log, extra_env=session)
    kills = []
    try:
        _submit(tmp_path, env, job)
        # kill while subtasks are in flight: at a quarter and at two thirds accepted
        for point in (len(subtasks) // 4, 2 * len(subtasks) // 3):
            deadline = time.monotonic() + 120
            while True:
                raw = await redis.get(keys.job("job-kill"))
                accepted = 0 if raw is None else sum(
                    x.status in ("passed", "unverified") for x in JobState.model_validate_json(raw).subs.values())
                if accepted >= point:
                    break
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                await asyncio.sleep(0.05)
            kill_worker(proc)
            kills.append(accepted)
            proc = spawn_worker(s, log, extra_env=session)
        done = await _wait_job(s, topics, "job-kill", log)
        assert await wait_caught_up(s, topics, redis, timeout_s=60)
    finally:
        stop_worker(proc)
    try:
        assert kills[-1] < len(subtasks), f"the job finished before the last kill: {kills}"
        assert done["status"] == "completed" and len(done["artefacts"]) == len(subtasks)
        job_events = [e for e in await events(s, topics, "jobs") if e.payload.job_id == "job-kill"]
        by_type: dict[str, set[str]] = {}
        for e in job_events:
            by_type.setdefault(e.event_type, set()).add(e.event_id)
        # a re-run after a kill may produce a record again, always under the same id
        assert len(by_type["JobCompleted"]) == 1
        assert len(by_type["WorkAssigned"]) == len(subtasks)
        assert len(by_type["SubtaskCompleted"]) == len(subtasks)
        submitted = {e.event_id for e in await events(s, topics, "tasks")
                     if e.event_type == "TaskSubmitted" and e.payload.task_id.startswith("job-kill.")}
        assert len(submitted) == len(subtasks)
        # the budget reconciles: what the masters used is what the distinct verdicts said
        verdicts = {e.event_id: e.payload.tokens for e in job_events if e.event_type == "SubtaskCompleted"}
        assert done["tokens_used"] == sum(verdicts.values())
        state = JobState.model_validate_json(await redis.get(keys.job("job-kill")))
        assert all(m.held_tokens == 0 for m in state.masters.values())
        _verify(s, path)
    finally:
        async for key in redis.scan_iter(f"{s.namespace}-r*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def test_demo_job_with_a_fifth_of_the_budget_escalates_without_overspending(settings, topics, tmp_path):
    env = cli_env(settings)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    try:
        _demo_job(settings, env, tmp_path)
    finally:
        async for key in redis.scan_iter(f"{settings.namespace}-r*", count=1000):
            await redis.delete(key)
        await redis.aclose()


def _demo_job(settings, env: dict, tmp_path: Path) -> None:
    out = rmo("demo", "--job", "--limit", "6", "--budget-scale", "0.2", "--json",
              "--out", str(tmp_path), env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    result = orjson.loads(out.stdout)
    assert result["escalations"], result
    # the job waits for a person: open, nothing running, no JobCompleted yet
    assert result["awaiting_operator"] is True and result["job_completed"] is None
    assert result["tokens_used"] <= result["budget_tokens"]
    masters = {m["domain"] for m in result["masters"]}
    assert "testing" in masters and len(masters) >= 2
    for m in result["masters"]:
        assert m["tokens_used"] <= m["tokens_allocated"] + m["reserve_tokens_granted"]
        assert m["personal_tokens"] + m["workers_tokens"] == m["tokens_allocated"] - m["reserve_tokens_granted"]
    listed = orjson.loads(rmo("escalations", "list", "--json", env=env).stdout)
    assert {e["escalation_id"] for e in listed} == set(result["escalations"])
    md = Path(result["report"]["markdown"]).read_text()
    assert "Outcome: waiting for an operator" in md and "Where the tokens went: " in md
    # the report names who ran out and what the others left unused
    short = {x.split("(")[0].strip() for x in md.split("Out of budget: ", 1)[1].split(";")[0].split(",")}
    assert short and short <= masters, md[:2000]
    assert "## Token budget flow" in Path(result["report"]["html"]).read_text().replace(
        "<h2>Token budget flow</h2>", "## Token budget flow")
    _verify(settings, None)


async def test_a_job_past_its_deadline_expires_on_the_coordinators_tick(settings, topics, tmp_path):
    path = providers_file(tmp_path, "providers:\n" + sim("wrong", accuracy=0.0))
    s = settings.model_copy(update={"providers_file": path, "validator_levels": ("syntax", "tests")})
    [problem] = humaneval_tasks(1)
    first = _code(problem, "development")
    # the code subtask fails once and escalates; nobody answers it, so the deadline ends the job
    job = {"job_id": "job-late", "deadline_s": 2, "max_attempts": 1, "subtasks": [
        first, {"id": "after", "domain": "testing", "kind": "text", "prompt": "Then this.",
                "depends_on": [first["id"]]}]}
    env = cli_env(s)
    with worker(s, tmp_path) as log:
        _submit(tmp_path, env, job)
        done = await _wait_job(s, topics, "job-late", log)
    assert done["status"] == "expired" and "deadline" in done["reason"]
    status = orjson.loads(rmo("job", "status", "job-late", "--json", env=env).stdout)
    assert {x["subtask_id"]: x["status"] for x in status["subtasks"]} == \
        {first["id"]: "skipped", "after": "skipped"}
    assert orjson.loads(rmo("escalations", "list", "--json", env=env).stdout) == []
    deadlines = [e for e in await events(s, topics, "jobs") if e.event_type == "JobDeadlinePassed"]
    assert len({e.event_id for e in deadlines}) == 1
