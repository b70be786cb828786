"""Dependency specialist: which modules the task imports, stdlib or third-party (SPEC §4).

Candidates run in a sandbox with the standard library only, so a third-party import in the
prompt is a risk the executor should know about before it spends tokens. The standard
library is what this interpreter says it is (:data:`sys.stdlib_module_names`).
"""

from __future__ import annotations

import sys

from agents.analyzers.syntax import prompt_syntax
from models.events import AnalyzerResult, TaskSubmitted

NAME = "dependency"


def analyze(task: TaskSubmitted) -> AnalyzerResult:
    """Classify every import of the prompt (code, or ``import`` lines in a text prompt).

    Features: ``imports`` (top-level module names, first-seen order), ``stdlib`` and
    ``third_party`` (subsets of ``imports``). Issues: each third-party module (may be missing
    in the sandbox), each relative import (cannot be resolved outside its package).
    Confidence 0.95 with stdlib-only imports, 0.9 with none, minus 0.15 per problem
    (floor 0.2). Pure and deterministic.
    """
    info = prompt_syntax(task.prompt, task.entry_point, task.kind)
    modules: list[str] = []
    issues: list[str] = []
    for module, level in info.imports:
        if level > 0:
            issues.append(f"relative import {'.' * level}{module} cannot be resolved")
        elif (top := module.split(".")[0]) and top not in modules:
            modules.append(top)
    stdlib = [m for m in modules if m in sys.stdlib_module_names]
    third_party = [m for m in modules if m not in sys.stdlib_module_names]
    issues.extend(f"requires third-party package {m!r}" for m in third_party)
    recommendations: list[str] = []
    action_items: list[str] = []
    if third_party:
        recommendations.append(
            "the sandbox has the standard library only: avoid "
            + ", ".join(third_party)
            + " or expect an ImportError"
        )
        action_items.append("solve with the standard library only")
    confidence = (0.95 if modules else 0.9) - 0.15 * len(issues)
    return AnalyzerResult(
        name=NAME,
        confidence=round(max(confidence, 0.2), 3),
        issues=issues,
        recommendations=recommendations,
        action_items=action_items,
        features={"imports": modules, "stdlib": stdlib, "third_party": third_party},
    )
