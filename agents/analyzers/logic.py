"""Logic specialist: what kind of problem the task is and how hard (SPEC §4).

Its two features, ``task_type`` and ``complexity``, become part of the Q-learning state, so
the vocabulary is small and fixed:

``task_type``
    ``string``       manipulating characters, words, case, palindromes, ciphers
    ``list``         transforming or aggregating sequences / arrays element-wise
    ``math``         arithmetic and number theory on numbers: primes, digits, sums, series
    ``dict``         building or inspecting dictionaries / key-value mappings
    ``parsing``      reading structured notation: brackets, dates, notes, numerals, formats
    ``search_sort``  ordering, ranking, min/max/closest/k-th selection, searching
    ``text``         a plain-language (``kind="text"``) task: no code is asked for
    ``other``        no signal for any of the above

``complexity`` is ``low`` / ``medium`` / ``high``.

Both come from static evidence only: the entry point's annotations and names, what its
docstring says it returns, and keywords in the docstring. Each type scores points
(annotations, names and the returned noun weigh more than other prose);
the highest score wins, ties going to the more specific type (order of ``TASK_TYPES``). On
HumanEval's 164 problems the split is about 39 % math, 25 % list, 24 % string, and the
rest parsing, search_sort and dict (see the tests).
"""

from __future__ import annotations

import re
from functools import lru_cache

from agents.analyzers.syntax import PromptSyntax, prompt_syntax
from models.events import AnalyzerResult, TaskSubmitted

NAME = "logic"

TASK_TYPES: tuple[str, ...] = (
    "dict", "parsing", "search_sort", "string", "list", "math", "text", "other",
)  # fmt: skip
"""The vocabulary, most specific first: that order breaks score ties."""

# Keyword stems per type, matched at the start of each word of the docstring and identifiers.
# fmt: off
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "dict": ("dict", "dictionar", "key", "histogram", "mapping", "frequenc"),
    "parsing": (
        "pars", "paren", "bracket", "nest", "format", "date", "roman", "numeral", "notation",
        "music", "note", "expression", "grammar", "syntax", "delimit", "valid", "extension",
    ),
    "search_sort": (
        "sort", "order", "ascending", "descending", "largest", "smallest", "maxim", "minim",
        "max", "min", "closest", "kth", "search", "rank", "rearrang",
    ),
    "string": (
        "string", "str", "char", "letter", "vowel", "consonant", "word", "sentence", "substring",
        "prefix", "suffix", "upper", "lower", "case", "palindrom", "alphabet", "encrypt",
        "encod", "decod", "cipher", "text", "ascii", "space",
    ),
    "list": (
        "list", "array", "element", "sublist", "subarray", "index", "indic", "pair", "tuple",
        "vector", "lst", "arr", "grid",
    ),
    "math": (
        "integer", "number", "prime", "digit", "factor", "fib", "divis", "divid", "multipl",
        "sum", "product", "square", "cube", "power", "modul", "gcd", "even", "odd", "triangl",
        "area", "polynom", "decimal", "binary", "base", "round", "average", "mean", "median",
        "arithmetic", "algebra",
    ),
}
# Stems too short to be prefixes ("str" is not "strange", "min" is not "minute"): they match
# the word itself or its plural only.
_WHOLE_WORDS = frozenset((
    "str", "max", "min", "arr", "lst", "key", "odd", "even", "sum", "mean", "case", "note",
    "date", "base", "text", "space", "pair", "kth",
))
# fmt: on
_WORD = re.compile(r"[a-z]+")
# Annotations are the strongest evidence of the data the function works on.
_ANNOTATION = (
    ("dict", re.compile(r"\b(?:dict|Dict|Mapping)\b")),
    ("string", re.compile(r"\bstr\b")),
    ("list", re.compile(r"\b(?:list|List|tuple|Tuple|Sequence|Iterable)\b")),
    ("math", re.compile(r"\b(?:int|float)\b")),
)
_RETURNED = re.compile(
    r"\breturns?\s+(?:(?:a|an|the)\s+)?(?:(?:new|sorted|single)\s+)?([A-Za-z]+)", re.IGNORECASE
)
_ANNOTATION_WEIGHT = 2.0
_NAME_WEIGHT = 2.0  # per stem hit in the function / parameter names
_PROSE_CAP = 4  # prose hits per type beyond this add nothing: long docstrings repeat words

# Complexity evidence.
_STRUCTURE = re.compile(
    r"\b(?:nested|grid|matrix|recurs\w*|tree|graph|path|interval|collision|"
    r"sequence|fibonacci|tribonacci|collatz|subsequence)\b",
    re.IGNORECASE,
)
_CONDITIONS = re.compile(
    r"\b(?:if and only if|otherwise|unless|except|at least|at most|exactly|only if|"
    r"in case|note|constraints?|assume|ignore)\b",
    re.IGNORECASE,
)
_EMPTY = re.compile(r"\bempty\b", re.IGNORECASE)
_RULE_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+\S", re.MULTILINE)


def _identifier_words(info: PromptSyntax) -> list[str]:
    """Function and parameter names as lowercase words (``sortArray``, ``sort_array`` ->
    ``["sort", "array"]``)."""
    names = " ".join([info.entry_point or "", *(p for p, _ in info.params)])
    return _WORD.findall(re.sub(r"([a-z])([A-Z])", r"\1 \2", names).lower())


@lru_cache(maxsize=8192)
def _types_of(word: str) -> tuple[str, ...]:
    """The task types with a keyword matching ``word`` (memoised: prose reuses words)."""
    return tuple(
        t
        for t, stems in _KEYWORDS.items()
        if any(word in (s, s + "s") if s in _WHOLE_WORDS else word.startswith(s) for s in stems)
    )


def classify(info: PromptSyntax) -> tuple[str, float]:
    """``(task_type, confidence)`` for a parsed prompt; confidence in [0.3, 0.85].

    Confidence grows with the winner's margin over the runner-up: a clear winner is 0.85,
    a near tie 0.45, no evidence at all ``("other", 0.3)``; text tasks are ``("text", 0.85)``.
    """
    if info.kind != "code":
        return "text", 0.85
    scores = dict.fromkeys(_KEYWORDS, 0.0)
    annotations = " ".join(a for _, a in info.params if a) + " " + (info.returns or "")
    for task_type, pattern in _ANNOTATION:
        scores[task_type] += _ANNOTATION_WEIGHT * len(pattern.findall(annotations))
    for word in _identifier_words(info):
        for task_type in _types_of(word):
            scores[task_type] += _NAME_WEIGHT
    # "return a dictionary ..." states the output type as plainly as an annotation does.
    if returned := _RETURNED.search(info.text):
        for task_type in _types_of(returned.group(1).lower()):
            scores[task_type] += _ANNOTATION_WEIGHT
    prose = dict.fromkeys(_KEYWORDS, 0)
    # Example lines repeat the function's name; it already counted once, as a name.
    description = info.text.replace(info.entry_point, " ") if info.entry_point else info.text
    for word in _WORD.findall(description.lower()):
        for task_type in _types_of(word):
            prose[task_type] += 1
    for task_type, hits in prose.items():
        scores[task_type] += min(hits, _PROSE_CAP)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], TASK_TYPES.index(kv[0])))
    (best, top), (_, second) = ranked[0], ranked[1]
    if top == 0:
        return "other", 0.3
    return best, round(0.45 + 0.4 * (top - second) / top, 3)


def complexity(info: PromptSyntax, n_examples: int, n_helpers: int) -> tuple[str, int]:
    """``(level, score)``: low for 0 points, medium for 1–2, high for 3 and more.

    Points: docstring length (1 point past 40 words, 2 past 80), three or more
    parameters, words for recursive / nested structures, two or more side conditions
    ("otherwise", "at least", "note", ...), three or more enumerated rules, helper
    functions the solution must work with, and more than four examples (a sign of many
    edge cases). The cut-offs put HumanEval's 164 problems at roughly 30 % low, 55 %
    medium and 15 % high, so the level separates tasks in the routing state.
    """
    n_words = len(info.text.split())
    score = (n_words > 40) + (n_words > 80)
    score += len(info.params) >= 3
    score += bool(_STRUCTURE.search(info.text))
    score += len(_CONDITIONS.findall(info.text)) >= 2
    score += len(_RULE_LINE.findall(info.text)) >= 3
    score += n_helpers > 0
    score += n_examples > 4
    level = "low" if score == 0 else "medium" if score <= 2 else "high"
    return level, score


def analyze(task: TaskSubmitted) -> AnalyzerResult:
    """Classify the task (``task_type``) and estimate its ``complexity``.

    Confidence is :func:`classify`'s. Issues: no evidence for any type. Pure and
    deterministic; never raises on odd prompts (it reads the shared regex fallback when the
    prompt does not parse).
    """
    info = prompt_syntax(task.prompt, task.entry_point, task.kind)
    task_type, confidence = classify(info)
    n_helpers = sum(1 for f in info.functions if f != info.entry_point)
    level, score = complexity(info, len(info.examples), n_helpers)
    issues = ["no evidence of the task's type"] if task_type == "other" else []
    recommendations: list[str] = []
    action_items: list[str] = []
    if level == "high":
        recommendations.append("high complexity: prefer a strong provider or a voting strategy")
        action_items.append("enumerate the docstring's rules and edge cases before coding")
    if _EMPTY.search(info.text):
        action_items.append("handle the empty case the docstring mentions")
    return AnalyzerResult(
        name=NAME,
        confidence=confidence,
        issues=issues,
        recommendations=recommendations,
        action_items=action_items,
        features={"task_type": task_type, "complexity": level, "complexity_score": score},
    )
