"""streams.service.TaskReport from the task hash the projections write (no broker, no Redis)."""

from __future__ import annotations

from models.codec import make_event
from models.events import (
    ProviderCallFailed,
    TaskCompleted,
    TaskExecuted,
    TaskSubmitted,
    TaskValidated,
    ValidationLevel,
)
from streams.projections import ANSWER_MAX_CHARS, TaskStatusProjection, call_field, call_value
from streams.service import SIM_STUB_NOTE, TaskReport

PROMPT = 'def f(x):\n    """Return x."""\n'


def task_hash(answer: str | None, kind: str = "code") -> dict[str, str]:
    """The fields TaskStatusProjection and BreakerProjection write for one failed task."""
    submitted = make_event(TaskSubmitted(task_id="t", kind=kind, prompt=PROMPT), producer="test")
    executed = make_event(TaskExecuted(
        task_id="t", state="s", action="p:single", candidates=[], consensus_strategy="single",
        chosen="p" if answer is not None else None, chosen_text=answer, agreement=1.0,
        cost_usd=0.25, tokens=7), producer="test", cause=submitted)
    levels = ([ValidationLevel(level="provider", passed=False, details="no candidate answer")]
              if answer is None else
              [ValidationLevel(level="syntax", passed=True),
               ValidationLevel(level="tests", passed=False, details="0/1 asserts passed",
                               error_type="NotImplementedError", message="x" * 900)])
    validated = make_event(TaskValidated(
        task_id="t", levels=levels, passed=False, tests_passed=0, tests_total=1, duration_ms=3.0,
        state="s", action="p:single", provider="p", cost_usd=0.25, tokens=7),
        producer="test", cause=executed)
    completed = make_event(TaskCompleted(task_id="t", status="failed", provider="p",
                                         cost_usd=0.25, tokens=7, latency_ms=12.5),
                           producer="test", cause=validated)
    h: dict[str, str] = {}
    for e in (submitted, executed, validated, completed):
        h |= TaskStatusProjection._fields(e)
    call = ProviderCallFailed(task_id="t", provider="p", model="grok-4", attempt=1, latency_ms=2.5,
                              input_tokens=3, output_tokens=0, cost_usd=0.0,
                              error_type="RateLimited", http_status=429)
    h[call_field("p", 1)] = call_value("ProviderCallFailed", call)
    return h


def test_report_has_typed_fields_and_trimmed_failure():
    r = TaskReport.from_hash("t", task_hash(PROMPT + "    raise NotImplementedError\n"))
    d = r.to_dict()
    assert d["status"] == "failed" and d["passed"] is False and d["answer_truncated"] is False
    assert (d["cost_usd"], d["tokens"], d["latency_ms"], d["tests_total"]) == (0.25, 7, 12.5, 1)
    assert d["failure"]["error_type"] == "NotImplementedError"
    assert d["failure"]["message"] == "x" * 500
    assert d["calls"] == [{"provider": "p", "attempt": 1, "ok": False, "model": "grok-4",
                           "error_type": "RateLimited", "http_status": 429, "latency_ms": 2.5,
                           "cost_usd": 0.0, "tokens": 3}]
    assert d["providers"] == ["p"]
    assert isinstance(d["completed_at"], str) and d["notes"] == [SIM_STUB_NOTE]
    assert "    call p #1: failed RateLimited (HTTP 429), grok-4, 2.5 ms, $0.000000, 3 tokens" \
        in r.render()


def test_no_candidate_reports_the_level_details_and_no_answer():
    r = TaskReport.from_hash("t", task_hash(None))
    assert r.answer is None and r.answer_chars == 0 and r.notes == []
    assert (r.failure.level, r.failure.error_type, r.failure.message) == (
        "provider", None, "no candidate answer")


def test_a_long_answer_is_truncated_and_a_real_answer_gets_no_stub_note():
    long = PROMPT + "    return x\n" + "#" * (ANSWER_MAX_CHARS + 10) + "\n"
    r = TaskReport.from_hash("t", task_hash(long))
    assert r.answer_truncated is True and r.answer_chars == len(long)
    assert len(r.answer) == ANSWER_MAX_CHARS and r.notes == []
    # the stub note is for code answers only
    assert TaskReport.from_hash("t", task_hash(PROMPT + "    raise NotImplementedError\n",
                                               kind="text")).notes == []


def test_unknown_task():
    r = TaskReport.from_hash("nope", {})
    assert r.status == "unknown" and r.render() == ["nope: unknown"]
    assert r.to_dict()["passed"] is None and r.to_dict()["calls"] == []
