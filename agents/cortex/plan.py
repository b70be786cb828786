"""Planning a goal-only job: the JSON Schema a provider's plan must satisfy, the planning
subtask that asks for it, and reading its answer back into subtasks (Cortex phase 0).

The planning call is an ordinary ``json`` task of the pipeline (the coordinator's subtask
:data:`~models.jobs.PLAN_SUBTASK`): routed, budgeted, and validated against
:data:`PLAN_SCHEMA` by the validator like any json task. What a schema cannot say (unique
ids, known dependencies, no cycle) :func:`read_plan` checks with
:func:`models.jobs.plan_problem`.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from models.events import DOMAIN
from models.jobs import SUBTASK_ID, SubtaskSpec, plan_problem

PLAN_SCHEMA: dict = {
    "type": "object",
    "required": ["subtasks"],
    "additionalProperties": False,
    "properties": {
        "subtasks": {
            "type": "array", "minItems": 1, "maxItems": 200,
            "items": {
                "type": "object",
                "required": ["id", "domain", "prompt"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "pattern": SUBTASK_ID},
                    "domain": {"type": "string", "pattern": DOMAIN},
                    "prompt": {"type": "string", "minLength": 1},
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                    "estimated_tokens": {"type": "integer", "minimum": 1},
                },
            },
        },
    },
}
"""A plan: subtasks with a domain, a prompt, dependencies and a token estimate. Planned
subtasks are ``text`` tasks (a provider's plan states no checks for them)."""


def planning_prompt(goal: str, domains: list[str] | None) -> str:
    """The planning call's prompt: the goal, the domains it may use, and what to return."""
    allowed = f" Use only these domains: {', '.join(domains)}." if domains else ""
    return (f"Decompose this goal into subtasks for domain masters.{allowed} Give each subtask "
            "an id, its domain, a self-contained prompt, the ids it depends on (their answers "
            "are given to it) and an estimate of the tokens it needs. Answer with one JSON "
            f"object matching the schema.\n\nGoal: {goal}")


def read_plan(answer: str | None, domains: list[str] | None) -> tuple[list[SubtaskSpec], str | None]:
    """The subtasks of a planning answer, or ([], why it is not a runnable plan)."""
    if not answer:
        return [], "the planner gave no answer"
    try:
        doc = orjson.loads(answer)
        subtasks = [SubtaskSpec(kind="text", **s) for s in doc["subtasks"]]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        return [], f"the plan is not a JSON object with subtasks: {exc}"
    except ValidationError as exc:
        return [], f"a planned subtask is invalid: {exc.errors()[0]['msg']}"
    problem = plan_problem(subtasks, domains)
    return ([], problem) if problem else (subtasks, None)
