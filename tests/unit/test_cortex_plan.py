"""Plan validation for Cortex jobs (models/jobs.py, agents/cortex/plan.py): ``plan_problem``
on good and malformed plans (empty, duplicate id, unknown dependency, reserved id and domain,
domains outside the job's), dependency cycles named in order and a 5000-node chain checked
without recursion, ``find_cycle`` itself, ``read_plan`` on a planner's answer (good JSON, not
JSON, schema-invalid items, a cycle), and ``JobSubmitted`` / ``SubtaskSpec`` refusing what
cannot run, with a message naming the field."""

from __future__ import annotations

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from agents.cortex.plan import PLAN_SCHEMA, planning_prompt, read_plan
from models.jobs import (
    COORDINATOR,
    PLAN_SUBTASK,
    JobSubmitted,
    SubtaskSpec,
    find_cycle,
    plan_problem,
)


def spec(id: str, *deps: str, domain: str = "code", **kw) -> SubtaskSpec:
    return SubtaskSpec(id=id, domain=domain, depends_on=list(deps), kind=kw.pop("kind", "text"),
                       prompt=kw.pop("prompt", f"do {id}"), **kw)


def plan_json(*items: dict) -> str:
    return orjson.dumps({"subtasks": list(items)}).decode()


# --------------------------------------------------------------------------- plan_problem


def test_a_good_plan_has_no_problem():
    assert plan_problem([spec("a"), spec("b", "a"), spec("c", "a", "b")]) is None


def test_an_empty_plan_is_refused():
    assert plan_problem([]) == "the plan has no subtasks"


def test_a_duplicate_id_is_named():
    problem = plan_problem([spec("a"), spec("b"), spec("a")])
    assert problem is not None and "'a'" in problem and "twice" in problem


def test_an_unknown_dependency_is_named_with_its_dependent():
    problem = plan_problem([spec("a"), spec("b", "ghost")])
    assert problem is not None
    assert "'b'" in problem and "'ghost'" in problem and "not in the plan" in problem


def test_a_dependency_listed_twice_is_named():
    problem = plan_problem([spec("a"), spec("b", "a", "a")])
    assert problem is not None and "'b'" in problem and "twice" in problem


def test_the_planning_subtask_id_is_reserved():
    problem = plan_problem([spec(PLAN_SUBTASK)])
    assert problem is not None and "reserved" in problem and repr(PLAN_SUBTASK) in problem


def test_the_coordinator_domain_is_reserved():
    problem = plan_problem([spec("a", domain=COORDINATOR)])
    assert problem is not None and repr(COORDINATOR) in problem


def test_a_domain_outside_the_allowed_ones_is_named():
    problem = plan_problem([spec("a", domain="code"), spec("b", domain="law")], ["code", "math"])
    assert problem is not None and "'b'" in problem and "'law'" in problem


def test_domains_none_allows_any_domain():
    assert plan_problem([spec("a", domain="anything")], None) is None


def test_a_two_cycle_is_named_in_order():
    assert plan_problem([spec("a", "b"), spec("b", "a")]) == "dependency cycle: a -> b -> a"


def test_a_self_dependency_is_a_cycle():
    assert plan_problem([spec("a", "a")]) == "dependency cycle: a -> a"


def test_a_cycle_behind_an_acyclic_prefix_names_only_the_cycle():
    # x depends on a; a -> b -> c -> a is the cycle, x is not part of it
    problem = plan_problem([spec("x", "a"), spec("a", "b"), spec("b", "c"), spec("c", "a")])
    assert problem == "dependency cycle: a -> b -> c -> a"


def test_a_diamond_is_not_a_cycle():
    assert plan_problem([spec("a"), spec("b", "a"), spec("c", "a"), spec("d", "b", "c")]) is None


def test_a_5000_node_chain_is_checked_without_recursion_error():
    n = 5000
    chain = [spec("n0")] + [spec(f"n{i}", f"n{i - 1}") for i in range(1, n)]
    assert plan_problem(chain) is None


def test_a_5000_node_ring_is_named_whole():
    n = 5000
    ring = {f"n{i}": [f"n{(i + 1) % n}"] for i in range(n)}
    cycle = find_cycle(ring)
    assert cycle is not None
    assert len(cycle) == n + 1 and cycle[0] == cycle[-1]
    # every edge of the reported cycle is a real dependency
    assert all(cycle[i + 1] in ring[cycle[i]] for i in range(n))


# --------------------------------------------------------------------------- find_cycle


def test_find_cycle_on_an_acyclic_graph_is_none():
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_find_cycle_follows_dependency_edges():
    cycle = find_cycle({"a": ["b"], "b": ["c"], "c": ["b"]})
    assert cycle == ["b", "c", "b"]


def test_find_cycle_ignores_nodes_outside_the_graph():
    assert find_cycle({"a": ["outside"]}) is None


def test_find_cycle_in_a_later_component():
    cycle = find_cycle({"a": [], "b": ["a"], "c": ["d"], "d": ["c"]})
    assert cycle == ["c", "d", "c"]


# --------------------------------------------------------------------------- read_plan


def test_read_plan_of_a_good_answer_gives_text_subtasks():
    answer = plan_json({"id": "a", "domain": "code", "prompt": "write a"},
                       {"id": "b", "domain": "docs", "prompt": "document a", "depends_on": ["a"],
                        "estimated_tokens": 500})
    subtasks, problem = read_plan(answer, None)
    assert problem is None
    assert [s.id for s in subtasks] == ["a", "b"]
    assert all(s.kind == "text" for s in subtasks)
    assert subtasks[1].depends_on == ["a"] and subtasks[1].estimated_tokens == 500


def test_the_plan_schema_accepts_what_read_plan_accepts():
    answer = plan_json({"id": "a", "domain": "code", "prompt": "write a", "depends_on": []})
    assert Draft202012Validator(PLAN_SCHEMA).is_valid(orjson.loads(answer))
    assert read_plan(answer, None)[1] is None


@pytest.mark.parametrize("answer", [None, ""])
def test_read_plan_of_no_answer(answer):
    assert read_plan(answer, None) == ([], "the planner gave no answer")


@pytest.mark.parametrize("answer", ["not json", "{\"subtasks\": [", "[1, 2]", "42", "{}",
                                    "{\"subtasks\": null}", "{\"subtasks\": [\"a\"]}"])
def test_read_plan_of_an_answer_that_is_not_a_plan_object(answer):
    subtasks, problem = read_plan(answer, None)
    assert subtasks == []
    assert problem is not None and problem.startswith("the plan is not a JSON object with subtasks")


def test_read_plan_refuses_a_subtask_with_a_bad_id():
    subtasks, problem = read_plan(plan_json({"id": "has space", "domain": "d", "prompt": "p"}),
                                  None)
    assert subtasks == []
    assert problem is not None and problem.startswith("a planned subtask is invalid")


def test_read_plan_refuses_a_subtask_missing_its_prompt():
    subtasks, problem = read_plan(plan_json({"id": "a", "domain": "d"}), None)
    assert subtasks == [] and problem is not None and "invalid" in problem


def test_read_plan_refuses_an_unknown_field():
    subtasks, problem = read_plan(plan_json({"id": "a", "domain": "d", "prompt": "p",
                                             "colour": "red"}), None)
    assert subtasks == [] and problem is not None and "invalid" in problem


def test_read_plan_refuses_a_planned_kind():
    # planned subtasks are text tasks: a plan cannot choose another kind
    subtasks, problem = read_plan(plan_json({"id": "a", "domain": "d", "prompt": "p",
                                             "kind": "code"}), None)
    assert subtasks == [] and problem is not None


def test_read_plan_names_a_cycle():
    answer = plan_json({"id": "a", "domain": "d", "prompt": "p", "depends_on": ["b"]},
                       {"id": "b", "domain": "d", "prompt": "q", "depends_on": ["a"]})
    assert read_plan(answer, None) == ([], "dependency cycle: a -> b -> a")


def test_read_plan_applies_the_jobs_domains():
    answer = plan_json({"id": "a", "domain": "law", "prompt": "p"})
    subtasks, problem = read_plan(answer, ["code"])
    assert subtasks == [] and problem is not None and "'law'" in problem


def test_read_plan_refuses_an_empty_plan():
    assert read_plan(plan_json(), None) == ([], "the plan has no subtasks")


def test_planning_prompt_names_goal_and_domains():
    prompt = planning_prompt("build a parser", ["code", "docs"])
    assert "build a parser" in prompt and "code, docs" in prompt
    assert "Use only these domains" not in planning_prompt("g", None)


# --------------------------------------------------------------------------- JobSubmitted


def test_a_job_with_a_goal_only_is_accepted():
    job = JobSubmitted(job_id="j1", goal="write a parser")
    assert job.subtasks is None


def test_a_job_with_subtasks_only_is_accepted():
    job = JobSubmitted(job_id="j1", subtasks=[spec("a")])
    assert [s.id for s in job.subtasks] == ["a"]


@pytest.mark.parametrize("goal", [None, "", "   "])
def test_a_job_with_neither_goal_nor_subtasks_is_refused(goal):
    with pytest.raises(ValidationError, match="field 'goal' or 'subtasks'"):
        JobSubmitted(job_id="j1", goal=goal)


def test_a_job_with_an_empty_plan_is_refused():
    with pytest.raises(ValidationError, match="field 'subtasks': the plan has no subtasks"):
        JobSubmitted(job_id="j1", subtasks=[])


def test_a_job_with_a_cycle_is_refused_naming_it():
    with pytest.raises(ValidationError, match="field 'subtasks': dependency cycle: a -> b -> a"):
        JobSubmitted(job_id="j1", subtasks=[spec("a", "b"), spec("b", "a")])


def test_a_job_with_an_unknown_dependency_is_refused():
    with pytest.raises(ValidationError, match="field 'subtasks'.*'ghost'"):
        JobSubmitted(job_id="j1", subtasks=[spec("a", "ghost")])


def test_a_job_with_a_domain_outside_its_domains_is_refused():
    with pytest.raises(ValidationError, match="field 'subtasks'.*'law'"):
        JobSubmitted(job_id="j1", domains=["code"], subtasks=[spec("a", domain="law")])


@pytest.mark.parametrize("reserve", [100, 101])
def test_a_reserve_not_below_the_token_budget_is_refused(reserve):
    with pytest.raises(ValidationError, match="field 'reserve_tokens'"):
        JobSubmitted(job_id="j1", goal="g", budget_tokens=100, reserve_tokens=reserve)


def test_a_reserve_just_below_the_token_budget_is_accepted():
    job = JobSubmitted(job_id="j1", goal="g", budget_tokens=100, reserve_tokens=99)
    assert job.reserve_tokens == 99


def test_a_reserve_without_a_token_budget_is_accepted():
    # no budget: unlimited, the reserve is not checked against anything
    assert JobSubmitted(job_id="j1", goal="g", reserve_tokens=10).budget_tokens is None


def test_a_usd_reserve_not_below_the_usd_budget_is_refused():
    with pytest.raises(ValidationError, match="field 'reserve_usd'"):
        JobSubmitted(job_id="j1", goal="g", budget_usd=1.0, reserve_usd=1.0)


def test_an_invalid_job_id_is_refused():
    with pytest.raises(ValidationError, match="job_id"):
        JobSubmitted(job_id="has space", goal="g")


# --------------------------------------------------------------------------- SubtaskSpec kinds


def test_a_json_subtask_without_schema_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="field 'schema': required for kind json"):
        SubtaskSpec(id="a", domain="d", kind="json", prompt="p")


def test_a_json_subtask_with_a_schema_is_accepted_under_its_wire_name():
    s = SubtaskSpec.model_validate({"id": "a", "domain": "d", "kind": "json", "prompt": "p",
                                    "schema": {"type": "object"}})
    assert s.json_schema == {"type": "object"}
    assert s.model_dump()["schema"] == {"type": "object"}


def test_a_code_subtask_with_a_test_but_no_entry_point_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="field 'entry_point'"):
        SubtaskSpec(id="a", domain="d", kind="code", prompt="def f():\n",
                    test="def check(candidate):\n    pass\n")


def test_a_text_only_check_on_a_code_subtask_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="field 'must_contain': only for kind text"):
        SubtaskSpec(id="a", domain="d", kind="code", prompt="p", must_contain=["x"])


def test_a_schema_on_a_text_subtask_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="field 'schema': only for kind json"):
        SubtaskSpec(id="a", domain="d", kind="text", prompt="p", json_schema={"type": "object"})


def test_a_job_with_a_subtask_that_does_not_fit_its_kind_is_refused():
    with pytest.raises(ValidationError, match="field 'schema'"):
        JobSubmitted.model_validate({"job_id": "j1", "subtasks": [
            {"id": "a", "domain": "d", "kind": "json", "prompt": "p"}]})


def test_a_subtask_priority_out_of_range_is_refused():
    with pytest.raises(ValidationError, match="priority"):
        SubtaskSpec(id="a", domain="d", prompt="p", priority=11)
