"""Realistic wrong answers for the sim provider: AST mutations and syntax errors (SPEC §4).

A mutant is the reference module with one small, plausible mistake of the kind models make:

- ``flip_comparison``: ``<`` ↔ ``<=``, ``>`` ↔ ``>=``, ``==`` ↔ ``!=``, ``in`` ↔ ``not in``,
  ``is`` ↔ ``is not``;
- ``off_by_one``: an integer constant ±1, or a ``range(...)`` stop bound ±1;
- ``drop_statement``: one statement removed from a block that keeps at least one other
  (docstrings and ``pass`` do not count);
- ``drop_call``: a forgotten step in an expression: ``f(x)`` → ``x`` for a function taking
  one argument (``sorted(set(l))`` → ``set(l)``), ``obj.m()`` → ``obj`` for a method
  without arguments (``s.lower()`` → ``s``);
- ``swap_operator``: a wrong arithmetic operator (``+`` ↔ ``-``, ``*`` → ``//``, …, also in
  augmented assignments);
- ``swap_boolean``: ``and`` ↔ ``or``, or a dropped ``not``.

Mutations are found on the AST but applied as edits of the source text (operator tokens are
located with :mod:`tokenize`), so the mutant keeps the original's formatting and comments and
differs from it only at the mutated spot. Only code at or after ``region_start`` is mutated:
the sim provider passes the prompt's length, so helper functions given in the prompt stay
intact and the mutant still starts with the prompt. Every mutant is re-parsed; one that does
not parse is discarded.

A mutant is not necessarily wrong: ``x <= 0`` where no test reaches 0, a dropped statement
that only cached a value, still pass the tests. Which mutants of each HumanEval reference
fail its tests is measured once, by ``python -m agents.providers.calibrate --rebuild``; the
sim provider hands out only those (:mod:`agents.providers.answers`).
"""

from __future__ import annotations

import ast
import io
import random
import tokenize
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

MUTATION_KINDS = (
    "flip_comparison",
    "off_by_one",
    "drop_statement",
    "drop_call",
    "swap_operator",
    "swap_boolean",
)

_FLIP_COMPARISON = {
    "<": "<=",
    "<=": "<",
    ">": ">=",
    ">=": ">",
    "==": "!=",
    "!=": "==",
    "in": "not in",
    "not in": "in",
    "is": "is not",
    "is not": "is",
}

# Swaps stay within one precedence level where possible, so the mutant parses the same way
# around the mutated operator.
_SWAP_OPERATOR = {
    "+": "-",
    "-": "+",
    "*": "//",
    "/": "*",
    "//": "%",
    "%": "//",
    "**": "*",
    "&": "|",
    "|": "&",
    "<<": ">>",
    ">>": "<<",
}
_SWAP_OPERATOR.update({op + "=": new + "=" for op, new in list(_SWAP_OPERATOR.items())})

_SWAP_BOOLEAN = {"and": "or", "or": "and"}

# Operands that can take a trailing ``+ 1`` without parentheses.
_ATOMIC = (ast.Name, ast.Call, ast.Attribute, ast.Subscript, ast.Constant)
_ADDITIVE_OR_TIGHTER = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


@dataclass(frozen=True)
class Mutation:
    """Replace ``source[start:end]`` (character offsets) with ``replacement``."""

    kind: str
    start: int
    end: int
    replacement: str

    def apply(self, source: str) -> str:
        """The mutated source."""
        return source[: self.start] + self.replacement + source[self.end :]


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    string: str


class _Source:
    """Maps AST positions (1-based lines, UTF-8 byte columns) to character offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(i + 1)
        self.tokens = self._tokens(text)
        self._token_starts = [t.start for t in self.tokens]

    def _tokens(self, text: str) -> list[_Token]:
        result = []
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.OP, tokenize.NAME):
                start = self.line_starts[tok.start[0] - 1] + tok.start[1]
                end = self.line_starts[tok.end[0] - 1] + tok.end[1]
                result.append(_Token(start, end, tok.string))
        return result

    def offset(self, lineno: int, byte_col: int) -> int:
        line_start = self.line_starts[lineno - 1]
        # A character is at least one byte, so the first byte_col characters cover the column.
        head = self.text[line_start : line_start + byte_col].encode("utf-8")[:byte_col]
        return line_start + len(head.decode("utf-8", "ignore"))

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def tokens_between(self, start: int, end: int) -> list[_Token]:
        """Operator/name tokens wholly inside ``[start, end)``, parentheses excluded."""
        i = bisect_left(self._token_starts, start)
        found = []
        while i < len(self.tokens) and self.tokens[i].end <= end:
            if self.tokens[i].string not in ("(", ")"):
                found.append(self.tokens[i])
            i += 1
        return found

    def token_after(self, offset: int) -> _Token | None:
        i = bisect_left(self._token_starts, offset + 1)
        return self.tokens[i] if i < len(self.tokens) else None


def _operator_mutation(
    src: _Source, kind: str, left: ast.AST, right: ast.AST, table: dict[str, str]
) -> Mutation | None:
    """Swap the operator written between ``left`` and ``right`` using ``table``."""
    between = src.tokens_between(src.end(left), src.start(right))
    if not between:
        return None
    written = " ".join(t.string for t in between)
    if written not in table:
        return None
    return Mutation(kind, between[0].start, between[-1].end, table[written])


def _is_text_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr | ast.List) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)
    )


def _whole_lines(src: _Source, stmt: ast.stmt) -> tuple[int, int] | None:
    """The character span of the full lines ``stmt`` occupies, if it shares them with nothing.

    Decorated definitions are left alone: their first line is a decorator, not ``stmt``.
    """
    if getattr(stmt, "decorator_list", None):
        return None
    line_start = src.line_starts[stmt.lineno - 1]
    if src.text[line_start : src.start(stmt)].strip():
        return None
    end = src.end(stmt)
    line_end = src.text.find("\n", end)
    line_end = len(src.text) if line_end == -1 else line_end + 1
    rest = src.text[end:line_end].strip()
    if rest and not rest.startswith("#"):
        return None
    return line_start, line_end


def _candidates(src: _Source, tree: ast.AST, region_start: int) -> list[Mutation]:
    found: list[Mutation | None] = []
    for node in ast.walk(tree):
        # Blocks are checked statement by statement: the entry point's ``def`` lies in the
        # prompt while its body lies in the region.
        if isinstance(node, ast.Module | ast.stmt | ast.ExceptHandler):
            found.extend(_drop_statement_mutations(src, node, region_start))
        if not hasattr(node, "lineno") or src.start(node) < region_start:
            continue
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for left, right in pairwise(operands):
                found.append(
                    _operator_mutation(src, "flip_comparison", left, right, _FLIP_COMPARISON)
                )
        elif isinstance(node, ast.BinOp):
            if not (_is_text_literal(node.left) or _is_text_literal(node.right)):
                found.append(
                    _operator_mutation(src, "swap_operator", node.left, node.right, _SWAP_OPERATOR)
                )
        elif isinstance(node, ast.AugAssign):
            found.append(
                _operator_mutation(src, "swap_operator", node.target, node.value, _SWAP_OPERATOR)
            )
        elif isinstance(node, ast.BoolOp):
            for left, right in pairwise(node.values):
                found.append(_operator_mutation(src, "swap_boolean", left, right, _SWAP_BOOLEAN))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            following = src.token_after(src.start(node))
            if following is not None:
                found.append(Mutation("swap_boolean", src.start(node), following.start, ""))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            start, end = src.start(node), src.end(node)
            found.append(Mutation("off_by_one", start, end, str(node.value + 1)))
            if node.value > 0:
                found.append(Mutation("off_by_one", start, end, str(node.value - 1)))
        elif isinstance(node, ast.Call):
            if _is_range_call(node):
                found.extend(_range_bound_mutations(src, node))
            found.append(_drop_call_mutation(src, node))
    return [m for m in found if m is not None]


def _is_range_call(node: ast.Call) -> bool:
    return (
        isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and 1 <= len(node.args) <= 3
        and not any(isinstance(a, ast.Starred) for a in node.args)
    )


def _range_bound_mutations(src: _Source, call: ast.Call) -> list[Mutation]:
    """``range(stop)`` → ``range(stop ± 1)``; integer literal bounds are left to constants."""
    stop = call.args[0] if len(call.args) == 1 else call.args[1]
    if isinstance(stop, ast.Constant):
        return []
    start, end = src.start(stop), src.end(stop)
    operand = _operand_text(src, stop)
    return [
        Mutation("off_by_one", start, end, f"{operand} + 1"),
        Mutation("off_by_one", start, end, f"{operand} - 1"),
    ]


def _drop_call_mutation(src: _Source, call: ast.Call) -> Mutation | None:
    """``f(x)`` → ``x`` (one positional argument) or ``obj.m()`` → ``obj`` (no arguments)."""
    if call.keywords:
        return None
    if isinstance(call.func, ast.Name) and len(call.args) == 1:
        kept = call.args[0]
        if isinstance(kept, ast.Starred):
            return None
    elif isinstance(call.func, ast.Attribute) and not call.args:
        kept = call.func.value
    else:
        return None
    return Mutation("drop_call", src.start(call), src.end(call), _operand_text(src, kept))


def _operand_text(src: _Source, node: ast.expr) -> str:
    """The source of ``node``, parenthesized unless it can sit next to ``+`` unchanged."""
    text = src.text[src.start(node) : src.end(node)]
    bare = isinstance(node, _ATOMIC) or (
        isinstance(node, ast.BinOp) and isinstance(node.op, _ADDITIVE_OR_TIGHTER)
    )
    return text if bare else f"({text})"


def _drop_statement_mutations(src: _Source, owner: ast.AST, region_start: int) -> list[Mutation]:
    """Remove one statement of a block of ``owner`` that keeps another working statement."""
    found = []
    for field in ("body", "orelse", "finalbody"):
        block = getattr(owner, field, None)
        if not isinstance(block, list):
            continue
        # Docstrings and ``pass`` do nothing: dropping them changes nothing, and dropping
        # the only real statement of a block leaves an empty answer, not a slip.
        working = [s for s in block if not _is_inert(s)]
        if len(working) < 2:
            continue
        for stmt in working:
            if src.start(stmt) < region_start:
                continue
            span = _whole_lines(src, stmt)
            if span is not None:
                found.append(Mutation("drop_statement", span[0], span[1], ""))
    return found


def _is_inert(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Pass) or (
        isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
    )


@lru_cache(maxsize=4096)
def find_mutations(source: str, region_start: int = 0) -> dict[str, tuple[Mutation, ...]]:
    """All applicable mutations of ``source`` starting at or after ``region_start``, by kind.

    Each listed mutation changes the text and yields a module that still parses. Raises
    SyntaxError if ``source`` itself does not parse. Memoized: a sim provider asks for an
    uncalibrated prompt's mutants on every wrong answer (HumanEval's come precomputed with
    the answer book), and parsing every mutant dominates its cost. The result is shared,
    hence immutable.
    """
    tree = ast.parse(source)
    src = _Source(source)
    by_kind: dict[str, list[Mutation]] = {}
    for mutation in _candidates(src, tree, region_start):
        mutant = mutation.apply(source)
        if mutant != source and _parses(mutant):
            by_kind.setdefault(mutation.kind, []).append(mutation)
    return {kind: tuple(ms) for kind, ms in by_kind.items()}


def pick(by_kind: Mapping[str, Sequence[Mutation]], rng: random.Random) -> Mutation | None:
    """One mutation of ``by_kind``: a kind chosen uniformly among the kinds that have one
    (in sorted order, so the draw does not depend on the mapping's order), then a site.

    Choosing the kind first keeps modules full of integer literals from yielding almost only
    ``off_by_one`` mutants. Returns None, drawing nothing, when there is none.
    """
    kinds = sorted(kind for kind, ms in by_kind.items() if ms)
    if not kinds:
        return None
    return rng.choice(by_kind[rng.choice(kinds)])


def mutate(source: str, rng: random.Random, region_start: int = 0) -> str | None:
    """A mutant of ``source`` (:func:`pick` among :func:`find_mutations`), or None when no
    mutation applies at or after ``region_start``."""
    chosen = pick(find_mutations(source, region_start), rng)
    return None if chosen is None else chosen.apply(source)


def break_syntax(source: str, rng: random.Random, region_start: int = 0) -> str:
    """``source`` cut off inside the code after ``region_start`` so that it no longer parses.

    Mimics an answer truncated mid-generation. Random cut points that still parse are
    retried; if none fails after a few tries, an unclosed parenthesis is appended, which
    never parses.
    """
    tail = len(source) - region_start
    if tail > 1:
        for _ in range(8):
            cut = region_start + rng.randrange(max(1, tail // 4), tail)
            truncated = source[:cut]
            if not _parses(truncated):
                return truncated
    return (source if source.endswith("\n") else source + "\n") + "(\n"


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True
