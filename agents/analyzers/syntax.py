"""Syntax specialist: the task's signature, docstring and visible examples (SPEC §4).

Besides its own :func:`analyze`, this module owns :func:`prompt_syntax`, the one parse of a
prompt that every specialist reads. Parsing and example extraction are the swarm's largest
costs, so they happen once per prompt (memoised) rather than once per specialist.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, replace
from functools import lru_cache

from agents.examples import Example, extract_examples
from models.events import AnalyzerResult, TaskSubmitted

NAME = "syntax"

_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([A-Za-z_]\w*)[ \t]*\(([^)]*)\)", re.MULTILINE)
_DOCSTRING = re.compile(r"(\"\"\"|''')(.*?)(?:\1|\Z)", re.DOTALL)
_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*)([\w.]*)[ \t]+import\b|import[ \t]+([\w., \t]+))", re.MULTILINE
)


@dataclass(frozen=True)
class PromptSyntax:
    """What static analysis of one prompt yields; shared by all five specialists.

    ``error`` is None when the prompt parsed as Python (``"line N: msg"`` otherwise, and
    always None for text tasks, which are not parsed). When parsing fails the other fields
    come from regex fallbacks, so the specialists still see the functions and imports.
    ``params`` pairs each parameter of the entry point with its annotation source (or
    None). ``imports`` holds ``(module, level)`` for every import anywhere in the prompt
    (``level`` > 0 for relative imports); ``calls`` the dotted names of every call
    (``"eval"``, ``"os.system"``). ``text`` is the prose to read: the entry point's
    docstring for code, the whole prompt for text. ``examples`` are the entry point's
    visible examples (:func:`agents.examples.extract_examples`).
    """

    kind: str
    error: str | None
    functions: tuple[str, ...]
    entry_point: str | None
    entry_found: bool
    params: tuple[tuple[str, str | None], ...]
    returns: str | None
    text: str
    imports: tuple[tuple[str, int], ...]
    calls: frozenset[str]
    examples: tuple[Example, ...] = ()

    @property
    def signature(self) -> str | None:
        """``name(a: int, b) -> str`` for the entry point, None when it was not found."""
        if not self.entry_found or self.entry_point is None:
            return None
        params = ", ".join(p if a is None else f"{p}: {a}" for p, a in self.params)
        arrow = f" -> {self.returns}" if self.returns else ""
        return f"{self.entry_point}({params}){arrow}"


def _dotted(node: ast.expr) -> str | None:
    """``os.path.join`` for an attribute chain on a name; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _from_tree(kind: str, tree: ast.Module, entry_point: str | None) -> PromptSyntax:
    functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    imports: list[tuple[str, int]] = []
    calls: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append(node)
        elif isinstance(node, ast.Import):
            imports.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.append((node.module or "", node.level))
        elif isinstance(node, ast.Call) and (name := _dotted(node.func)) is not None:
            calls.add(name)
    # ast.walk is breadth-first; source order makes "last function" mean what a reader sees.
    functions.sort(key=lambda f: (f.lineno, f.col_offset))
    names = tuple(f.name for f in functions)
    target = entry_point or (names[-1] if names else None)
    fn = next((f for f in functions if f.name == target), None)
    if fn is None:
        # Without the entry point, the nearest prose still tells the others what the task is.
        return PromptSyntax(
            kind=kind,
            error=None,
            functions=names,
            entry_point=target,
            entry_found=False,
            params=(),
            returns=None,
            text=_docstring(functions[-1]) if functions else ast.get_docstring(tree) or "",
            imports=tuple(imports),
            calls=frozenset(calls),
        )
    args = fn.args
    params = tuple(
        (a.arg, ast.unparse(a.annotation) if a.annotation is not None else None)
        for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)
    )
    returns = ast.unparse(fn.returns) if fn.returns is not None else None
    return PromptSyntax(
        kind=kind,
        error=None,
        functions=names,
        entry_point=target,
        entry_found=True,
        params=params,
        returns=returns,
        text=_docstring(fn),
        imports=tuple(imports),
        calls=frozenset(calls),
    )


def _docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's docstring, or its first bare string statement: HumanEval/115 puts an
    ``import`` before the docstring, which still is the specification."""
    for stmt in fn.body:
        if (
            isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str)
        ):
            return inspect.cleandoc(stmt.value.value)
    return ""


def _from_regex(kind: str, prompt: str, entry_point: str | None, error: str) -> PromptSyntax:
    """Best-effort facts from a prompt that does not parse."""
    defs = _DEF.findall(prompt)
    names = tuple(name for name, _ in defs)
    target = entry_point or (names[-1] if names else None)
    raw_params = next((p for name, p in defs if name == target), None)
    params: tuple[tuple[str, str | None], ...] = ()
    if raw_params is not None:
        pieces = (p.split("=")[0] for p in raw_params.split(",") if p.strip())
        params = tuple(
            (name.strip(), ann.strip() or None)
            for name, _, ann in (piece.partition(":") for piece in pieces)
        )
    fn = re.search(rf"\bdef\s+{re.escape(target)}\b", prompt) if target else None
    doc = _DOCSTRING.search(prompt, fn.end()) if fn else None
    # No function at all: the prompt is prose asking for code, and the prose is the spec.
    text = inspect.cleandoc(doc.group(2)) if doc else "" if names else prompt.strip()
    calls = frozenset(re.findall(r"\b([A-Za-z_][\w.]*)\s*\(", prompt)) - set(names)
    return PromptSyntax(
        kind=kind,
        error=error,
        functions=names,
        entry_point=target,
        entry_found=raw_params is not None,
        params=params,
        returns=None,
        text=text,
        imports=_regex_imports(prompt),
        calls=calls,
    )


def _regex_imports(prompt: str) -> tuple[tuple[str, int], ...]:
    """``(module, level)`` of every ``import`` / ``from ... import`` line, found by regex."""
    imports: list[tuple[str, int]] = []
    for dots, module, plain in _IMPORT.findall(prompt):
        if plain:
            imports.extend((m.split()[0], 0) for m in plain.split(",") if m.strip())
        else:
            imports.append((module, len(dots)))
    return tuple(imports)


@lru_cache(maxsize=4096)  # a whole batch (RMO_BATCH_MAX) between the five specialists
def prompt_syntax(prompt: str, entry_point: str | None, kind: str) -> PromptSyntax:
    """Parse ``prompt`` once for all specialists (memoised: the five run back to back).

    Code prompts are parsed with :mod:`ast`; on ``SyntaxError`` (or a NUL byte, or
    nesting too deep for the parser) the regex fallback fills the fields and ``error``
    says why. The entry point's examples are extracted here too, once. Text prompts are
    not parsed: their prose is the whole prompt and any ``import x`` lines in it still
    count as imports. Never raises.
    """
    if kind != "code":
        return PromptSyntax(
            kind=kind,
            error=None,
            functions=(),
            entry_point=None,
            entry_found=False,
            params=(),
            returns=None,
            text=prompt.strip(),
            imports=_regex_imports(prompt),
            calls=frozenset(),
        )
    try:
        info = _from_tree(kind, ast.parse(prompt), entry_point)
    except SyntaxError as exc:
        info = _from_regex(kind, prompt, entry_point, f"line {exc.lineno}: {exc.msg}")
    except (ValueError, RecursionError, MemoryError) as exc:
        info = _from_regex(kind, prompt, entry_point, f"{type(exc).__name__}: {exc}")
    if info.entry_point is None:
        return info
    return replace(info, examples=tuple(extract_examples(prompt, info.entry_point)))


def analyze(task: TaskSubmitted) -> AnalyzerResult:
    """Check that a code task states a usable signature, docstring and examples.

    Issues: the prompt does not parse, no function / the named entry point is missing, no
    docstring, an empty text prompt. Features: ``entry_point``, ``signature``,
    ``n_params``, ``n_examples`` (code tasks). Confidence starts at 0.95 and drops with each
    defect, to 0.2 for a prompt that does not parse. Pure and deterministic.
    """
    if task.kind != "code":
        if not task.prompt.strip():
            return AnalyzerResult(
                name=NAME,
                confidence=0.3,
                issues=["empty prompt"],
                action_items=["ask for a task description"],
            )
        return AnalyzerResult(
            name=NAME,
            confidence=0.9,
            recommendations=["text task: no code structure to check"],
            action_items=["answer in plain text"],
        )
    info = prompt_syntax(task.prompt, task.entry_point, task.kind)
    issues: list[str] = []
    recommendations: list[str] = []
    action_items: list[str] = []
    confidence = 0.95
    if info.error is not None:
        issues.append(f"prompt does not parse: {info.error}")
        confidence = 0.2
    if not info.functions:
        issues.append("no function signature found in the prompt")
        confidence = min(confidence, 0.3)
    elif not info.entry_found:
        issues.append(f"entry point {info.entry_point!r} is not defined in the prompt")
        confidence = min(confidence, 0.4)
    elif task.entry_point is None:
        recommendations.append(f"entry point inferred as {info.entry_point!r} (last function)")
        confidence -= 0.1
    if info.entry_found and not info.text:
        issues.append("entry point has no docstring: the signature is the whole specification")
        confidence -= 0.2
    if info.signature is not None:
        action_items.append(f"implement {info.signature}")
    if info.examples:
        action_items.append(f"satisfy the {len(info.examples)} visible examples")
    elif info.entry_found:
        recommendations.append(
            "no visible examples: candidates cannot be compared by behaviour before validation"
        )
        confidence -= 0.1
    helpers = [f for f in info.functions if f != info.entry_point]
    if helpers:
        action_items.append(f"reuse the prompt's helpers: {', '.join(dict.fromkeys(helpers))}")
    return AnalyzerResult(
        name=NAME,
        confidence=round(max(confidence, 0.1), 3),
        issues=issues,
        recommendations=recommendations,
        action_items=action_items,
        features={
            "entry_point": info.entry_point,
            "signature": info.signature,
            "n_params": len(info.params),
            "n_examples": len(info.examples),
        },
    )
