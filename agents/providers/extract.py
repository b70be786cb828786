"""Turn what a chat model answered into what the pipeline validates (SPEC §4 "Providers").

The sim kind returns a code task's answer as a full module (prompt + completion). Real
models answer in prose with fenced code blocks, and not always as asked: prose around the
block, several blocks (the solution, then example usage), a function body without its
signature, an unterminated block (the answer hit its token limit), no fence at all, or a
``<think>…</think>`` preamble (reasoning models served by Ollama or vLLM).
:func:`extract_code` turns any of these into a module defining the entry point:

1. Candidates are the fenced blocks, Python-tagged or untagged ones first (in order),
   then blocks tagged with another language; with no fence, the answer itself, or its
   part from the first line that starts like Python code.
2. The **last** candidate that defines the entry point with a real body wins (models that
   revise an answer put the final version last). It is sanitized: only imports, function
   and class definitions and assignments are kept, so example calls, ``print``\\ s,
   asserts and ``if __name__ == "__main__":`` blocks do not run when the module is
   imported. The module is the prompt's own context (everything in the prompt but the
   entry point's stub: its imports, helper functions, constants) followed by that code.
3. Otherwise the first candidate that completes the prompt as a function **body** wins:
   the module is the prompt followed by the body, indented to the prompt's body level.
4. Otherwise the module is the prompt followed by the answer's first candidate as written,
   so the validator reports exactly what the model got wrong.

:func:`extract_json` finds the JSON value in an answer to a plain-instruction JSON task;
:func:`clean_text` tidies a text answer.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from dataclasses import dataclass

# Fence languages that hold Python (CommonMark info strings as models write them).
PYTHON_TAGS = frozenset({"", "python", "python3", "py", "py3", "pycon", "ipython"})

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE_OPEN = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[^\s`]*)[^\n`]*$")
_CODE_START = re.compile(r"^(?:async[ \t]+def|def|class|import|from|@)\b")
# Top-level statements kept from a complete answer: what defines things, not what runs them.
_KEPT = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Assign,
    ast.AnnAssign,
)


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block: its language tag (lower case, ``""`` if none) and its text."""

    tag: str
    code: str


def strip_reasoning(answer: str) -> str:
    """``answer`` without ``<think>…</think>`` sections (reasoning models' preamble)."""
    return _THINK.sub("", answer)


def fenced_blocks(answer: str) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown ``answer``, in order (CommonMark fences: three
    or more backticks or tildes, closed by a fence of the same character at least as long;
    an unclosed block runs to the end of the answer). Indented fences (inside list items)
    are dedented."""
    blocks: list[CodeBlock] = []
    lines = answer.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # past the closing fence
        code = textwrap.dedent("\n".join(body))
        blocks.append(CodeBlock(opening["tag"].lower(), code + "\n" if code else ""))
    return blocks


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
        return None


def _is_stub(body: list[ast.stmt]) -> bool:
    """True for a body of only a docstring, ``pass`` or ``...``: a signature, not an answer."""
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare ``...``
        return False
    return True


def _entry_def(tree: ast.Module, entry_point: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The last top-level definition of ``entry_point`` in ``tree`` (the one that counts)."""
    found = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry_point:
            found = node
    return found


def _defines(code: str, entry_point: str) -> ast.Module | None:
    """The parse of ``code`` if it defines ``entry_point`` with a real body, else None."""
    tree = _parse(code)
    if tree is None:
        return None
    node = _entry_def(tree, entry_point)
    return tree if node is not None and not _is_stub(node.body) else None


def _first_line(node: ast.stmt) -> int:
    """1-based first line of ``node``, decorators included."""
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno, *(d.lineno for d in decorators)])


def _imports(code: str) -> set[str]:
    """The top-level import statements of ``code``, normalised by ``ast.unparse``."""
    tree = _parse(code)
    return {ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)} \
        if tree is not None else set()


def _sanitize(code: str, tree: ast.Module, context_imports: set[str]) -> str:
    """The top-level definitions of ``code`` (see ``_KEPT``) as written, in order, less the
    imports the prompt's context already makes: models repeat them (``from typing import
    List`` above the function), and a second copy is a redefinition the static level
    (ruff F811) rejects."""
    lines = code.splitlines()
    kept = [
        "\n".join(lines[_first_line(node) - 1 : node.end_lineno])
        for node in tree.body
        if isinstance(node, _KEPT) and not (isinstance(node, ast.Import | ast.ImportFrom)
                                            and ast.unparse(node) in context_imports)
    ]
    return "\n\n".join(kept) + "\n"


def prompt_context(prompt: str, entry_point: str) -> str:
    """What a complete answer needs from the prompt: the prompt without the entry point's
    stub (its imports, helper functions and constants), or ``""`` when the prompt is not
    Python with such a stub (a prompt in prose)."""
    tree = _parse(prompt)
    node = _entry_def(tree, entry_point) if tree is not None else None
    if node is None:
        return ""
    lines = prompt.splitlines()
    before = "\n".join(lines[: _first_line(node) - 1]).rstrip()
    after = "\n".join(lines[node.end_lineno :]).strip()
    return "\n\n".join(part for part in (before, after) if part)


def _body_indent(prompt: str, entry_point: str) -> str:
    """The indentation of the entry point's body in ``prompt`` (4 spaces if unknown)."""
    tree = _parse(prompt)
    node = _entry_def(tree, entry_point) if tree is not None else None
    if node is not None and node.body:
        line = prompt.splitlines()[node.body[0].lineno - 1]
        return line[: len(line) - len(line.lstrip())] or "    "
    return "    "


def _code_candidates(answer: str) -> list[str]:
    """Candidate code snippets of ``answer`` in the order of step 1 (module docstring)."""
    blocks = fenced_blocks(answer)
    if blocks:
        python = [b.code for b in blocks if b.tag in PYTHON_TAGS]
        return python + [b.code for b in blocks if b.tag not in PYTHON_TAGS]
    candidates = [answer.strip("\n") + "\n"]
    lines = answer.splitlines()
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is not None:
        # Prose around unfenced code: drop what precedes its first code line, and cut what
        # follows where the code stops parsing.
        code_lines = lines[start:]
        for end in range(len(code_lines), 0, -1):
            snippet = "\n".join(code_lines[:end]) + "\n"
            if _parse(snippet) is not None:
                if snippet != candidates[0]:
                    candidates.append(snippet)
                break
    return candidates


def extract_code(answer: str, prompt: str, entry_point: str | None) -> str:
    """A Python module defining ``entry_point``, built from a model's ``answer`` to a code
    task whose ``prompt`` is a module prefix (signature and docstring) as in HumanEval.

    See the module docstring for the rules. The result always starts with the prompt's
    context; it is not guaranteed to parse (step 4), because a wrong answer must stay
    visible to the validator. With no ``entry_point`` to look for, the answer's first
    candidate is the module.
    """
    candidates = _code_candidates(strip_reasoning(answer))
    if entry_point is None:
        return candidates[0]
    complete = [(code, tree) for code in candidates if (tree := _defines(code, entry_point))]
    if complete:
        code, tree = complete[-1]
        context = prompt_context(prompt, entry_point)
        sanitized = _sanitize(code, tree, _imports(context))
        return f"{context}\n\n\n{sanitized}" if context else sanitized
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    indent = _body_indent(prompt, entry_point)
    for code in candidates:
        dedented = textwrap.dedent(code)
        own = _parse(dedented)
        if own is not None and _entry_def(own, entry_point) is not None:
            continue  # a signature with a stub body: nesting it would "complete" nothing
        body = textwrap.indent(dedented, indent)
        if _defines(head + body, entry_point) is not None:
            return head + body
    return head + candidates[0]


def extract_json(answer: str) -> str:
    """The JSON text in a model's ``answer``: a fenced block that parses as JSON (``json``
    tagged ones first), else the whole answer, else the first JSON object or array found
    in the prose. With none, the stripped answer, so the validator reports it."""
    text = strip_reasoning(answer).strip()
    blocks = fenced_blocks(text)
    ordered = [b for b in blocks if b.tag == "json"] + [b for b in blocks if b.tag != "json"]
    for candidate in [b.code.strip() for b in ordered] + [text]:
        try:
            json.loads(candidate)
        except ValueError:
            continue
        return candidate
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            _, end = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        return text[match.start() : end]
    return text


def clean_text(answer: str) -> str:
    """A text answer without reasoning sections and surrounding whitespace."""
    return strip_reasoning(answer).strip()
