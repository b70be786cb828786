"""Cortex jobs on the wire (agents/cortex): a job, its plan, its domain masters, the work
they assign, the subtasks' verdicts, escalations to a person and the job's end.

Every event of one job is keyed by its ``job_id`` on the ``jobs`` topic (topics.yaml), so one
coordinator applies them in order; ``EscalationRaised`` goes to the ``system`` topic, for
operators (the coordinator's state records it too). Budgets are integers on the wire where they are enforced (tokens) and USD floats
where the executor takes USD (``TaskSubmitted.max_cost_usd``).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from models.events import (
    _MUST_CONTAIN_DOC,
    _MUST_MATCH_DOC,
    _SCHEMA_DOC,
    _WIRE_ALIASES,
    DOMAIN,
    CompletionStatus,
    Frozen,
    JobRef,
    TaskKind,
    TaskSubmitted,
)

SUBTASK_ID = r"^[A-Za-z0-9_.:-]{1,64}$"
PLAN_SUBTASK = "plan"
"""The subtask id of a goal-only job's planning call (its domain: :data:`COORDINATOR`)."""
COORDINATOR = "coordinator"
"""The coordinator master's domain: it pays for planning (Cortex's coordinator-master)."""


class SubtaskSpec(Frozen):
    """One subtask of a job: a normal task payload (``kind`` and its fields, as in
    :class:`~models.events.TaskSubmitted`) plus its ``domain`` (the master that runs it) and
    the ids of the subtasks whose accepted answers it needs (``depends_on``): they are put
    where its prompt or test says ``{{answer:ID}}``, else appended to its prompt.
    ``estimated_tokens`` weighs the master's share of the job's budget (None: the prompt's
    length in bytes plus a fixed answer allowance, agents/cortex/budget.py)."""

    model_config = _WIRE_ALIASES

    id: str = Field(pattern=SUBTASK_ID)
    domain: str = Field(pattern=DOMAIN)
    depends_on: list[str] = Field(default_factory=list)
    estimated_tokens: int | None = Field(default=None, ge=1, le=10**9)
    priority: int | None = Field(default=None, ge=1, le=10)
    kind: TaskKind = "code"
    prompt: str
    entry_point: str | None = None
    test: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema", description=_SCHEMA_DOC)
    expected: Any = None
    must_match: str | None = Field(default=None, description=_MUST_MATCH_DOC)
    must_contain: list[str] | None = Field(default=None, description=_MUST_CONTAIN_DOC)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fits_kind(self) -> SubtaskSpec:
        # the task it becomes must be valid: checked now, so a bad job is refused whole at
        # submission instead of failing one subtask in the middle of the run
        self.to_task("check", None, prompt=self.prompt)
        return self

    def to_task(self, task_id: str, job: JobRef | None, *, prompt: str, priority: int = 3,
                budget_tokens: int | None = None, max_cost_usd: float | None = None,
                test: str | None = None) -> TaskSubmitted:
        """The ``TaskSubmitted`` this subtask becomes (``test``: its test with the answer
        slots filled; None: as given). Raises pydantic's ValidationError when its fields do
        not fit its kind (the message names the field)."""
        return TaskSubmitted(task_id=task_id, kind=self.kind, prompt=prompt,
                             entry_point=self.entry_point, test=test or self.test,
                             json_schema=self.json_schema, expected=self.expected,
                             must_match=self.must_match, must_contain=self.must_contain,
                             priority=self.priority or priority, budget_tokens=budget_tokens,
                             max_cost_usd=max_cost_usd, metadata=self.metadata, job=job)


def plan_problem(subtasks: list[SubtaskSpec], domains: list[str] | None = None) -> str | None:
    """Why ``subtasks`` is not a runnable plan, naming the offending subtask, or None: no
    subtasks, a duplicate id, a dependency on an unknown id, a domain outside ``domains``
    (when given), or a dependency cycle (named in order, e.g. ``a -> b -> a``)."""
    if not subtasks:
        return "the plan has no subtasks"
    ids = [s.id for s in subtasks]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return f"subtask id {i!r} appears twice"
        seen.add(i)
    if PLAN_SUBTASK in seen:
        return f"subtask id {PLAN_SUBTASK!r} is reserved for the coordinator's planning call"
    if any(s.domain == COORDINATOR for s in subtasks):
        return f"domain {COORDINATOR!r} is the coordinator's own (it pays for planning)"
    for s in subtasks:
        for d in s.depends_on:
            if d not in seen:
                return f"subtask {s.id!r} depends on {d!r}, which is not in the plan"
        if len(set(s.depends_on)) != len(s.depends_on):
            return f"subtask {s.id!r} lists a dependency twice"
        for where, text in (("prompt", s.prompt), ("test", s.test or "")):
            for slot in re.findall(r"\{\{answer:([^}]*)\}\}", text):
                if slot not in s.depends_on:
                    return (f"subtask {s.id!r}: its {where}'s {{{{answer:{slot}}}}} names no "
                            "subtask it depends on")
        if domains is not None and s.domain not in domains:
            return f"subtask {s.id!r} has domain {s.domain!r}, not one of {domains}"
    cycle = find_cycle({s.id: s.depends_on for s in subtasks})
    if cycle:
        return "dependency cycle: " + " -> ".join(cycle)
    return None


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle of ``graph`` (node -> the nodes it depends on) as ``[a, b, ..., a]``, or None.
    Depth-first search with three colours (Cormen et al., *Introduction to Algorithms*,
    22.3); iterative, so a long chain cannot exhaust the interpreter's stack."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root, deps in graph.items():
        if state.get(root):
            continue
        path: list[str] = [root]
        stack = [iter(deps)]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph.get(nxt, [])))
    return None


class JobSubmitted(Frozen):
    """A job enters (SPEC §3, Cortex phase 0). Either ``subtasks`` (a plan: validated here, a
    cycle or unknown dependency refuses the job naming it) or only a ``goal``, which the
    coordinator asks a provider to plan (a ``json`` subtask whose schema is
    agents/cortex/plan.py's). ``budget_tokens`` / ``budget_usd``: the whole job's budget
    (None: unlimited), of which ``reserve_*`` is held back by the coordinator and granted
    only to subtasks of priority >= ``reserve_min_priority`` (Cortex's emergency reserve:
    25k of 295k tokens). ``personal_share``: the part of each master's allocation that pays
    a subtask's first provider call, the rest its consensus workers (Cortex's table: 62%).
    ``max_attempts``: how often a failing subtask is assigned (each time avoiding the
    providers that failed it) before it is escalated. ``deadline_s``: seconds after the
    job's event time at which it ends ``expired`` with what it has (None: no deadline)."""

    job_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    goal: str | None = None
    subtasks: list[SubtaskSpec] | None = None
    domains: list[Annotated[str, Field(pattern=DOMAIN)]] | None = None
    budget_tokens: int | None = Field(default=None, ge=1, le=10**12)
    budget_usd: float | None = Field(default=None, gt=0, le=1e9)
    reserve_tokens: int = Field(default=0, ge=0, le=10**12)
    reserve_usd: float = Field(default=0.0, ge=0, le=1e9)
    reserve_min_priority: int = Field(default=8, ge=1, le=10)
    priority: int = Field(default=5, ge=1, le=10)
    personal_share: float = Field(default=0.62, ge=0.0, le=1.0)
    max_attempts: int = Field(default=3, ge=1, le=10)
    deadline_s: float | None = Field(default=None, gt=0, le=10**7)

    @model_validator(mode="after")
    def _runnable(self) -> JobSubmitted:
        if self.subtasks is None and not (self.goal or "").strip():
            raise ValueError("field 'goal' or 'subtasks': a job needs one")
        if self.subtasks is not None:
            problem = plan_problem(self.subtasks, self.domains)
            if problem:
                raise ValueError(f"field 'subtasks': {problem}")
        if self.budget_tokens is not None and self.reserve_tokens >= self.budget_tokens:
            raise ValueError("field 'reserve_tokens': must be below budget_tokens")
        if self.budget_usd is not None and self.reserve_usd >= self.budget_usd:
            raise ValueError("field 'reserve_usd': must be below budget_usd")
        return self


class JobDeadlinePassed(Frozen):
    """A job's deadline passed (emitted by the coordinator's tick, every worker alike, with an
    id derived from the job): what is not final is skipped and the job ends ``expired``."""

    job_id: str
    deadline: datetime


class JobPlanned(Frozen):
    """The plan the job runs: the submitted subtasks, or a provider's (``planner``, the
    planning call's ``attempt``). Cortex phase 0's pre-flight, recorded."""

    job_id: str
    subtasks: list[SubtaskSpec]
    planner: str | None = None
    attempt: int = Field(default=1, ge=1)


class MasterActivated(Frozen):
    """A domain master's share of the job's active budget (Cortex phase 1): ``tokens`` split
    into ``personal_tokens`` and ``workers_tokens``, ``usd`` likewise (None: unlimited), and
    how many subtasks it runs."""

    job_id: str
    domain: str
    subtasks: int = Field(ge=0)
    tokens: int | None = None
    personal_tokens: int | None = None
    workers_tokens: int | None = None
    usd: float | None = None


class WorkAssigned(Frozen):
    """A master hands a subtask to the pipeline (Cortex phase 2) as task ``task_id`` with a
    cap of ``budget_tokens`` / ``max_cost_usd`` held from its allocation, of which
    ``from_reserve_tokens`` / ``from_reserve_usd`` the coordinator's reserve granted."""

    job_id: str
    domain: str
    subtask_id: str
    task_id: str
    budget_tokens: int | None = None
    max_cost_usd: float | None = None
    from_reserve_tokens: int = 0
    from_reserve_usd: float = 0.0


class SubtaskCompleted(Frozen):
    """The validator's verdict on a job's subtask, sent to the job (fan-in): the task's final
    ``status`` (as ``TaskCompleted``'s), the accepted ``answer`` (None: none), what its calls
    used, and the tests it passed."""

    job_id: str
    subtask_id: str
    task_id: str
    status: CompletionStatus
    answer: str | None = None
    provider: str | None = None
    tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
    tests_passed: int = Field(default=0, ge=0)
    tests_total: int = Field(default=0, ge=0)


EscalationReason = Literal["subtask_failed", "budget_exhausted", "plan_failed"]


class EscalationRaised(Frozen):
    """The coordinator asks a person (Cortex's human operator): a subtask failed after the
    executor's retries and fallbacks, or its master's budget is exhausted and the reserve was
    denied. ``rmo escalations resolve`` answers it."""

    escalation_id: str
    job_id: str
    subtask_id: str
    domain: str
    reason: EscalationReason
    detail: str


class EscalationResolved(Frozen):
    """A person's answer to an escalation: the subtask's ``answer`` (its dependents get it as
    an accepted answer), or ``skipped`` (it and its dependents are skipped)."""

    escalation_id: str
    job_id: str
    subtask_id: str
    answer: str | None = None
    skipped: bool = False
    by: str = "operator"

    @model_validator(mode="after")
    def _one(self) -> EscalationResolved:
        if (self.answer is None) == (not self.skipped):
            raise ValueError("field 'answer' or 'skipped': exactly one")
        return self


class MasterSummary(Frozen):
    """One master's line of the job's aggregate: its subtasks by outcome, and its budget
    allocated (``*_allocated``, None: unlimited) against used."""

    domain: str
    subtasks: int
    passed: int
    failed: int
    resolved: int
    skipped: int
    pass_rate: float
    tokens_allocated: int | None
    personal_tokens: int | None
    workers_tokens: int | None
    tokens_used: int
    usd_allocated: float | None
    usd_used: float
    reserve_tokens_granted: int = 0


JobStatus = Literal["completed", "partial", "failed", "expired"]


class JobCompleted(Frozen):
    """A job's end (Cortex phase 4): ``completed`` (every subtask has an accepted answer),
    ``partial`` (some were skipped), ``failed`` (no runnable plan: ``reason``), ``expired``
    (its deadline passed; what was running still holds its cap, not counted as used). Carries the
    aggregate per master, the job's totals against its budget, and the final artefacts
    (subtask id -> accepted answer)."""

    job_id: str
    status: JobStatus
    reason: str | None = None
    masters: list[MasterSummary] = Field(default_factory=list)
    tokens_used: int = 0
    usd_used: float = 0.0
    budget_tokens: int | None = None
    budget_usd: float | None = None
    reserve_tokens_left: int | None = None
    artefacts: dict[str, str] = Field(default_factory=dict)


JOB_PAYLOADS: tuple[type[Frozen], ...] = (
    JobSubmitted, JobDeadlinePassed, JobPlanned, MasterActivated, WorkAssigned, SubtaskCompleted,
    EscalationRaised, EscalationResolved, JobCompleted,
)
