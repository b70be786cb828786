"""Validator stage: TaskExecuted -> the levels of the task's kind (code: syntax, static,
security, tests in the sandbox, performance; json: json, schema, expected; text: text; see
agents/validation.py) -> TaskValidated, plus one ErrorLogged per failure (SPEC §4).

A text task without checks is validated ``verified=False`` (and not passed) with no level
and no ErrorLogged: nothing failed, nothing was checked.

A task left without an answer because a budget refused its calls (``TaskExecuted.budget_scope``)
is validated failed with one ``budget`` level and carries the scope on, so learning ends it
``budget_exceeded`` (``RewardComputed.completion_status``) without a Q-table update."""

from __future__ import annotations

from collections.abc import Sequence

from agents.outcomes import state_features
from agents.patterns import is_truncated
from agents.validation import ValidationOutcome, ValidationRequest, ValidatorConfig, validate_batch
from models.codec import make_event
from models.events import (
    Envelope,
    ErrorLogged,
    TaskExecuted,
    TaskValidated,
    ValidationLevel,
    completion_status,
)
from models.jobs import SubtaskCompleted
from streams.config import Settings
from streams.projections import CountersProjection, TaskStatusProjection
from streams.stage import Consumer, Tx


class ValidatorStage(Consumer):
    """Validates a whole batch at once: ruff and bandit run once per batch, test runs go to
    the sandbox concurrently (``validator_concurrency``)."""

    name = "validator"
    source = "executions"
    handles = frozenset({"TaskExecuted"})
    projections = (TaskStatusProjection(), CountersProjection())

    def __init__(self, settings: Settings) -> None:
        self.config = ValidatorConfig(levels=tuple(settings.validator_levels), sandbox=settings.sandbox,
                                      max_concurrency=settings.validator_concurrency)

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        runnable = [e for e in events if e.payload.chosen_text is not None]
        requests = [ValidationRequest(key=e.event_id, code=e.payload.chosen_text,
                                      entry_point=e.payload.entry_point, test=e.payload.test,
                                      kind=e.payload.kind,
                                      time_limit_ms=e.payload.time_limit_ms,
                                      json_schema=e.payload.json_schema,
                                      expected=e.payload.expected,
                                      must_match=e.payload.must_match,
                                      must_contain=e.payload.must_contain)
                    for e in runnable]
        outcomes = {o.key: o for o in await validate_batch(requests, self.config)} if requests else {}
        for e in events:
            outcome = outcomes.get(e.event_id)
            self._emit(e, outcome, tx)

    def _emit(self, e: Envelope, outcome: ValidationOutcome | None, tx: Tx) -> None:
        x: TaskExecuted = e.payload
        if outcome is None and x.budget_scope is not None:
            # no answer because a budget refused the calls: the task ends budget_exceeded
            levels = [ValidationLevel(level="budget", passed=False, details="no candidate answer",
                                      error_type="BudgetExceeded",
                                      message=f"budget {x.budget_scope} exhausted")]
            failures = []  # the executor logged the refusal (ErrorLogged BUDGET)
            passed, verified, tp, tt, dur = False, True, 0, 0, 0.0
        elif outcome is None:
            levels = [ValidationLevel(level="provider", passed=False, details="no candidate answer")]
            failures = [("PROVIDER", "NoCandidate", "every provider call failed or was refused")]
            passed, verified, tp, tt, dur = False, True, 0, 0, 0.0
        else:
            levels, passed, verified = outcome.levels, outcome.passed, outcome.verified
            tp, tt, dur = outcome.tests_passed, outcome.tests_total, outcome.duration_ms
            failures = [(f.category, f.error_type, f.message) for f in outcome.failures]
        validated = TaskValidated(task_id=x.task_id, levels=levels, passed=passed, tests_passed=tp,
                                  tests_total=tt, duration_ms=dur, state=x.state, action=x.action,
                                  provider=x.chosen, cost_usd=x.cost_usd, tokens=x.tokens,
                                  verified=verified, budget_scope=x.budget_scope)
        tx.emit("validations", make_event(validated, producer="validator", cause=e))
        if x.job is not None:  # fan-in: the verdict and the accepted answer go to the job
            done = SubtaskCompleted(
                job_id=x.job.job_id, subtask_id=x.job.subtask_id, task_id=x.task_id,
                status=completion_status(passed, verified, x.budget_scope),
                answer=x.chosen_text if passed or not verified else None, provider=x.chosen,
                tokens=x.tokens, cost_usd=x.cost_usd, tests_passed=tp, tests_total=tt)
            tx.emit("jobs", make_event(done, producer="validator", cause=e, discriminator="job"),
                    key=x.job.job_id)
        # task_type and complexity key the error patterns (agents/patterns.py)
        features = state_features(x.state)
        where = {"task_type": features[0], "complexity": features[1]} if features else {}
        for i, (category, error_type, message) in enumerate(failures):
            context = {"provider": x.chosen, "action": x.action, **where}
            if category == "SYNTAX":
                context["truncated"] = is_truncated(x.chosen_text)
            err = ErrorLogged(category=category, error_type=error_type, message=message[:2000],
                              agent_id="validator", task_id=x.task_id, context=context)
            tx.emit("errors", make_event(err, producer="validator", cause=e, attempt=i,
                                         discriminator="error"))
