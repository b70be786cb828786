"""Visible examples of a code task: extraction from the prompt and a behaviour script.

The consensus manager (SPEC §4, Grokputer seed) groups code candidates "by their outputs on
the prompt's visible examples", and ``first_valid`` / ``best_of_n`` need to know whether a
candidate passes them. This module supplies both halves:

* :func:`extract_examples` statically reads the examples out of a HumanEval-style prompt
  (doctest blocks and the free-form notations HumanEval's docstrings use);
* :func:`behaviour_script` renders a standalone Python script that runs a candidate on those
  examples and prints one JSON line; the caller runs it in the sandbox.

Extraction never executes anything. An example is kept only when its call is a call of the
entry point on literal arguments (doctest lines may also wrap the call in a pure builtin such
as ``round``) and its expected value is a literal expression, so evaluating an example can
only run the candidate's own code.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["Example", "behaviour_script", "extract_examples"]


@dataclass(frozen=True)
class Example:
    """One visible example: ``eval(call_source)`` should equal ``eval(expected_source)``.

    Both fields are Python expression source, e.g. ``Example("add(2, 3)", "5")``.
    """

    call_source: str
    expected_source: str


# --------------------------------------------------------------------------- safety checks

# Operators allowed in literal expressions. Pow is excluded: ``10**10**10`` is a "literal" that
# would hang the script before the candidate even runs.
_SAFE_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)
# Pure builtins a doctest line may wrap around the entry-point call, e.g. HumanEval/32's
# ``round(find_zero([1, 2]), 2)``.
_WRAPPERS = frozenset(
    {"round", "abs", "sorted", "len", "list", "tuple", "set", "str", "int", "float"}
)


def _is_literal(node: ast.AST) -> bool:
    """True when ``node`` is built only from constants, containers and arithmetic on them."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_literal(k) for k in node.keys) and all(
            _is_literal(v) for v in node.values
        )
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.UAdd)) and _is_literal(node.operand)
    if isinstance(node, ast.BinOp):
        return (
            isinstance(node.op, _SAFE_BINOPS) and _is_literal(node.left) and _is_literal(node.right)
        )
    return False


def _is_entry_call(node: ast.AST, name: str, wrappers: bool) -> bool:
    """True for ``name(<literals>)``; with ``wrappers`` also ``round(name(...), 2)`` and kin."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return False
    if node.func.id == name:
        return all(_is_literal(a) for a in node.args) and all(
            k.arg is not None and _is_literal(k.value) for k in node.keywords
        )
    if not wrappers or node.func.id not in _WRAPPERS or node.keywords or not node.args:
        return False
    first, rest = node.args[0], node.args[1:]
    return _is_entry_call(first, name, True) and all(_is_literal(a) for a in rest)


def _parse_expr(source: str) -> ast.expr | None:
    """The expression tree of ``source``, or None when it is not a single expression."""
    try:
        return ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError):  # ValueError: source contains a NUL byte
        return None


def _segment(source: str, node: ast.expr) -> str:
    """The source text of ``node`` parsed from one-line ``source`` (offsets are UTF-8 bytes)."""
    return source.encode()[node.col_offset : node.end_col_offset].decode()


# Docstrings sometimes spell results the JavaScript way (HumanEval/76: ``=> true``).
_BARE_WORDS = {"true": "True", "false": "False", "none": "None", "null": "None"}


# Bounds that keep extraction linear on adversarial prompts (one huge line, many tokens);
# HumanEval's longest example value is ~150 characters.
_MAX_EXPR_CHARS = 2000
_MAX_CUTS = 16
_MAX_SITES = 256  # candidate example sites examined per notation
_MAX_REGION_CHARS = 20_000  # docstring text searched; HumanEval's longest is ~1,500


def _cut_points(text: str, pattern: str) -> list[int]:
    """Positions of the first ``_MAX_CUTS`` matches of ``pattern``, last first."""
    cuts = [m.start() for m, _ in zip(re.finditer(pattern, text), range(_MAX_CUTS))]
    return cuts[::-1]


def _literal_prefix(text: str) -> str | None:
    """The longest whitespace-delimited prefix of ``text`` that is a literal expression.

    Handles prose after a value (``15 and closest_integer(...)``), sentence punctuation
    (``16.``) and arithmetic spelled out with ``=`` (``19 - 5 - 6 = 8`` -> ``19 - 5 - 6``).
    Returns the expression's own source, without trailing comments; None if no prefix works.
    """
    text = text.strip()[:_MAX_EXPR_CHARS]
    if text.lower() in _BARE_WORDS:
        return _BARE_WORDS[text.lower()]
    cuts = [len(text)] + _cut_points(text, r"\s")
    for cut in cuts:
        candidate = text[:cut].rstrip()
        # A trailing full stop ends the sentence; "16." would otherwise be the float 16.0.
        if candidate.endswith(".") and _parse_expr(candidate[:-1]) is not None:
            candidate = candidate[:-1]
        node = _parse_expr(candidate)
        if node is not None and _is_literal(node):
            return _segment(candidate.strip(), node)
    return None


# --------------------------------------------------------------------------- locating text


def _docstring_region(prompt: str, name: str) -> str:
    """The raw source of ``name``'s docstring, or the whole prompt when it cannot be located.

    Raw source rather than the docstring's value: examples are code, so escapes such as
    HumanEval/51's ``"abcdef\\nghijklm"`` must stay as written.
    """
    fn = re.search(rf"\bdef\s+{re.escape(name)}\s*\(", prompt)
    if fn is None:
        return prompt
    opening = re.compile(r"\"\"\"|'''").search(prompt, fn.end())
    if opening is None:
        return prompt[fn.end() :]
    closing = prompt.find(opening.group(), opening.end())
    return prompt[opening.end() : closing if closing >= 0 else len(prompt)]


def _last_def_name(prompt: str) -> str | None:
    """Name of the last ``def`` in the prompt: HumanEval puts helpers before the entry point."""
    names = re.findall(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", prompt, re.MULTILINE)
    return names[-1] if names else None


def _matching_paren(text: str, open_index: int) -> int | None:
    """Index just past the parenthesis closing ``text[open_index]``; None if unbalanced.

    Skips brackets inside string literals; a string may not span lines. Gives up after
    ``_MAX_EXPR_CHARS`` characters.
    """
    depth = 0
    quote: str | None = None
    i = open_index
    while i < min(len(text), open_index + _MAX_EXPR_CHARS):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
            elif ch == "\n":
                return None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _join_lines(source: str) -> str:
    """A multi-line expression on one line, doctest continuation prompts (``...``) removed."""
    lines = [ln.strip() for ln in source.splitlines()]
    return " ".join(ln[3:].strip() if ln.startswith("...") else ln for ln in lines if ln)


# --------------------------------------------------------------------------- the notations

_DOCTEST = re.compile(r"^[ \t]*>>>[ \t]?(?P<src>.*)$", re.MULTILINE)
# Separators between a call and its result, longest first so "==>" is not read as "==";
# HumanEval/79 and /141 put them in a comment (``f(15)  # returns "db1111db"``).
_SEPARATOR = re.compile(
    r"\s*#?\s*(?:==>|-->|==|=>|->|➞|→|=|should\s+return|should\s+be|returns|gives)\s*:?",
)
# Spans are bounded ({0,300}) so a long line with many "For"/"Input" stays linear.
_FOR_FORM = re.compile(
    r"\bFor\s+(?P<args>[^\n]{0,300}?)\s+the\s+(?:output|result)\s+should\s+be\s+"
    r"(?P<out>[^\n]{0,300})",
)
_INPUT_OUTPUT = re.compile(
    r"\bInput\s*:(?P<args>(?:[^\n]{0,300}\n){0,4}?[^\n]{0,300}?)\n?[ \t]*Output\s*:[ \t]*"
    r"(?P<out>[^\n]{0,300})",
)
_NAMED_VALUE = re.compile(r"^\s*[A-Za-z_]\w*\s*[:=]\s*(?P<value>\S.*)$")


def _doctests(text: str, name: str) -> list[tuple[int, Example]]:
    """``>>> call`` lines with the output on the following lines (blank output means None).

    ``>>> f(x) == y`` with no output or ``True`` (HumanEval/108) is read as ``f(x)`` -> ``y``.
    """
    found: list[tuple[int, Example]] = []
    for m, _ in zip(_DOCTEST.finditer(text), range(_MAX_SITES)):
        node = _parse_expr(m.group("src"))
        if node is None:
            continue
        output_lines: list[str] = []
        pos = m.end() + 1
        while pos < len(text):
            line_end = text.find("\n", pos)
            line = text[pos : line_end if line_end >= 0 else len(text)]
            if not line.strip() or line.lstrip().startswith(">>>"):
                break
            output_lines.append(line)
            pos += len(line) + 1
        output = _join_lines("\n".join(output_lines))
        if (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.Eq)
            and output in ("", "True")
        ):
            call, expected = node.left, _segment(m.group("src").strip(), node.comparators[0])
        else:
            call, expected = node, _literal_prefix(output or "None")
        if expected is None or not _is_entry_call(call, name, wrappers=True):
            continue
        if (expected_node := _parse_expr(expected)) is None or not _is_literal(expected_node):
            continue
        found.append((m.start(), Example(_segment(m.group("src").strip(), call), expected)))
    return found


def _inline_calls(text: str, name: str) -> list[tuple[int, Example]]:
    """``f(x) <separator> y`` anywhere outside doctest lines, calls possibly spanning lines."""
    found: list[tuple[int, Example]] = []
    sites = re.finditer(rf"(?<![\w.]){re.escape(name)}\s*\(", text)
    for m, _ in zip(sites, range(_MAX_SITES)):
        line_start = text.rfind("\n", 0, m.start()) + 1
        before = text[line_start : m.start()]
        if before.lstrip().startswith(">>>") or before.rstrip().endswith("def"):
            continue
        end = _matching_paren(text, m.end() - 1)
        if end is None:
            continue
        line_end = text.find("\n", end, end + _MAX_EXPR_CHARS)
        remainder = text[end : line_end if line_end >= 0 else end + _MAX_EXPR_CHARS]
        sep = _SEPARATOR.match(remainder)
        if sep is None:
            continue
        call_source = _join_lines(text[m.start() : end])
        call = _parse_expr(call_source)
        expected = _literal_prefix(remainder[sep.end() :])
        if call is not None and expected is not None and _is_entry_call(call, name, False):
            found.append((m.start(), Example(call_source, expected)))
    return found


def _arguments(text: str) -> list[str] | None:
    """Argument sources from ``x = 1, y = "a"``, ``[1, 2]`` or ``name : value`` lines.

    Values are returned positionally in the order written; trailing prose after a comma
    (``N = 1000, the sum of digits will be 1``) is dropped.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and all(_NAMED_VALUE.match(ln) for ln in lines):
        values = [_NAMED_VALUE.match(ln).group("value") for ln in lines]  # type: ignore[union-attr]
        return values if all(_literal_prefix(v) == v.strip() for v in values) else None
    flat = _join_lines(text)[:_MAX_EXPR_CHARS]
    cuts = [len(flat)] + _cut_points(flat, ",")
    for cut in cuts:
        node = _parse_expr(f"_({flat[:cut]})")
        if not isinstance(node, ast.Call):
            continue
        values_nodes = list(node.args) + [k.value for k in node.keywords if k.arg is not None]
        if len(values_nodes) == len(node.args) + len(node.keywords) and all(
            _is_literal(v) for v in values_nodes
        ):
            return [_segment(f"_({flat[:cut]})", v) for v in values_nodes]
    return None


def _assignment_forms(text: str, name: str) -> list[tuple[int, Example]]:
    """``For lst = [1,2] the output should be 3`` and ``Input: ... / Output: ...`` blocks."""
    found: list[tuple[int, Example]] = []
    # The keyword tests skip two costly regex scans on the many prompts without these forms.
    patterns = [
        p for key, p in (("should be", _FOR_FORM), ("Output", _INPUT_OUTPUT)) if key in text
    ]
    for pattern in patterns:
        for m, _ in zip(pattern.finditer(text), range(_MAX_SITES)):
            args = _arguments(m.group("args"))
            expected = _literal_prefix(m.group("out"))
            if args is not None and args and expected is not None:
                found.append((m.start(), Example(f"{name}({', '.join(args)})", expected)))
    return found


def extract_examples(prompt: str, entry_point: str | None) -> list[Example]:
    """The visible examples of a code prompt, in the order they appear, without duplicates.

    Reads ``entry_point``'s docstring (the whole prompt when there is none) for doctest blocks,
    ``f(x) == y`` / ``==>`` / ``=>`` / ``➞`` / ``->`` / ``returns`` / ``should return`` lines,
    ``For x = ... the output should be y`` sentences and ``Input: / Output:`` blocks. When
    ``entry_point`` is None the last function defined in the prompt is used. Never raises;
    returns ``[]`` when nothing usable is found. Only examples whose call is an entry-point
    call on literal arguments and whose expected value is a literal are kept (module doc).
    Only the first 20,000 characters of the docstring are searched.
    """
    name = entry_point or _last_def_name(prompt)
    if not name or not name.isidentifier():
        return []
    text = _docstring_region(prompt, name)[:_MAX_REGION_CHARS]
    found = _doctests(text, name) + _inline_calls(text, name) + _assignment_forms(text, name)
    found.sort(key=lambda item: item[0])
    seen: set[Example] = set()
    examples: list[Example] = []
    for _, example in found:
        if example not in seen:
            seen.add(example)
            examples.append(example)
    return examples


# --------------------------------------------------------------------------- behaviour script

_SCRIPT = """\
import hashlib, io, json, math, signal, sys

CODE = {code!r}
ENTRY_POINT = {entry_point!r}
EXAMPLES = {examples!r}
CALL_TIMEOUT_S = {timeout!r}
MAX_REPR = 1000


class _CallTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _CallTimeout()


def _error(exc):
    name = "Timeout" if isinstance(exc, _CallTimeout) else type(exc).__name__
    return "<error:" + name + ">"


def _short_repr(value):
    # Bound the JSON line while keeping distinct long outputs distinct.
    text = repr(value)
    if len(text) <= MAX_REPR:
        return text
    return text[:MAX_REPR] + "...<sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16] + ">"


def _close(actual, expected):
    # Docstrings print floats rounded, so numbers compare with a small tolerance.
    if type(actual) in (int, float) and type(expected) in (int, float):
        return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9)
    if type(actual) in (list, tuple) and type(actual) is type(expected):
        return len(actual) == len(expected) and all(map(_close, actual, expected))
    return bool(actual == expected)


real_stdout = sys.stdout
sys.stdout = io.StringIO()  # the candidate's prints must not corrupt the JSON line
signal.signal(signal.SIGALRM, _alarm)
namespace = {{"__name__": "candidate"}}
outputs, passed = [], []
try:
    signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT_S)
    exec(compile(CODE, "<candidate>", "exec"), namespace)
    signal.setitimer(signal.ITIMER_REAL, 0)
    load_error = None if callable(namespace.get(ENTRY_POINT)) else "<error:NameError>"
except BaseException as exc:
    signal.setitimer(signal.ITIMER_REAL, 0)
    load_error = _error(exc)
for call_source, expected_source in EXAMPLES:
    if load_error is not None:
        outputs.append(load_error)
        passed.append(False)
        continue
    try:
        signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT_S)
        result = eval(call_source, namespace)
        signal.setitimer(signal.ITIMER_REAL, 0)
        outputs.append(_short_repr(result))
    except BaseException as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        outputs.append(_error(exc))
        passed.append(False)
        continue
    try:
        passed.append(_close(result, eval(expected_source, {{"__builtins__": {{}}}})))
    except BaseException:
        passed.append(False)
sys.stdout = real_stdout
print(json.dumps({{"outputs": outputs, "passed": passed}}))
"""


def behaviour_script(
    code: str, entry_point: str, examples: list[Example], call_timeout_s: float = 2.0
) -> str:
    """A standalone Python script running ``code`` on ``examples``; prints one JSON line.

    The line is ``{"outputs": [...], "passed": [...]}`` with one entry per example:
    ``outputs[i]`` is the ``repr`` of the result (long ones truncated with a hash suffix) or
    ``"<error:TypeName>"`` (``"<error:Timeout>"`` after ``call_timeout_s`` seconds of wall
    time per call, via SIGALRM); ``passed[i]`` says whether the result equals
    ``eval(expected_source)`` (numbers within 1e-6 relative tolerance). If ``code`` itself
    fails to load, every output is that error. The candidate runs with ``__name__`` set to
    ``"candidate"`` so its ``if __name__ == "__main__"`` block stays inert, and its own
    prints are swallowed; a ``code`` that does not define a callable ``entry_point`` counts as
    failing to load (``"<error:NameError>"``). The script is meant for the bwrap sandbox
    (SPEC §4 validator), which adds the overall wall-time, memory and network limits.
    """
    return _SCRIPT.format(
        code=code,
        entry_point=entry_point,
        examples=[(e.call_source, e.expected_source) for e in examples],
        timeout=float(call_timeout_s),
    )
