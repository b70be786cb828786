"""The Cortex job state machine (agents/cortex/job.py) and the coordinator's ``step``
(agents/cortex/coordinator.py), driven with the events the pipeline would send: each
``SubtaskCompleted`` is built from an emitted ``TaskSubmitted`` (its task id, its job ref, and
usage within its ``budget_tokens``) as the validator builds it.

Covered: dependency ordering (a subtask is submitted only once every dependency has an
accepted answer, which its prompt carries; independent subtasks go out together); the
masters' allocation (sums to budget minus reserve exactly, in proportion to the estimates);
reconciliation (randomized plans and usage never spend more than the job's budget); the
reserve (priority threshold, higher priority first); a short master waiting for its running
subtasks rather than escalating; failures escalating on the ``system`` role; a person's
answer or skip; exactly one ``JobCompleted`` and no effect from late or duplicate events;
goal-only jobs (the json planning task, one re-ask avoiding the first planner, failure
after a second bad plan); the per-master aggregate; and ``step``'s determinism across JSON
round trips of the state, which replay relies on.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.cortex import allocation
from agents.cortex import job as machine
from agents.cortex.coordinator import step
from agents.cortex.job import JobState, Out
from agents.cortex.plan import PLAN_SCHEMA
from models.codec import decode, encode, make_event
from models.events import Envelope, TaskSubmitted
from models.jobs import (
    COORDINATOR,
    PLAN_SUBTASK,
    EscalationRaised,
    EscalationResolved,
    JobCompleted,
    JobPlanned,
    JobSubmitted,
    MasterActivated,
    SubtaskCompleted,
    SubtaskSpec,
    WorkAssigned,
)

AT = "2024-01-01T00:00:00+00:00"
WHEN = datetime(2024, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- helpers


def sub(id: str, *deps: str, domain: str = "d", **kw) -> SubtaskSpec:
    return SubtaskSpec(id=id, domain=domain, depends_on=list(deps), kind=kw.pop("kind", "text"),
                       prompt=kw.pop("prompt", f"task {id}"), **kw)


def make_job(*subtasks: SubtaskSpec, **kw) -> JobSubmitted:
    return JobSubmitted(job_id=kw.pop("job_id", "j1"), subtasks=list(subtasks) or None, **kw)


def of(outs: list[Out], kind: type) -> list:
    return [o.payload for o in outs if isinstance(o.payload, kind)]


def tasks(outs: list[Out]) -> dict[str, TaskSubmitted]:
    """The subtasks submitted, by subtask id."""
    return {t.job.subtask_id: t for t in of(outs, TaskSubmitted)}


def verdict(task: TaskSubmitted, status: str = "passed", answer: str | None = None,
            tokens: int = 0, provider: str | None = "p1", cost_usd: float = 0.0,
            tests: tuple[int, int] = (0, 0)) -> SubtaskCompleted:
    """The validator's SubtaskCompleted for ``task`` (models/jobs.py; agents/validator.py)."""
    if answer is None and status in ("passed", "unverified"):
        answer = f"answer of {task.job.subtask_id}"
    return SubtaskCompleted(job_id=task.job.job_id, subtask_id=task.job.subtask_id,
                            task_id=task.task_id, status=status, answer=answer, provider=provider,
                            tokens=tokens, cost_usd=cost_usd, tests_passed=tests[0],
                            tests_total=tests[1])


def fail(state: JobState, task: TaskSubmitted, status: str = "failed",
         **kw) -> list[Out]:
    """``task`` fails, and so does every re-submission of its subtask, until the subtask is
    escalated: everything emitted on the way."""
    emitted: list[Out] = []
    for _ in range(20):
        outs = machine.completed(state, verdict(task, status, **kw))
        emitted += outs
        escalated = [e for e in of(outs, EscalationRaised) if e.subtask_id == task.job.subtask_id]
        retry = tasks(outs).get(task.job.subtask_id)
        if escalated or retry is None:
            return emitted
        task, kw = retry, {**kw, "tokens": 0}
    raise AssertionError(f"subtask {task.job.subtask_id} never escalated")


def resolution(esc: EscalationRaised, answer: str | None = None,
               skipped: bool = False) -> EscalationResolved:
    return EscalationResolved(escalation_id=esc.escalation_id, job_id=esc.job_id,
                              subtask_id=esc.subtask_id, answer=answer, skipped=skipped)


def floor(prompt: str, schema: dict | None = None) -> int:
    return allocation.call_tokens(prompt, schema)


def plan_answer(*items: dict) -> str:
    return orjson.dumps({"subtasks": list(items)}).decode()


def the(items: list):
    assert len(items) == 1, items
    return items[0]


# --------------------------------------------------------------------------- dependency order


def test_independent_subtasks_are_emitted_together():
    _, outs = machine.start(make_job(sub("a"), sub("b"), sub("c", "a", "b")), AT)
    assert set(tasks(outs)) == {"a", "b"}


def test_a_subtask_waits_until_every_dependency_is_accepted():
    state, outs = machine.start(make_job(sub("a"), sub("b"), sub("c", "a", "b")), AT)
    t = tasks(outs)
    after_a = machine.completed(state, verdict(t["a"], answer="ALPHA"))
    assert tasks(after_a) == {}
    after_b = machine.completed(state, verdict(t["b"], answer="BETA"))
    assert set(tasks(after_b)) == {"c"}


def test_a_dependents_prompt_carries_its_dependencies_answers():
    state, outs = machine.start(make_job(sub("a"), sub("b"), sub("c", "a", "b")), AT)
    t = tasks(outs)
    machine.completed(state, verdict(t["a"], answer="ALPHA-42"))
    c = tasks(machine.completed(state, verdict(t["b"], answer="BETA-17")))["c"]
    assert c.prompt.startswith("task c")
    assert "ALPHA-42" in c.prompt and "BETA-17" in c.prompt
    assert "Accepted answer of a" in c.prompt and "Accepted answer of b" in c.prompt


def test_an_unverified_answer_is_accepted_for_dependents():
    state, outs = machine.start(make_job(sub("a"), sub("b", "a")), AT)
    b = tasks(machine.completed(state, verdict(tasks(outs)["a"], "unverified", answer="U")))["b"]
    assert "U" in b.prompt


def test_a_code_dependents_prompt_stays_python():
    prefix = "def f():\n    \"\"\"Return 1.\"\"\"\n"
    state, outs = machine.start(make_job(sub("a"), sub("b", "a", kind="code", prompt=prefix)), AT)
    b = tasks(machine.completed(state, verdict(tasks(outs)["a"], answer="line1\nline2")))["b"]
    # the answers follow the module prefix as comments: the prompt still ends where the
    # completion goes, and the sim's answer book still finds the prefix (answers.py)
    assert b.prompt.startswith(prefix)
    assert b.prompt.endswith("# line1\n# line2\n")
    compile(b.prompt + "    return 1\n", "<prompt>", "exec")


def test_answer_slots_take_the_dependencys_answer_in_prompt_and_test():
    state, outs = machine.start(make_job(
        sub("a"), sub("b", "a", kind="code", prompt="# uses:\n{{answer:a}}\ndef g():\n",
                      entry_point="g", test="{{answer:a}}\ndef check(candidate):\n    candidate()\n")), AT)
    b = tasks(machine.completed(state, verdict(tasks(outs)["a"], answer="X = 1")))["b"]
    assert b.prompt == "# uses:\nX = 1\ndef g():\n"
    assert b.test == "X = 1\ndef check(candidate):\n    candidate()\n"


def test_an_answer_slot_naming_no_dependency_is_refused():
    with pytest.raises(ValueError, match="names no subtask it depends on"):
        make_job(sub("a"), sub("b", prompt="{{answer:a}}"))


def test_a_failing_subtask_is_assigned_again_avoiding_its_providers_then_escalates():
    state, outs = machine.start(make_job(sub("a"), max_attempts=3), AT)
    first = tasks(outs)["a"]
    assert first.task_id == "j1.a" and first.job.avoid_providers == []
    second = tasks(machine.completed(state, verdict(first, "failed", provider="p1")))["a"]
    assert second.task_id == "j1.a.2" and second.job.avoid_providers == ["p1"]
    third = tasks(machine.completed(state, verdict(second, "failed", provider="p2")))["a"]
    assert third.task_id == "j1.a.3" and third.job.avoid_providers == ["p1", "p2"]
    last = machine.completed(state, verdict(third, "failed", provider="p1"))
    assert tasks(last) == {} and "after 3 attempt(s)" in the(of(last, EscalationRaised)).detail
    # a verdict of an earlier attempt is late: it changes nothing
    assert machine.completed(state, verdict(first, "passed")) == []


def test_a_chain_runs_one_subtask_at_a_time():
    state, outs = machine.start(make_job(sub("a"), sub("b", "a"), sub("c", "b")), AT)
    seen = []
    while t := tasks(outs):
        assert len(t) == 1
        (sid, task), = t.items()
        seen.append(sid)
        outs = machine.completed(state, verdict(task))
    assert seen == ["a", "b", "c"]
    assert the(of(outs, JobCompleted)).status == "completed"


def test_a_submitted_subtask_is_tied_to_its_job():
    _, outs = machine.start(make_job(sub("a", domain="math", priority=7), priority=4), AT)
    t = tasks(outs)["a"]
    assert t.task_id == "j1.a"
    assert (t.job.job_id, t.job.subtask_id, t.job.domain) == ("j1", "a", "math")
    assert t.priority == 7
    task_out = next(o for o in outs if isinstance(o.payload, TaskSubmitted))
    assert (task_out.role, task_out.key) == ("tasks", "j1.a")
    assigned = the(of(outs, WorkAssigned))
    assert (assigned.task_id, assigned.subtask_id, assigned.domain) == ("j1.a", "a", "math")


def test_a_subtask_without_priority_takes_the_jobs():
    _, outs = machine.start(make_job(sub("a"), priority=6), AT)
    assert tasks(outs)["a"].priority == 6


def test_the_plan_is_recorded_before_masters_and_work():
    _, outs = machine.start(make_job(sub("a", domain="x"), sub("b", domain="y")), AT)
    kinds = [type(o.payload).__name__ for o in outs]
    assert kinds[0] == "JobPlanned"
    assert kinds[1:3] == ["MasterActivated", "MasterActivated"]
    planned = outs[0].payload
    assert [s.id for s in planned.subtasks] == ["a", "b"] and planned.planner is None


# --------------------------------------------------------------------------- allocation


def test_masters_tokens_sum_to_budget_minus_reserve():
    job = make_job(sub("a", domain="x", estimated_tokens=1),
                   sub("b", domain="y", estimated_tokens=1),
                   sub("c", domain="z", estimated_tokens=1),
                   budget_tokens=100_007, reserve_tokens=7)
    _, outs = machine.start(job, AT)
    masters = of(outs, MasterActivated)
    assert sum(m.tokens for m in masters) == 100_000
    assert sorted(m.tokens for m in masters) == [33_333, 33_333, 33_334]


def test_masters_tokens_are_proportional_to_estimates():
    job = make_job(sub("a", domain="x", estimated_tokens=10_000),
                   sub("b", domain="y", estimated_tokens=20_000),
                   sub("c", domain="y", estimated_tokens=10_000),
                   budget_tokens=50_000, reserve_tokens=10_000)
    _, outs = machine.start(job, AT)
    by = {m.domain: m for m in of(outs, MasterActivated)}
    assert by["x"].tokens == 10_000 and by["y"].tokens == 30_000
    assert (by["x"].subtasks, by["y"].subtasks) == (1, 2)


def test_a_masters_allocation_splits_into_personal_and_workers():
    job = make_job(sub("a", estimated_tokens=5), budget_tokens=10_000, personal_share=0.62)
    m = the(of(machine.start(job, AT)[1], MasterActivated))
    assert (m.personal_tokens, m.workers_tokens) == (6_200, 3_800)


def test_without_estimates_the_prompt_length_weighs():
    long_prompt = "x" * 10_000
    job = make_job(sub("a", domain="x"), sub("b", domain="y", prompt=long_prompt),
                   budget_tokens=1_000_000)
    by = {m.domain: m.tokens for m in of(machine.start(job, AT)[1], MasterActivated)}
    assert by["y"] > by["x"]
    assert by["x"] + by["y"] == 1_000_000
    assert by["y"] / by["x"] == pytest.approx(floor(long_prompt) / floor("task a"), rel=1e-3)


def test_an_unlimited_job_has_unlimited_masters_and_caps():
    _, outs = machine.start(make_job(sub("a")), AT)
    assert the(of(outs, MasterActivated)).tokens is None
    t = tasks(outs)["a"]
    assert t.budget_tokens is None and t.max_cost_usd is None


def test_a_usd_budget_is_split_and_capped():
    job = make_job(sub("a", domain="x", estimated_tokens=1),
                   sub("b", domain="y", estimated_tokens=3), budget_usd=4.0, reserve_usd=0.5)
    _, outs = machine.start(job, AT)
    by = {m.domain: m.usd for m in of(outs, MasterActivated)}
    assert by == {"x": pytest.approx(0.875), "y": pytest.approx(2.625)}
    assert tasks(outs)["a"].max_cost_usd == pytest.approx(0.875)


def test_one_master_caps_its_subtasks_from_its_remaining_share():
    job = make_job(sub("a"), sub("b"), sub("c"), sub("d"), budget_tokens=40_000)
    _, outs = machine.start(job, AT)
    caps = [t.budget_tokens for t in tasks(outs).values()]
    assert sum(caps) <= 40_000
    assert all(c >= floor("task a") for c in caps)


# --------------------------------------------------------------------------- reconciliation


def _random_plan(rng: random.Random) -> list[SubtaskSpec]:
    n = rng.randint(1, 8)
    domains = ["x", "y", "z"][:rng.randint(1, 3)]
    specs = []
    for i in range(n):
        deps = [f"s{j}" for j in range(i) if rng.random() < 0.3]
        specs.append(sub(f"s{i}", *deps, domain=rng.choice(domains),
                         estimated_tokens=rng.choice([None, rng.randint(1, 5_000)]),
                         priority=rng.choice([None, rng.randint(1, 10)]),
                         prompt="p" * rng.randint(1, 300)))
    return specs


def _drive(state: JobState, outs: list[Out], rng: random.Random) -> tuple[list[Out], dict]:
    """Runs a job to its end the way the pipeline would, with random usage within each cap
    and random verdicts; a person answers or skips every escalation. Returns every event
    emitted and what the subtasks used."""
    emitted: list[Out] = []
    running: dict[str, TaskSubmitted] = {}
    escalations: list[EscalationRaised] = []
    used = {"tokens": 0, "usd": 0.0}

    def take(new: list[Out]) -> None:
        emitted.extend(new)
        for t in of(new, TaskSubmitted):
            running[t.task_id] = t
        escalations.extend(of(new, EscalationRaised))

    take(outs)
    for _ in range(500):
        if state.phase == "done":
            break
        if running and (not escalations or rng.random() < 0.7):
            t = running.pop(rng.choice(sorted(running)))
            cap = t.budget_tokens
            tokens = rng.randint(0, cap) if cap is not None else rng.randint(0, 10_000)
            cost = rng.uniform(0, t.max_cost_usd) if t.max_cost_usd is not None else 0.0
            used["tokens"] += tokens
            used["usd"] += cost
            status = rng.choice(["passed", "passed", "unverified", "failed", "budget_exceeded"])
            take(machine.completed(state, verdict(t, status, tokens=tokens, cost_usd=cost,
                                                  provider=rng.choice(["p1", "p2"]))))
        elif escalations:
            esc = escalations.pop(rng.randrange(len(escalations)))
            skip = rng.random() < 0.4
            take(machine.resolved(state, resolution(esc, None if skip else "by hand", skip)))
        else:
            break
    return emitted, used


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(1, 60_000),
       budget_usd=st.none() | st.floats(0.000_01, 5.0), reserve_share=st.floats(0.0, 0.9),
       min_priority=st.integers(1, 10))
def test_a_job_never_spends_more_than_its_budget(seed, budget, budget_usd, reserve_share,
                                                 min_priority):
    rng = random.Random(seed)
    reserve = min(int(budget * reserve_share), budget - 1)
    job = make_job(*_random_plan(rng), budget_tokens=budget, reserve_tokens=reserve,
                   budget_usd=budget_usd,
                   reserve_usd=0.0 if budget_usd is None else budget_usd * reserve_share,
                   reserve_min_priority=min_priority)
    state, outs = machine.start(job, AT)
    emitted, used = _drive(state, outs, rng)
    assert state.phase == "done", "the job must end once every escalation is answered"
    result = the(of(emitted, JobCompleted))
    assert result.tokens_used == used["tokens"] <= budget
    assert sum(m.tokens for m in of(emitted, MasterActivated)) == budget - reserve
    for m in result.masters:
        assert m.tokens_used <= m.tokens_allocated
    granted = sum(w.from_reserve_tokens for w in of(emitted, WorkAssigned))
    assert result.reserve_tokens_left == reserve - granted >= 0
    assert sum(m.reserve_tokens_granted for m in result.masters) == granted
    if budget_usd is not None:
        assert result.usd_used == pytest.approx(used["usd"], abs=1e-5)
        assert result.usd_used <= budget_usd


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(30_000, 300_000))
def test_a_goal_only_job_never_spends_more_than_its_budget(seed, budget):
    rng = random.Random(seed)
    job = JobSubmitted(job_id="g1", goal="do it", budget_tokens=budget,
                       reserve_tokens=budget // 10)
    state, outs = machine.start(job, AT)
    plan_task = tasks(outs)[PLAN_SUBTASK]
    specs = _random_plan(rng)
    answer = plan_answer(*[{"id": s.id, "domain": s.domain, "prompt": s.prompt,
                            "depends_on": s.depends_on} for s in specs])
    spent = rng.randint(0, plan_task.budget_tokens)
    outs = machine.completed(state, verdict(plan_task, answer=answer, tokens=spent))
    emitted, used = _drive(state, outs, rng)
    result = the(of(emitted, JobCompleted))
    assert result.tokens_used == spent + used["tokens"] <= budget
    assert sum(m.tokens for m in of(emitted, MasterActivated)) == budget - budget // 10 - spent


def test_a_settled_subtask_returns_its_unused_cap_to_its_master():
    job = make_job(sub("a"), sub("b", "a"), budget_tokens=10_000)
    state, outs = machine.start(job, AT)
    a = tasks(outs)["a"]
    assert a.budget_tokens == 5_000  # shared with b, which waits for a
    b = tasks(machine.completed(state, verdict(a, tokens=3_000)))["b"]
    assert b.budget_tokens == 7_000


# --------------------------------------------------------------------------- reserve


def _short_masters_job(*specs: SubtaskSpec, reserve: int, min_priority: int = 8) -> JobSubmitted:
    """Every master gets 1 token: any subtask needs the reserve."""
    domains = {s.domain for s in specs}
    return make_job(*specs, budget_tokens=reserve + len(domains), reserve_tokens=reserve,
                    reserve_min_priority=min_priority)


def test_the_reserve_is_granted_to_a_priority_at_its_threshold():
    need = floor("task a") - 1
    job = _short_masters_job(sub("a", priority=8, estimated_tokens=1), reserve=need + 5)
    state, outs = machine.start(job, AT)
    assert of(outs, EscalationRaised) == []
    assert the(of(outs, WorkAssigned)).from_reserve_tokens == need
    assert tasks(outs)["a"].budget_tokens == floor("task a")
    assert state.reserve_tokens == 5


def test_the_reserve_is_denied_below_its_priority():
    job = _short_masters_job(sub("a", priority=7, estimated_tokens=1), reserve=50_000)
    state, outs = machine.start(job, AT)
    assert tasks(outs) == {}
    esc = the(of(outs, EscalationRaised))
    assert esc.reason == "budget_exhausted" and "below the reserve's 8" in esc.detail
    assert state.reserve_tokens == 50_000


def test_the_higher_priority_gets_the_reserve_first():
    need = floor("task lo") - 1  # "task lo" and "task hi": one length, one need
    job = _short_masters_job(sub("lo", domain="x", priority=8, estimated_tokens=1),
                             sub("hi", domain="y", priority=9, estimated_tokens=1),
                             reserve=need + need // 2)
    _, outs = machine.start(job, AT)
    assert set(tasks(outs)) == {"hi"}
    esc = the(of(outs, EscalationRaised))
    assert esc.subtask_id == "lo" and "reserve is exhausted" in esc.detail
    assert the(of(outs, WorkAssigned)).from_reserve_tokens == need


def test_two_short_subtasks_both_get_the_reserve_when_it_suffices():
    need = floor("task lo") - 1
    job = _short_masters_job(sub("lo", domain="x", priority=8, estimated_tokens=1),
                             sub("hi", domain="y", priority=9, estimated_tokens=1),
                             reserve=2 * need)
    state, outs = machine.start(job, AT)
    assert set(tasks(outs)) == {"hi", "lo"} and of(outs, EscalationRaised) == []
    assert state.reserve_tokens == 0


def test_reserve_grants_appear_in_the_aggregate():
    need = floor("task a") - 1
    job = _short_masters_job(sub("a", priority=9, estimated_tokens=1), reserve=need)
    state, outs = machine.start(job, AT)
    done = machine.completed(state, verdict(tasks(outs)["a"], tokens=floor("task a")))
    result = the(of(done, JobCompleted))
    assert result.masters[0].reserve_tokens_granted == need
    assert result.reserve_tokens_left == 0
    assert result.tokens_used == result.budget_tokens == need + 1


# --------------------------------------------------------------------------- waiting


def _tight_job() -> JobSubmitted:
    """One master with room for one call of its two same-sized subtasks at a time."""
    return make_job(sub("a"), sub("b"), budget_tokens=floor("task a") + 10)


def test_a_short_master_with_running_subtasks_waits():
    state, outs = machine.start(_tight_job(), AT)
    assert set(tasks(outs)) == {"a"}
    assert of(outs, EscalationRaised) == []
    assert state.subs["b"].status == "waiting"


def test_a_waiting_subtask_runs_when_the_running_one_frees_budget():
    state, outs = machine.start(_tight_job(), AT)
    after = machine.completed(state, verdict(tasks(outs)["a"], tokens=5))
    b = tasks(after)["b"]
    assert b.budget_tokens == floor("task a") + 5
    assert of(after, EscalationRaised) == []


def test_a_short_master_with_nothing_running_escalates():
    state, outs = machine.start(_tight_job(), AT)
    after = machine.completed(state, verdict(tasks(outs)["a"], tokens=floor("task a")))
    assert tasks(after) == {}
    esc = the(of(after, EscalationRaised))
    assert (esc.subtask_id, esc.reason) == ("b", "budget_exhausted")


# --------------------------------------------------------------------------- failures


def test_a_failed_subtask_escalates_on_the_system_role():
    state, outs = machine.start(make_job(sub("a"), sub("b", "a")), AT)
    after = fail(state, tasks(outs)["a"], tests=(1, 3))
    [out] = [o for o in after if isinstance(o.payload, EscalationRaised)]
    assert out.role == "system" and out.key == "j1"
    esc = out.payload
    assert (esc.job_id, esc.subtask_id, esc.reason) == ("j1", "a", "subtask_failed")
    assert "j1.a" in esc.detail and "1/3 tests passed" in esc.detail
    assert "b" not in tasks(after) and of(after, JobCompleted) == []


@pytest.mark.parametrize("status", ["rejected", "dead_lettered", "budget_exceeded"])
def test_any_status_but_passed_or_unverified_escalates(status):
    state, outs = machine.start(make_job(sub("a")), AT)
    after = fail(state, tasks(outs)["a"], status)
    assert the(of(after, EscalationRaised)).reason == "subtask_failed"


def test_a_failure_does_not_hold_up_independent_subtasks():
    state, outs = machine.start(make_job(sub("a"), sub("b"), sub("c", "b")), AT)
    t = tasks(outs)
    fail(state, t["a"])
    assert set(tasks(machine.completed(state, verdict(t["b"])))) == {"c"}


def test_a_resolved_answer_continues_the_job_and_reaches_dependents():
    state, outs = machine.start(make_job(sub("a"), sub("b", "a")), AT)
    esc = the(of(fail(state, tasks(outs)["a"]), EscalationRaised))
    after = machine.resolved(state, resolution(esc, answer="HUMAN-ANSWER-9"))
    b = tasks(after)["b"]
    assert "HUMAN-ANSWER-9" in b.prompt
    result = the(of(machine.completed(state, verdict(b)), JobCompleted))
    assert result.status == "completed"
    assert result.artefacts["a"] == "HUMAN-ANSWER-9"
    m = the(result.masters)
    assert (m.failed, m.resolved, m.passed) == (1, 1, 1)


def test_a_skip_skips_dependents_transitively_and_the_job_ends_partial():
    state, outs = machine.start(make_job(sub("a"), sub("b", "a"), sub("c", "b"), sub("d")), AT)
    t = tasks(outs)
    esc = the(of(fail(state, t["a"]), EscalationRaised))
    machine.completed(state, verdict(t["d"], answer="D"))
    after = machine.resolved(state, resolution(esc, skipped=True))
    assert tasks(after) == {}
    assert [state.subs[i].status for i in "abcd"] == ["skipped", "skipped", "skipped", "passed"]
    result = the(of(after, JobCompleted))
    assert result.status == "partial"
    assert result.artefacts == {"d": "D"}
    assert the(result.masters).skipped == 3


def test_a_skip_reaches_dependents_listed_before_their_dependencies():
    # c is listed first: skipping a must still skip b, then c, whatever the plan's order
    state, outs = machine.start(make_job(sub("c", "b"), sub("b", "a"), sub("a")), AT)
    esc = the(of(fail(state, tasks(outs)["a"]), EscalationRaised))
    after = machine.resolved(state, resolution(esc, skipped=True))
    assert [state.subs[i].status for i in "abc"] == ["skipped"] * 3
    assert the(of(after, JobCompleted)).status == "partial"


def test_a_budget_escalation_can_be_answered_by_a_person():
    job = _short_masters_job(sub("a", priority=2, estimated_tokens=1), sub("b", "a"), reserve=10)
    state, outs = machine.start(job, AT)
    esc = the(of(outs, EscalationRaised))
    assert esc.subtask_id == "a"
    after = machine.resolved(state, resolution(esc, answer="A-BY-HAND"))
    # b's master has 1 token too: it escalates in turn, having seen a's answer accepted
    assert the(of(after, EscalationRaised)).subtask_id == "b"


def test_a_resolution_for_another_escalation_changes_nothing():
    state, outs = machine.start(make_job(sub("a")), AT)
    esc = the(of(fail(state, tasks(outs)["a"]), EscalationRaised))
    wrong = EscalationResolved(escalation_id="other", job_id="j1", subtask_id="a", answer="x")
    assert machine.resolved(state, wrong) == []
    assert state.subs["a"].status == "escalated"
    assert of(machine.resolved(state, resolution(esc, answer="x")), JobCompleted)


# --------------------------------------------------------------------------- completion


def test_a_completed_job_emits_exactly_one_job_completed():
    state, outs = machine.start(make_job(sub("a"), sub("b")), AT)
    t = tasks(outs)
    first = machine.completed(state, verdict(t["a"]))
    second = machine.completed(state, verdict(t["b"]))
    assert of(first, JobCompleted) == []
    result = the(of(second, JobCompleted))
    assert result.status == "completed" and state.phase == "done"
    assert [o.discriminator for o in second if isinstance(o.payload, JobCompleted)] == ["completed"]


def test_events_after_completion_change_nothing():
    state, outs = machine.start(make_job(sub("a")), AT)
    a = tasks(outs)["a"]
    machine.completed(state, verdict(a, tokens=10))
    before = state.model_dump_json()
    assert machine.completed(state, verdict(a, tokens=10)) == []
    assert machine.completed(state, verdict(a, "failed", tokens=99)) == []
    assert machine.resolved(state, EscalationResolved(escalation_id="j1/a", job_id="j1",
                                                      subtask_id="a", skipped=True)) == []
    assert state.model_dump_json() == before


def test_a_duplicate_verdict_while_running_is_ignored():
    state, outs = machine.start(make_job(sub("a"), sub("b")), AT)
    a = tasks(outs)["a"]
    machine.completed(state, verdict(a, tokens=100))
    before = state.model_dump_json()
    assert machine.completed(state, verdict(a, tokens=100)) == []
    assert state.model_dump_json() == before
    assert state.masters["d"].used_tokens == 100


def test_a_verdict_for_an_unknown_subtask_or_task_is_ignored():
    state, outs = machine.start(make_job(sub("a")), AT)
    a = tasks(outs)["a"]
    ghost = SubtaskCompleted(job_id="j1", subtask_id="ghost", task_id="j1.ghost", status="passed")
    stale = SubtaskCompleted(job_id="j1", subtask_id="a", task_id="j1.a.old", status="passed")
    assert machine.completed(state, ghost) == []
    assert machine.completed(state, stale) == []
    assert state.subs["a"].status == "running"
    assert of(machine.completed(state, verdict(a)), JobCompleted)


def test_a_verdict_for_a_waiting_subtask_is_ignored():
    state, _ = machine.start(make_job(sub("a"), sub("b", "a")), AT)
    early = SubtaskCompleted(job_id="j1", subtask_id="b", task_id="j1.b", status="passed",
                             answer="too early")
    assert machine.completed(state, early) == []
    assert state.subs["b"].status == "waiting"


def test_the_aggregate_per_master():
    job = make_job(sub("a", domain="x", estimated_tokens=1),
                   sub("b", domain="x", estimated_tokens=1),
                   sub("c", domain="y", estimated_tokens=2), budget_tokens=40_000)
    state, outs = machine.start(job, AT)
    t = tasks(outs)
    machine.completed(state, verdict(t["a"], tokens=1_000, cost_usd=0.25))
    esc = the(of(fail(state, t["b"], tokens=500), EscalationRaised))
    machine.completed(state, verdict(t["c"], "unverified", tokens=2_000))
    result = the(of(machine.resolved(state, resolution(esc, skipped=True)), JobCompleted))
    by = {m.domain: m for m in result.masters}
    assert set(by) == {"x", "y"}
    x, y = by["x"], by["y"]
    assert (x.subtasks, x.passed, x.failed, x.skipped) == (2, 1, 1, 1)
    assert x.pass_rate == 0.5
    assert (x.tokens_allocated, x.tokens_used) == (20_000, 1_500)
    assert (x.personal_tokens, x.workers_tokens) == (12_400, 7_600)
    assert x.usd_used == pytest.approx(0.25)
    assert (y.subtasks, y.passed, y.pass_rate) == (1, 1, 1.0)
    assert (y.tokens_allocated, y.tokens_used) == (20_000, 2_000)
    assert result.tokens_used == 3_500 and result.budget_tokens == 40_000
    assert result.status == "partial"
    assert result.artefacts == {"a": "answer of a", "c": "answer of c"}


# --------------------------------------------------------------------------- goal-only jobs


def _goal_job(**kw) -> JobSubmitted:
    return JobSubmitted(job_id="g1", goal="write a tokenizer", budget_tokens=100_000,
                        reserve_tokens=10_000, **kw)


GOOD_PLAN = plan_answer({"id": "lex", "domain": "code", "prompt": "write the lexer",
                         "estimated_tokens": 1_000},
                        {"id": "doc", "domain": "docs", "prompt": "document it",
                         "depends_on": ["lex"], "estimated_tokens": 3_000})


def test_a_goal_only_job_first_submits_a_json_planning_task():
    state, outs = machine.start(_goal_job(domains=["code", "docs"]), AT)
    plan = tasks(outs)[PLAN_SUBTASK]
    assert plan.kind == "json" and plan.json_schema == PLAN_SCHEMA
    assert plan.task_id == "g1.plan"
    assert plan.job.domain == COORDINATOR and plan.job.avoid_providers == []
    assert "write a tokenizer" in plan.prompt and "code, docs" in plan.prompt
    assert plan.budget_tokens == int(90_000 * allocation.PLAN_SHARE)
    assert of(outs, JobPlanned) == [] and state.phase == "planning"


def test_a_good_plan_runs_with_what_planning_left():
    state, outs = machine.start(_goal_job(), AT)
    plan = tasks(outs)[PLAN_SUBTASK]
    after = machine.completed(state, verdict(plan, answer=GOOD_PLAN, tokens=2_000, provider="pA"))
    planned = the(of(after, JobPlanned))
    assert planned.planner == "pA" and planned.attempt == 1
    assert [s.id for s in planned.subtasks] == ["lex", "doc"]
    by = {m.domain: m.tokens for m in of(after, MasterActivated)}
    assert by == {"code": 22_000, "docs": 66_000}  # 90k - 2k used, 1:3
    assert set(tasks(after)) == {"lex"}
    assert state.phase == "running"


def test_a_planned_job_completes_with_the_coordinators_line():
    state, outs = machine.start(_goal_job(), AT)
    after = machine.completed(state, verdict(tasks(outs)[PLAN_SUBTASK], answer=GOOD_PLAN,
                                             tokens=2_000))
    doc = tasks(machine.completed(state, verdict(tasks(after)["lex"], tokens=500)))["doc"]
    result = the(of(machine.completed(state, verdict(doc, tokens=700)), JobCompleted))
    assert result.status == "completed"
    assert result.tokens_used == 3_200
    by = {m.domain: m for m in result.masters}
    assert by[COORDINATOR].tokens_used == 2_000 and by[COORDINATOR].passed == 1
    assert set(result.artefacts) == {"lex", "doc"}


def test_a_bad_plan_is_asked_again_avoiding_its_planner():
    state, outs = machine.start(_goal_job(), AT)
    first = tasks(outs)[PLAN_SUBTASK]
    after = machine.completed(state, verdict(first, answer="not json", tokens=1_000,
                                             provider="pA"))
    again = tasks(after)[PLAN_SUBTASK]
    assert again.task_id == "g1.plan.2"
    assert again.job.avoid_providers == ["pA"]
    assert again.kind == "json" and again.json_schema == PLAN_SCHEMA
    assert again.budget_tokens == 9_000 - 1_000
    assert of(after, JobCompleted) == []


def test_a_failed_planning_task_is_asked_again():
    state, outs = machine.start(_goal_job(), AT)
    after = machine.completed(state, verdict(tasks(outs)[PLAN_SUBTASK], "failed", provider="pA"))
    assert tasks(after)[PLAN_SUBTASK].job.avoid_providers == ["pA"]
    assert of(after, EscalationRaised) == []


def test_a_second_good_plan_runs_as_attempt_two():
    state, outs = machine.start(_goal_job(), AT)
    after = machine.completed(state, verdict(tasks(outs)[PLAN_SUBTASK], answer="{}",
                                             provider="pA"))
    after = machine.completed(state, verdict(tasks(after)[PLAN_SUBTASK], answer=GOOD_PLAN,
                                             provider="pB"))
    planned = the(of(after, JobPlanned))
    assert (planned.planner, planned.attempt) == ("pB", 2)


def test_a_second_bad_plan_fails_the_job_with_the_reason():
    state, outs = machine.start(_goal_job(), AT)
    after = machine.completed(state, verdict(tasks(outs)[PLAN_SUBTASK], answer="not json",
                                             provider="pA"))
    cyclic = plan_answer({"id": "a", "domain": "d", "prompt": "p", "depends_on": ["b"]},
                         {"id": "b", "domain": "d", "prompt": "q", "depends_on": ["a"]})
    end = machine.completed(state, verdict(tasks(after)[PLAN_SUBTASK], answer=cyclic,
                                           provider="pB"))
    assert tasks(end) == {}
    result = the(of(end, JobCompleted))
    assert result.status == "failed"
    assert "2 attempts" in result.reason and "dependency cycle: a -> b -> a" in result.reason
    assert state.phase == "done"


def test_a_verdict_of_the_first_planning_task_after_the_re_ask_is_ignored():
    state, outs = machine.start(_goal_job(), AT)
    first = tasks(outs)[PLAN_SUBTASK]
    machine.completed(state, verdict(first, answer="not json", provider="pA"))
    assert machine.completed(state, verdict(first, answer=GOOD_PLAN, provider="pA")) == []
    assert state.phase == "planning"


def test_a_plan_outside_the_jobs_domains_is_bad():
    state, outs = machine.start(_goal_job(domains=["code"]), AT)
    after = machine.completed(state, verdict(tasks(outs)[PLAN_SUBTASK], answer=GOOD_PLAN,
                                             provider="pA"))
    assert of(after, JobPlanned) == []
    assert tasks(after)[PLAN_SUBTASK].job.avoid_providers == ["pA"]


def test_an_unaffordable_planning_call_escalates_and_a_person_may_plan():
    job = JobSubmitted(job_id="g1", goal="g", budget_tokens=50_000, reserve_tokens=40_000)
    state, outs = machine.start(job, AT)  # 10% of 10k: below one planning call
    esc = the(of(outs, EscalationRaised))
    assert (esc.subtask_id, esc.reason) == (PLAN_SUBTASK, "budget_exhausted")
    after = machine.resolved(state, resolution(esc, answer=plan_answer(
        {"id": "a", "domain": "d", "prompt": "p"})))
    planned = the(of(after, JobPlanned))
    assert planned.planner == "operator" and [s.id for s in planned.subtasks] == ["a"]


def test_skipping_the_planning_escalation_fails_the_job():
    job = JobSubmitted(job_id="g1", goal="g", budget_tokens=50_000, reserve_tokens=40_000)
    state, outs = machine.start(job, AT)
    end = machine.resolved(state, resolution(the(of(outs, EscalationRaised)), skipped=True))
    assert the(of(end, JobCompleted)).status == "failed"


# --------------------------------------------------------------------------- coordinator.step


def _envelope(payload, event_id: str) -> Envelope:
    return make_event(payload, producer="test", event_id=event_id, occurred_at=WHEN)


def _record(outs: list[Out]) -> list[tuple]:
    return [(o.role, type(o.payload).__name__, o.payload.model_dump(mode="json"), o.discriminator,
             o.key) for o in outs]


def _live_events(seed: int) -> list[Envelope]:
    """A goal-only job's event sequence as the pipeline would produce it: the submission,
    a bad plan, a good one, the subtasks' verdicts (lex fails and a person answers it; doc
    at random), a duplicate verdict."""
    rng = random.Random(seed)
    job = JobSubmitted(job_id="g1", goal="g", budget_tokens=80_000, reserve_tokens=5_000)
    events = [_envelope(job, "e-job")]
    state, outs = step(None, events[0])
    pending = list(of(outs, TaskSubmitted))
    escalations: list[EscalationRaised] = []
    plans = ["not json", GOOD_PLAN]
    for n in range(1, 100):
        if state.phase == "done":
            return events
        if pending:
            t = pending.pop(0)
            if t.job.subtask_id == PLAN_SUBTASK:
                done = verdict(t, answer=plans.pop(0), tokens=rng.randint(0, 500), provider=f"p{n}")
            else:
                status = "failed" if t.job.subtask_id == "lex" else rng.choice(["passed", "failed"])
                done = verdict(t, status, tokens=rng.randint(0, t.budget_tokens))
            e = _envelope(done, f"e{n}")
        else:
            e = _envelope(resolution(escalations.pop(0), answer="by hand"), f"e{n}")
        events.append(e)
        if n == 3:
            events.append(_envelope(e.payload, f"e{n}-dup"))
        state, outs = step(state, e)
        pending += of(outs, TaskSubmitted)
        escalations += of(outs, EscalationRaised)
    raise AssertionError("the job did not end")


def _replay(events: list[Envelope], round_trip: bool) -> tuple[list[list[tuple]], str]:
    state, record = None, []
    for e in events:
        if round_trip and state is not None:
            state = JobState.model_validate_json(state.model_dump_json())
        state, outs = step(state, e)
        record.append(_record(outs))
    return record, state.model_dump_json()


@pytest.mark.parametrize("seed", range(5))
def test_replaying_from_json_round_tripped_states_is_deterministic(seed):
    events = _live_events(seed)
    first, final1 = _replay(events, round_trip=True)
    second, final2 = _replay(events, round_trip=True)
    in_memory, final3 = _replay(events, round_trip=False)
    assert first == second == in_memory
    assert final1 == final2 == final3
    assert any(isinstance(e.payload, EscalationResolved) for e in events)
    assert any(r and r[-1][1] == "JobCompleted" for r in first)
    assert sum(1 for r in first for o in r if o[1] == "JobCompleted") == 1


def test_replaying_events_decoded_from_the_wire_is_deterministic():
    events = _live_events(7)
    assert _replay([decode(encode(e)) for e in events], True) == _replay(events, True)


def test_step_ignores_a_second_submission_and_unknown_jobs():
    job = make_job(sub("a"))
    state, outs = step(None, _envelope(job, "e1"))
    assert outs
    before = state.model_dump_json()
    again, outs2 = step(state, _envelope(job, "e2"))
    assert outs2 == [] and again.model_dump_json() == before
    ghost = SubtaskCompleted(job_id="nope", subtask_id="a", task_id="nope.a", status="passed")
    assert step(None, _envelope(ghost, "e3")) == (None, [])


def test_step_records_the_submission_time():
    state, _ = step(None, _envelope(make_job(sub("a")), "e1"))
    assert state.submitted_at == WHEN.isoformat()


def test_at_the_deadline_what_is_not_final_is_skipped_and_the_job_expires():
    state, outs = machine.start(make_job(sub("a"), sub("b"), sub("c", "b"), deadline_s=60), AT)
    t = tasks(outs)
    machine.completed(state, verdict(t["a"]))
    [done] = of(machine.deadline_passed(state), JobCompleted)
    assert done.status == "expired" and set(done.artefacts) == {"a"} and "deadline" in done.reason
    assert {s.spec.id: s.status for s in state.subs.values()} == \
        {"a": "passed", "b": "skipped", "c": "skipped"}
    # a verdict after the deadline, or the deadline again, changes nothing
    assert machine.completed(state, verdict(t["b"])) == []
    assert machine.deadline_passed(state) == []


# --------------------------------------------------------------------------- the projection


class _Redis:
    """What JobProjection.apply reads: MGET of the job keys."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    async def mget(self, keys: list[str]) -> list[str | None]:
        return [self.values.get(k) for k in keys]


class _Pipe:
    """Records SET of the queued writes; the index and escalation writes are not checked."""

    def __init__(self) -> None:
        self.set_values: dict[str, str] = {}

    def set(self, key: str, value: str) -> None:
        self.set_values[key] = value

    def __getattr__(self, name: str):
        return lambda *a, **kw: None


async def _apply(events: list[Envelope], stored: dict[str, str]) -> tuple[dict[str, str], list]:
    from agents.cortex.coordinator import JobProjection
    from streams.keys import Keys
    from streams.stage import Context, Tx

    tx = Tx(Context(settings=None, keys=Keys("t"), topics=None, redis=_Redis(stored),
                    producer=None))
    await JobProjection().apply(events, tx)
    pipe = _Pipe()
    for write in tx.writes:
        write(pipe)
    return pipe.set_values, tx.emitted


async def test_a_step_that_raises_midway_leaves_the_state_as_if_its_event_were_not_applied(
        monkeypatch) -> None:
    job = make_job(sub("a"), sub("b"), sub("c", "a", "b"), budget_tokens=100_000)
    submitted = make_event(job, producer="test")
    state, outs = step(None, submitted)
    first = tasks(outs)
    good = make_event(verdict(first["a"], tokens=50), producer="validator")
    bad = make_event(verdict(first["b"], tokens=70), producer="validator")
    stored = {"t:job:j1": state.model_dump_json()}
    expected, _ = await _apply([good], dict(stored))

    real = machine.completed

    def half_done(state: JobState, done: SubtaskCompleted) -> list[Out]:
        if done.subtask_id == "b":
            state.subs["b"].status = "passed"  # changed, then a bug
            raise RuntimeError("bug")
        return real(state, done)

    monkeypatch.setattr(machine, "completed", half_done)
    written, emitted = await _apply([good, bad], dict(stored))
    assert written == expected  # b's half-change is gone, a's change kept
    assert JobState.model_validate_json(written["t:job:j1"]).subs["b"].status == "running"
    assert not any(e.payload.job and e.payload.job.subtask_id == "c" for _, _, e in emitted
                   if isinstance(e.payload, TaskSubmitted))
