"""Splitting a job's budget between its domain masters, and a master's part between its
subtasks (Cortex's token budget flow: an emergency reserve held by the coordinator, the rest
allocated to masters, each split into personal and workers parts).

Amounts are integers (tokens, micro-USD); None means unlimited. What is allocated never sums
above what is split, so a job whose subtasks each stay within their cap (the executor
enforces it: ``TaskSubmitted.budget_tokens`` / ``max_cost_usd``, agents/budget.py) never
spends more than its budget.
"""

from __future__ import annotations

from agents.budget import PROMPT_OVERHEAD_TOKENS, request_text
from agents.providers.base import DEFAULT_MAX_OUTPUT_TOKENS as ANSWER_TOKENS

PLAN_SHARE = 0.10
"""The coordinator's part of a goal-only job's active budget for planning (Cortex's table
gives its coordinator-master 80k of 270k, most of it for coordination we do not pay)."""


def call_tokens(prompt: str, json_schema: dict | None = None) -> int:
    """The tokens the executor holds for one call of this prompt (agents/budget.py step 1):
    a subtask's cap must reach it or its first call is refused."""
    return len(request_text(prompt, json_schema).encode("utf-8")) + PROMPT_OVERHEAD_TOKENS + ANSWER_TOKENS


def split(total: int | None, weights: dict[str, int]) -> dict[str, int | None]:
    """``total`` shared in proportion to ``weights`` (every weight >= 1) by the largest
    remainder method (Hamilton's apportionment; ties in ``weights``' order), so the parts sum
    to ``total`` exactly; all None when ``total`` is None."""
    if total is None:
        return dict.fromkeys(weights)
    whole = sum(weights.values())
    exact = {k: total * w / whole for k, w in weights.items()}
    parts = {k: int(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: -(exact[k] - parts[k]))  # stable: ties keep order
    for k in order[:total - sum(parts.values())]:
        parts[k] += 1
    return parts


def personal_workers(amount: int | None, personal_share: float) -> tuple[int | None, int | None]:
    """A master's allocation as (personal, workers): personal pays each subtask's first
    provider call, workers the extra calls of multi-provider consensus (agents/budget.py)."""
    if amount is None:
        return None, None
    personal = int(amount * personal_share)
    return personal, amount - personal


def cap(remaining: int | None, unassigned: int, floor: int) -> int | None | bool:
    """A subtask's cap from its master's ``remaining`` amount, shared evenly among its
    ``unassigned`` subtasks (this one included) but at least ``floor`` (one call's worst
    case): the cap (None: unlimited), or False when ``remaining`` is below ``floor``."""
    if remaining is None:
        return None
    if remaining < floor:
        return False
    return min(remaining, max(remaining // max(unassigned, 1), floor))
