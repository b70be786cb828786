"""Performance specialist: expected input sizes and a time limit for the tests (SPEC §4).

Reads explicit bounds (``1 <= n <= 10^5``, ``10**6``, ``1e5``, "a million"), efficiency
wording ("efficiently", "large", "O(n)") and recurrence wording (Fibonacci-like sequences,
where naive recursion is exponential). The validator's performance level checks the wall
and CPU time of the task's tests against ``time_limit_ms``.
"""

from __future__ import annotations

import re
from typing import Any

from agents.analyzers.syntax import prompt_syntax
from models.events import AnalyzerResult, TaskSubmitted

NAME = "performance"

TIME_LIMIT_MS: dict[str, int] = {"small": 2000, "medium": 5000, "large": 10000}
"""Suggested wall-time budget (ms) for one run of the task's tests, interpreter start
included, per input scale."""

LARGE_BOUND = 10**5
"""An explicit bound from here on makes a quadratic solution too slow: scale ``large``."""
MEDIUM_BOUND = 10**3
"""An explicit bound from here on is worth a medium scale (and a longer time limit)."""

# Patterns run on the lowercased text, each only when one of its trigger substrings occurs
# (substring tests are far cheaper than regex scans and most docstrings have none).
# Digit counts are capped so that no "bound" overflows a float or int() (10**999, 1e999,
# a 5000-digit number): a prompt must never crash the specialist.
_POWER_OF_TEN = (("10",), re.compile(r"\b10\s*(?:\*\*|\^)\s*(\d{1,2})\b"))
_SCIENTIFIC = (("e",), re.compile(r"\b(\d{1,6}(?:\.\d{1,6})?)e\+?(\d{1,2})\b"))
_COMPARED = (
    ("<", "≤", "up to", "at most", "less than", "no more than"),
    re.compile(
        r"(?:<=|≤|<|\bup to|\bat most|\bless than|\bno more than)\s*"
        r"(\d{1,3}(?:,\d{3}){1,5}|\d{1,18})\b"
    ),
)
_MAGNITUDE_WORDS = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_MAGNITUDE = (("thousand", "million", "billion"), re.compile(r"\b(thousand|million|billion)s?\b"))
_EFFICIENCY = (
    ("efficien", "fast", "quick", "optimi", "time limit", "large", "huge", "big", "o("),
    re.compile(
        r"\b(?:efficient(?:ly)?|fast(?:er)?|quickly|optimi[sz]e\w*|time limit|large|huge|"
        r"big)\b|\bo\([^)]{1,12}\)"
    ),
)
_RECURRENCE = (
    ("fib", "tribonacci", "recur", "n-th", "nth"),
    re.compile(r"\b(?:fib\w*|tribonacci|recurrence|recursive(?:ly)?|n-th|nth)\b"),
)
_MODULAR_POWER = (
    ("modul",),
    re.compile(r"\bmodul\w*\b.{0,80}?(?:\^|\*\*|power)|(?:\^|\*\*|power).{0,80}?\bmodul"),
)
_Rule = tuple[tuple[str, ...], re.Pattern[str]]


def _findall(rule: _Rule, text: str) -> list[Any]:
    """``pattern.findall(text)``, skipped when no trigger substring occurs."""
    triggers, pattern = rule
    return pattern.findall(text) if any(t in text for t in triggers) else []


def _search(rule: _Rule, text: str) -> re.Match[str] | None:
    """``pattern.search(text)``, skipped when no trigger substring occurs."""
    triggers, pattern = rule
    return pattern.search(text) if any(t in text for t in triggers) else None


def max_bound(text: str) -> int | None:
    """The largest explicit input bound stated in ``text``, or None if there is none."""
    text = text.lower()
    bounds = [10 ** int(e) for e in _findall(_POWER_OF_TEN, text)]
    bounds += [int(float(m) * 10 ** int(e)) for m, e in _findall(_SCIENTIFIC, text)]
    bounds += [int(n.replace(",", "")) for n in _findall(_COMPARED, text)]
    bounds += [_MAGNITUDE_WORDS[w] for w in _findall(_MAGNITUDE, text)]
    return max(bounds, default=None)


def analyze(task: TaskSubmitted) -> AnalyzerResult:
    """Estimate the input scale and suggest a time limit for the task's tests.

    Features: ``input_scale`` (``small`` / ``medium`` / ``large``), ``max_input_hint``
    (largest explicit bound or None), ``time_limit_ms`` (:data:`TIME_LIMIT_MS`). With an
    explicit bound of at least :data:`LARGE_BOUND` it also proposes ``complexity: "high"``
    at confidence 0.9: a stated size is harder evidence than the logic specialist's wording
    heuristics, so it wins the merge. Otherwise confidence is 0.8 with an explicit smaller
    bound, 0.7 with efficiency wording only, 0.6 with no evidence (small assumed).
    """
    info = prompt_syntax(task.prompt, task.entry_point, task.kind)
    text = info.text.lower()
    bound = max_bound(text)
    efficiency = _search(_EFFICIENCY, text)
    if bound is not None and bound >= LARGE_BOUND:
        scale = "large"
    elif (bound is not None and bound >= MEDIUM_BOUND) or efficiency:
        scale = "medium"
    else:
        scale = "small"
    features: dict[str, object] = {
        "input_scale": scale,
        "max_input_hint": bound,
        "time_limit_ms": TIME_LIMIT_MS[scale],
    }
    issues: list[str] = []
    recommendations: list[str] = []
    action_items: list[str] = []
    if bound is not None and bound >= LARGE_BOUND:
        confidence = 0.9
        features["complexity"] = "high"
        issues.append(f"inputs up to {bound:,}: a quadratic solution will time out")
        action_items.append("aim for O(n log n) or better")
    elif bound is not None:
        confidence = 0.8
    elif efficiency:
        confidence = 0.7
        recommendations.append(f"the task asks for efficiency ({efficiency.group(0)!r})")
    else:
        confidence = 0.6
    if _search(_RECURRENCE, text):
        action_items.append("compute the sequence iteratively or memoised, not by naive recursion")
    if _search(_MODULAR_POWER, text):
        action_items.append("use pow(base, exp, mod) for modular powers")
    return AnalyzerResult(
        name=NAME,
        confidence=confidence,
        issues=issues,
        recommendations=recommendations,
        action_items=action_items,
        features=features,
    )
