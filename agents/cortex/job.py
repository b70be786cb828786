"""One job's state machine: what the coordinator does with each event of the job (Cortex
phases 0-4 on the event log).

:func:`step` is a pure function of the job's state and one event of the ``jobs`` topic: it
returns the next state and the events to emit. The coordinator (agents/cortex/coordinator.py)
runs it live and in replay alike, so the state is a projection of the job's events and replay
rebuilds it exactly; what it emits has ids derived from the event it answers, so a re-run
emits the same events and consumers drop the copies (streams/stage.py steps 3 and 6).

The protocol, per job:

1. **Plan.** ``JobSubmitted`` with subtasks is its own plan. With only a goal, the
   coordinator master submits a planning subtask (a ``json`` task, agents/cortex/plan.py)
   capped at :data:`~agents.cortex.allocation.PLAN_SHARE` of the active budget; a plan that
   fails validation is asked once more, avoiding the provider that made it, then the job
   fails with the reason.
2. **Activate masters.** ``JobPlanned``, then one ``MasterActivated`` per domain: the active
   budget (budget minus reserve, minus what planning used) split by the plan's estimates.
3. **Assign** every subtask whose dependencies have accepted answers, highest priority first:
   a cap from its master's remaining amount (agents/cortex/allocation.py ``cap``); a master
   short of one call's worst case waits while its running subtasks still hold some, else
   asks the reserve (granted to priority >= ``reserve_min_priority``), else escalates
   (``budget_exhausted``). ``WorkAssigned`` and the subtask's ``TaskSubmitted`` (task id
   ``{job_id}.{subtask_id}``, correlation id the job's, its dependencies' answers in its
   prompt) are emitted.
4. **Fan in.** ``SubtaskCompleted`` (from the validator) settles the cap: the master keeps
   what was not used. ``passed`` or ``unverified`` accepts the answer; any other status
   assigns the subtask again (step 3: a new task id, avoiding the providers that failed it)
   until ``max_attempts``, then escalates (``subtask_failed``): the executor has already
   retried and fallen back within each attempt. ``EscalationResolved`` accepts a person's answer or skips the subtask, and
   every subtask that depends on a skipped one is skipped too.
5. **Complete.** When every subtask is accepted or skipped, ``JobCompleted`` with the
   aggregate per master; at ``JobDeadlinePassed`` (the coordinator's tick), what is not
   final is skipped and the job ends ``expired``. Events for a finished job, or for a subtask not running, change
   nothing (a duplicate or a late answer).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.cortex import allocation
from agents.cortex.plan import PLAN_SCHEMA, planning_prompt, read_plan
from models.events import Frozen, JobRef, TaskSubmitted
from models.jobs import (
    COORDINATOR,
    PLAN_SUBTASK,
    EscalationRaised,
    EscalationResolved,
    JobCompleted,
    JobPlanned,
    JobSubmitted,
    MasterActivated,
    MasterSummary,
    SubtaskCompleted,
    SubtaskSpec,
    WorkAssigned,
)

MICRO = 1_000_000
ACCEPTED = frozenset({"passed", "unverified", "resolved"})
FINAL = ACCEPTED | {"skipped"}
PLAN_ATTEMPTS = 2
"""A goal-only job asks for a plan at most this often (the issue: retried once)."""
ANSWER_SLOT = re.compile(r"\{\{answer:([A-Za-z0-9_.:-]{1,64})\}\}")
"""Where a subtask's prompt or test takes a dependency's accepted answer (models/jobs.py)."""

SubStatus = Literal["waiting", "running", "passed", "unverified", "escalated", "resolved", "skipped"]


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class Sub(_State):
    """A subtask's progress; amounts in tokens and micro-USD (None: uncapped)."""

    spec: SubtaskSpec
    order: int
    status: SubStatus = "waiting"
    task_id: str | None = None
    cap_tokens: int | None = None
    cap_micro: int | None = None
    tokens: int = 0
    micro: int = 0
    answer: str | None = None
    provider: str | None = None
    attempts: int = 0
    tried: list[str] = Field(default_factory=list)
    escalation: str | None = None
    reason: str | None = None
    failed: bool = False
    detail: str | None = None


class Master(_State):
    """A domain master's budget scope: allocated (grows by reserve grants), used by settled
    subtasks, held by running ones."""

    domain: str
    tokens: int | None = None
    micro: int | None = None
    personal_tokens: int | None = None
    workers_tokens: int | None = None
    used_tokens: int = 0
    used_micro: int = 0
    held_tokens: int = 0
    held_micro: int = 0
    reserve_tokens: int = 0

    def remaining(self) -> tuple[int | None, int | None]:
        t = None if self.tokens is None else self.tokens - self.used_tokens - self.held_tokens
        m = None if self.micro is None else self.micro - self.used_micro - self.held_micro
        return t, m


class JobState(_State):
    """Everything the coordinator knows of one job (the projection ``{ns}:job:{job_id}``)."""

    job: JobSubmitted
    phase: Literal["planning", "running", "done"] = "planning"
    submitted_at: str = ""
    plan_attempts: int = 0
    planners: list[str] = Field(default_factory=list)
    subs: dict[str, Sub] = Field(default_factory=dict)
    masters: dict[str, Master] = Field(default_factory=dict)
    reserve_tokens: int | None = None
    reserve_micro: int | None = None
    result: JobCompleted | None = None


@dataclass(frozen=True)
class Out:
    """An event to emit: the topic role, its payload, the discriminator of its derived id
    (unique per answered event), and its record key (None: the job id)."""

    role: str
    payload: Frozen
    discriminator: str
    key: str | None = None


def _budgets(job: JobSubmitted) -> tuple[int | None, int | None, int | None, int | None]:
    """(active tokens, active micro-USD, reserve tokens, reserve micro-USD)."""
    micro = None if job.budget_usd is None else int(job.budget_usd * MICRO)
    rmicro = int(job.reserve_usd * MICRO)
    return (None if job.budget_tokens is None else job.budget_tokens - job.reserve_tokens,
            None if micro is None else micro - rmicro,
            None if job.budget_tokens is None else job.reserve_tokens,
            None if micro is None else rmicro)


def start(job: JobSubmitted, at: str) -> tuple[JobState, list[Out]]:
    """Step 1 for a new job: its state, and its plan (steps 2-3) or its planning subtask."""
    state = JobState(job=job, submitted_at=at)
    active_t, active_m, state.reserve_tokens, state.reserve_micro = _budgets(job)
    if job.subtasks is not None:
        return state, _run_plan(state, job.subtasks, None)
    plan_t = None if active_t is None else max(int(active_t * allocation.PLAN_SHARE), 1)
    plan_m = None if active_m is None else max(int(active_m * allocation.PLAN_SHARE), 1)
    state.masters[COORDINATOR] = Master(domain=COORDINATOR, tokens=plan_t, micro=plan_m,
                                        personal_tokens=plan_t, workers_tokens=0)
    return state, _ask_plan(state, avoid=[])


def _ask_plan(state: JobState, avoid: list[str]) -> list[Out]:
    state.plan_attempts += 1
    spec = SubtaskSpec(id=PLAN_SUBTASK, domain=COORDINATOR, kind="json", json_schema=PLAN_SCHEMA,
                       prompt=planning_prompt(state.job.goal or "", state.job.domains))
    sub = Sub(spec=spec, order=-1)
    state.subs[PLAN_SUBTASK] = sub
    suffix = "" if state.plan_attempts == 1 else f".{state.plan_attempts}"
    return _assign(state, sub, avoid=avoid, task_suffix=suffix) or []


def _run_plan(state: JobState, subtasks: list[SubtaskSpec], planner: str | None) -> list[Out]:
    """Steps 2-3: record the plan, activate a master per domain, assign what is ready."""
    job = state.job
    state.phase = "running"
    out: list[Out] = [Out("jobs", JobPlanned(job_id=job.job_id, subtasks=subtasks, planner=planner,
                                             attempt=max(state.plan_attempts, 1)), "planned")]
    for i, spec in enumerate(subtasks):
        state.subs[spec.id] = Sub(spec=spec, order=i)
    weights: dict[str, int] = {}
    counts: dict[str, int] = {}
    for spec in subtasks:
        est = spec.estimated_tokens or allocation.call_tokens(spec.prompt, spec.json_schema)
        weights[spec.domain] = weights.get(spec.domain, 0) + est
        counts[spec.domain] = counts.get(spec.domain, 0) + 1
    active_t, active_m, _, _ = _budgets(job)
    planning = state.masters.get(COORDINATOR)
    if planning is not None:
        # planning is over: what it did not use goes to the domain masters
        planning.tokens = None if planning.tokens is None else planning.used_tokens
        planning.micro = None if planning.micro is None else planning.used_micro
        planning.personal_tokens, planning.workers_tokens = planning.tokens, 0
        if active_t is not None:
            active_t -= planning.used_tokens
        if active_m is not None:
            active_m -= planning.used_micro
    tokens = allocation.split(active_t, weights)
    micros = allocation.split(active_m, weights)
    for domain in weights:
        personal, workers = allocation.personal_workers(tokens[domain], job.personal_share)
        state.masters[domain] = Master(domain=domain, tokens=tokens[domain], micro=micros[domain],
                                       personal_tokens=personal, workers_tokens=workers)
        out.append(Out("jobs", MasterActivated(
            job_id=job.job_id, domain=domain, subtasks=counts[domain], tokens=tokens[domain],
            personal_tokens=personal, workers_tokens=workers,
            usd=None if micros[domain] is None else micros[domain] / MICRO), f"master:{domain}"))
    return out + _advance(state)


def _fill(text: str | None, state: JobState) -> str | None:
    """``text`` with each ``{{answer:ID}}`` replaced by subtask ID's accepted answer."""
    if text is None or "{{answer:" not in text:
        return text
    return ANSWER_SLOT.sub(lambda m: state.subs[m.group(1)].answer or "", text)


def _prompt(state: JobState, sub: Sub) -> str:
    """The subtask's prompt with its dependencies' accepted answers: where the prompt has
    ``{{answer:ID}}`` slots, in them; else after it (as comment lines after a code task's
    module prefix, which must stay valid Python and end with the code to complete)."""
    if "{{answer:" in sub.spec.prompt:
        return _fill(sub.spec.prompt, state) or ""
    deps = [(d, state.subs[d].answer or "") for d in sub.spec.depends_on]
    if not deps:
        return sub.spec.prompt
    if sub.spec.kind == "code":
        lines = [f"# accepted answer of {d}:\n" + "\n".join(f"# {x}" for x in a.splitlines())
                 for d, a in deps]
        return sub.spec.prompt.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    blocks = "\n\n".join(f"## Accepted answer of {d}\n{a}" for d, a in deps)
    return f"{sub.spec.prompt}\n\n# Results of the subtasks this one depends on\n\n{blocks}"


def _assign(state: JobState, sub: Sub, avoid: list[str] | None = None,
            task_suffix: str = "", unassigned: int | None = None) -> list[Out] | None:
    """Step 3 for one ready subtask: its events, [] when it escalated for budget, or None
    when its master must wait for running subtasks to free budget."""
    job = state.job
    master = state.masters[sub.spec.domain]
    prompt = _prompt(state, sub)
    floor = allocation.call_tokens(prompt, sub.spec.json_schema)
    if unassigned is None:  # the master's waiting subtasks, ``sub`` among them
        unassigned = sum(1 for s in state.subs.values()
                         if s.spec.domain == sub.spec.domain and s.status == "waiting")
    rem_t, rem_m = master.remaining()
    cap_t = allocation.cap(rem_t, unassigned, floor)
    cap_m = allocation.cap(rem_m, unassigned, 1)
    grant_t = grant_m = 0
    if cap_t is False or cap_m is False:
        if master.held_tokens or master.held_micro:
            return None  # what its running subtasks do not use comes back to it
        priority = sub.spec.priority or job.priority
        need_t = 0 if cap_t is not False else floor - (rem_t or 0)
        need_m = 0 if cap_m is not False else 1 - (rem_m or 0)
        fits = ((need_t == 0 or (state.reserve_tokens or 0) >= need_t)
                and (need_m == 0 or (state.reserve_micro or 0) >= need_m))
        if priority < job.reserve_min_priority or not fits:
            why = (f"priority {priority} is below the reserve's {job.reserve_min_priority}"
                   if priority < job.reserve_min_priority else "the reserve is exhausted too")
            return _escalate(state, sub, "budget_exhausted",
                             f"master {master.domain} has {rem_t} tokens left, a call needs "
                             f"{floor}; reserve denied: {why}")
        grant_t, grant_m = need_t, need_m
        if grant_t:
            state.reserve_tokens = (state.reserve_tokens or 0) - grant_t
            master.tokens = (master.tokens or 0) + grant_t
            master.reserve_tokens += grant_t
            cap_t = floor
        if grant_m:
            state.reserve_micro = (state.reserve_micro or 0) - grant_m
            master.micro = (master.micro or 0) + grant_m
            cap_m = 1
    sub.status = "running"
    sub.attempts += 1
    if sub.attempts > 1:  # a re-attempt: its own task id, and another provider if there is one
        task_suffix, avoid = f".{sub.attempts}", sub.tried
    sub.task_id = f"{job.job_id}.{sub.spec.id}{task_suffix}"
    sub.cap_tokens, sub.cap_micro = cap_t, cap_m
    master.held_tokens += cap_t or 0
    master.held_micro += cap_m or 0
    ref = JobRef(job_id=job.job_id, subtask_id=sub.spec.id, domain=sub.spec.domain,
                 avoid_providers=avoid or [])
    usd = None if cap_m is None else cap_m / MICRO
    task: TaskSubmitted = sub.spec.to_task(sub.task_id, ref, prompt=prompt, priority=job.priority,
                                           budget_tokens=cap_t, max_cost_usd=usd,
                                           test=_fill(sub.spec.test, state))
    return [Out("jobs", WorkAssigned(job_id=job.job_id, domain=sub.spec.domain,
                                     subtask_id=sub.spec.id, task_id=sub.task_id,
                                     budget_tokens=cap_t, max_cost_usd=usd,
                                     from_reserve_tokens=grant_t, from_reserve_usd=grant_m / MICRO),
                f"assign:{sub.task_id}"),
            Out("tasks", task, f"task:{sub.task_id}", key=sub.task_id)]


def _escalate(state: JobState, sub: Sub, reason: str, detail: str) -> list[Out]:
    sub.status = "escalated"
    sub.escalation = f"{state.job.job_id}/{sub.spec.id}"
    sub.reason, sub.detail = reason, detail
    return [Out("system", EscalationRaised(escalation_id=sub.escalation, job_id=state.job.job_id,
                                           subtask_id=sub.spec.id, domain=sub.spec.domain,
                                           reason=reason, detail=detail[:2000]),
                f"escalate:{sub.spec.id}", key=state.job.job_id)]


def _advance(state: JobState) -> list[Out]:
    """Steps 3 and 5: skip what depends on a skipped subtask, assign what is ready, and
    complete the job when every subtask is final."""
    subs = [s for s in state.subs.values() if s.spec.id != PLAN_SUBTASK]
    out: list[Out] = []
    changed = True
    while changed:  # a skip can make another subtask skippable
        changed = False
        for s in subs:
            if s.status == "waiting" and any(state.subs[d].status == "skipped" for d in s.spec.depends_on):
                s.status, s.detail, changed = "skipped", "a subtask it depends on was skipped", True
    ready = [s for s in subs if s.status == "waiting"
             and all(state.subs[d].status in ACCEPTED for d in s.spec.depends_on)]
    ready.sort(key=lambda s: (-(s.spec.priority or state.job.priority), s.order))
    # counted once, not per ready subtask: a job whose masters wait on budget has many
    # ready subtasks at every event, and a count per subtask made each event quadratic
    waiting = Counter(s.spec.domain for s in state.subs.values() if s.status == "waiting")
    for s in ready:
        out += _assign(state, s, unassigned=waiting[s.spec.domain]) or []
        if s.status != "waiting":
            waiting[s.spec.domain] -= 1
    if subs and all(s.status in FINAL for s in subs):
        out.append(_complete(state))
    return out


def _summary(state: JobState, domain: str) -> MasterSummary:
    m = state.masters[domain]
    subs = [s for s in state.subs.values() if s.spec.domain == domain]
    passed = sum(1 for s in subs if s.status in ("passed", "unverified"))
    return MasterSummary(
        domain=domain, subtasks=len(subs), passed=passed, failed=sum(s.failed for s in subs),
        resolved=sum(1 for s in subs if s.status == "resolved"),
        skipped=sum(1 for s in subs if s.status == "skipped"),
        pass_rate=passed / len(subs) if subs else 0.0,
        tokens_allocated=m.tokens, personal_tokens=m.personal_tokens, workers_tokens=m.workers_tokens,
        tokens_used=m.used_tokens, usd_allocated=None if m.micro is None else m.micro / MICRO,
        usd_used=m.used_micro / MICRO, reserve_tokens_granted=m.reserve_tokens)


def _complete(state: JobState, reason: str | None = None, status: str | None = None) -> Out:
    job = state.job
    state.phase = "done"
    masters = [_summary(state, d) for d in state.masters]
    subs = [s for s in state.subs.values() if s.spec.id != PLAN_SUBTASK]
    status = status or ("failed" if reason else ("partial" if any(s.status == "skipped" for s in subs)
                                                 else "completed"))
    state.result = JobCompleted(
        job_id=job.job_id, status=status, reason=reason, masters=masters,
        tokens_used=sum(m.used_tokens for m in state.masters.values()),
        usd_used=sum(m.used_micro for m in state.masters.values()) / MICRO,
        budget_tokens=job.budget_tokens, budget_usd=job.budget_usd,
        reserve_tokens_left=state.reserve_tokens,
        artefacts={s.spec.id: s.answer for s in subs if s.answer is not None and s.status in ACCEPTED})
    return Out("jobs", state.result, "completed")


def _settle(state: JobState, sub: Sub, done: SubtaskCompleted) -> None:
    master = state.masters[sub.spec.domain]
    master.held_tokens -= sub.cap_tokens or 0
    master.held_micro -= sub.cap_micro or 0
    sub.tokens, sub.micro = done.tokens, round(done.cost_usd * MICRO)
    master.used_tokens += sub.tokens
    master.used_micro += sub.micro
    sub.provider = done.provider


def completed(state: JobState, done: SubtaskCompleted) -> list[Out]:
    """Step 4 for a subtask's verdict (or, for the planning subtask, steps 1-3)."""
    sub = state.subs.get(done.subtask_id)
    if state.phase == "done" or sub is None or sub.status != "running" or sub.task_id != done.task_id:
        return []
    _settle(state, sub, done)
    if done.subtask_id == PLAN_SUBTASK:
        subtasks, problem = read_plan(done.answer if done.status == "passed" else None,
                                      state.job.domains)
        if done.status != "passed":
            problem = f"the planning task ended {done.status}"
        if done.provider:
            state.planners.append(done.provider)
        if not problem:
            sub.status, sub.answer = "passed", done.answer
            return _run_plan(state, subtasks, done.provider)
        sub.status, sub.detail = "skipped", problem
        if state.plan_attempts < PLAN_ATTEMPTS:
            return _ask_plan(state, avoid=list(state.planners))
        return [_complete(state, reason=f"no runnable plan after {state.plan_attempts} attempts: {problem}")]
    if done.status in ("passed", "unverified"):
        sub.status, sub.answer = done.status, done.answer
        return _advance(state)
    if done.provider and done.provider not in sub.tried:
        sub.tried.append(done.provider)
    if sub.attempts < state.job.max_attempts:
        sub.status = "waiting"  # step 4's retry: assigned again by _advance
        return _advance(state)
    detail = (f"task {done.task_id} ended {done.status} after {sub.attempts} attempt(s)"
              + (f" ({done.tests_passed}/{done.tests_total} tests passed)" if done.tests_total else ""))
    sub.failed = True
    return _escalate(state, sub, "subtask_failed", detail) + _advance(state)


def deadline_passed(state: JobState) -> list[Out]:
    """Step 5 at the deadline: every subtask not final is skipped, the job ends ``expired``."""
    if state.phase == "done":
        return []
    for s in state.subs.values():
        if s.status not in FINAL:
            s.status, s.detail = "skipped", f"the job's deadline ({state.job.deadline_s} s) passed"
    return [_complete(state, reason=f"its deadline of {state.job.deadline_s} s passed", status="expired")]


def resolved(state: JobState, r: EscalationResolved) -> list[Out]:
    """Step 4 for a person's answer: accept it or skip the subtask, then go on."""
    sub = state.subs.get(r.subtask_id)
    if state.phase == "done" or sub is None or sub.status != "escalated" or sub.escalation != r.escalation_id:
        return []
    if r.subtask_id == PLAN_SUBTASK:  # the planning call could not be paid: a person plans
        subtasks, problem = read_plan(r.answer, state.job.domains)
        if r.skipped or problem:
            sub.status = "skipped"
            return [_complete(state, reason=f"planning escalated and {'skipped' if r.skipped else problem}")]
        sub.status, sub.answer = "resolved", r.answer
        return _run_plan(state, subtasks, r.by)
    if r.skipped:
        sub.status = "skipped"
    else:
        sub.status, sub.answer = "resolved", r.answer
    sub.detail = f"{sub.detail}; {'skipped' if r.skipped else 'answered'} by {r.by}"
    return _advance(state)
