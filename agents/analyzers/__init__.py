"""The analyzer swarm (SPEC §4; Fractal-RMO seed, "Analyzer swarm").

Five specialists (:data:`ANALYZERS`) each map a :class:`~models.events.TaskSubmitted` to an
:class:`~models.events.AnalyzerResult`; :func:`analyze_task` runs them concurrently and
:func:`merge` resolves their proposals into the routing features and one action-item list.
Every specialist is pure and deterministic, so re-analysing a replayed task gives the same
``TaskAnalyzed``.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

from agents.analyzers import dependency, logic, performance, security, syntax
from models.events import AnalyzerResult, TaskAnalyzed, TaskFeatures, TaskSubmitted

ANALYZERS: tuple[ModuleType, ...] = (syntax, logic, dependency, security, performance)
"""The specialists in their fixed order, which also breaks confidence ties in :func:`merge`.
Each module exposes ``NAME: str`` and ``analyze(task) -> AnalyzerResult``."""

DEFAULT_TASK_TYPE = "other"
DEFAULT_COMPLEXITY = "medium"
_COMPLEXITIES = frozenset({"low", "medium", "high"})
_ORDER = {module.NAME: rank for rank, module in enumerate(ANALYZERS)}


def _valid(key: str, value: Any) -> bool:
    """Whether a proposal for a routing feature fits :class:`TaskFeatures`; a malformed
    proposal must lose the merge rather than fail the whole task."""
    if key == "complexity":
        return value in _COMPLEXITIES
    if key == "task_type":
        return isinstance(value, str) and bool(value)
    return True


def merge(results: list[AnalyzerResult]) -> tuple[TaskFeatures, list[str]]:
    """Resolve the specialists' proposals: ``(routing features, merged action items)``.

    For every feature key the proposal of the most confident result wins; ties go to the
    specialist earlier in :data:`ANALYZERS` (unknown names rank after the known ones, then
    by position in ``results``). ``task_type`` defaults to ``"other"`` and ``complexity`` to
    ``"medium"`` when nobody proposes a valid value. Action items keep the order of
    ``results`` with duplicates dropped.
    """
    ranked = sorted(
        enumerate(results),
        key=lambda item: (-item[1].confidence, _ORDER.get(item[1].name, len(_ORDER)), item[0]),
    )
    merged: dict[str, Any] = {}
    for _, result in ranked:
        for key, value in result.features.items():
            if key not in merged and _valid(key, value):
                merged[key] = value
    features = TaskFeatures(
        task_type=merged.get("task_type", DEFAULT_TASK_TYPE),
        complexity=merged.get("complexity", DEFAULT_COMPLEXITY),
    )
    action_items = list(dict.fromkeys(item for r in results for item in r.action_items))
    return features, action_items


async def _run(module: ModuleType, task: TaskSubmitted) -> AnalyzerResult:
    """One specialist as a coroutine; a crash becomes a zero-confidence result so that one
    faulty specialist degrades the analysis instead of dead-lettering the task."""
    try:
        return module.analyze(task)
    except Exception as exc:  # noqa: BLE001 - any specialist bug is contained here
        return AnalyzerResult(
            name=module.NAME, confidence=0.0, issues=[f"analyzer failed: {type(exc).__name__}"]
        )


async def _run_over(module: ModuleType, tasks: list[TaskSubmitted]) -> list[AnalyzerResult]:
    return [await _run(module, task) for task in tasks]


async def analyze_batch(tasks: list[TaskSubmitted]) -> list[TaskAnalyzed]:
    """Run the five specialists concurrently, each over the whole batch, and merge per task.

    The specialists are CPU-light (well under a millisecond together on a HumanEval task),
    so they run as coroutines on the caller's event loop, not in threads; one coroutine per
    specialist and batch, not per task, keeps scheduling overhead off the hot path.
    ``analyses`` are in :data:`ANALYZERS` order.
    """
    per_module = await asyncio.gather(*(_run_over(module, tasks) for module in ANALYZERS))
    out = []
    for i, task in enumerate(tasks):
        results = [column[i] for column in per_module]
        features, action_items = merge(results)
        out.append(TaskAnalyzed(task_id=task.task_id, analyses=results, features=features,
                                action_items=action_items))
    return out


async def analyze_task(task: TaskSubmitted) -> TaskAnalyzed:
    """:func:`analyze_batch` of one task."""
    return (await analyze_batch([task]))[0]
