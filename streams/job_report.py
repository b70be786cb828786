"""`rmo job report`: a job's run report (Cortex phase 5) as Markdown and as one
self-contained HTML file with plots (streams/report.py's machinery: matplotlib's Agg
renderer, PNGs embedded as base64).

Sections: an executive summary (outcome, pass rate, tokens used against the budget, the
reserve, open escalations, duration); each master's detail (subtasks by outcome, allocated
as personal + workers, used, efficiency, what it left unused and so could be reallocated);
the token budget flow (plot ``budget-flow``: allocated against used per master, and the
reserve); the timeline of the job's events (plot ``timeline``: each subtask from its
assignment to its verdict), and the artefacts.

Built from the coordinator's projected state (:func:`streams.jobs.job_status`) and the job's
events on the jobs and system topics.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agents.cortex.job import ACCEPTED, FINAL
from models.codec import CodecError, decode
from models.events import Envelope
from streams import jobs
from streams.client import read_topic
from streams.config import Settings
from streams.report import CSS, figure_html, fmt_time, new_figure, table_html
from streams.topics import load_topics

LABELLED_ATTEMPTS = 60
"""Up to this many attempts, the timeline plot names each one on its axis."""
ARTEFACT_CHARS = 600
"""Characters of each artefact shown in the report (the full text is in JobCompleted)."""


@dataclass(frozen=True)
class TimelineEntry:
    """One event of the job: when, its type, the subtask it concerns, a one-line detail."""

    at: datetime
    event_type: str
    subject: str
    detail: str


async def job_timeline(settings: Settings, job_id: str) -> list[TimelineEntry]:
    """The job's events on the jobs topic and its escalations on the system topic, by time."""
    registry = load_topics(settings.namespace, settings.topics_file)
    out: list[TimelineEntry] = []
    for role in ("jobs", "system"):
        seen: set[str] = set()
        async for r in read_topic(settings.require_kafka(), registry.name(role)):
            try:
                e = decode(r.value, max_bytes=None)
            except CodecError:
                continue
            if getattr(e.payload, "job_id", None) != job_id or e.event_id in seen:
                continue
            seen.add(e.event_id)  # a re-run after a crash may have produced it twice
            out.append(TimelineEntry(e.occurred_at, e.event_type,
                                     getattr(e.payload, "subtask_id", None) or getattr(e.payload, "domain", "") or "",
                                     _detail(e)))
    return sorted(out, key=lambda t: t.at)


def _detail(e: Envelope) -> str:
    p = e.payload
    match e.event_type:
        case "JobSubmitted":
            return f"budget {p.budget_tokens or 'unlimited'} tokens, reserve {p.reserve_tokens}"
        case "JobPlanned":
            return f"{len(p.subtasks)} subtasks" + (f", planned by {p.planner}" if p.planner else "")
        case "MasterActivated":
            return f"{p.subtasks} subtasks, {p.tokens or 'unlimited'} tokens"
        case "WorkAssigned":
            extra = f" (+{p.from_reserve_tokens} from the reserve)" if p.from_reserve_tokens else ""
            return f"task {p.task_id}, cap {p.budget_tokens or 'none'} tokens{extra}"
        case "SubtaskCompleted":
            return f"{p.status}, {p.tokens} tokens, by {p.provider or '-'}"
        case "EscalationRaised":
            return f"{p.reason}: {p.detail}"
        case "EscalationResolved":
            return f"{'skipped' if p.skipped else 'answered'} by {p.by}"
        case "JobCompleted":
            return f"{p.status}" + (f": {p.reason}" if p.reason else "")
    return ""


@dataclass(frozen=True)
class JobRunReport:
    """A built job report: the Markdown and the HTML page, and what they were built from."""

    job_id: str
    markdown: str
    page: str
    events: int

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``job-{id}.md`` and ``job-{id}.html`` into ``out_dir`` (created if missing).
        Raises OSError when it cannot be written."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"job-{self.job_id}"
        md, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
        md.write_text(self.markdown, encoding="utf-8")
        page.write_text(self.page, encoding="utf-8")
        return md, page


def _pct(a: float, b: float | None) -> str:
    return f"{100 * a / b:.0f} %" if b else "-"


def _tokens(n: int | None) -> str:
    return "unlimited" if n is None else f"{n:,}"


def summary_lines(r: jobs.JobReport, timeline: list[TimelineEntry]) -> list[str]:
    """The executive summary, one sentence per line."""
    subs = [x for x in r.subtasks if x.subtask_id != "plan"]
    accepted = sum(x.status in ACCEPTED for x in subs)
    passed = sum(x.status == "passed" for x in subs)
    span = (timeline[-1].at - timeline[0].at).total_seconds() if len(timeline) > 1 else 0.0
    outcome = r.status or ("waiting for an operator: nothing runs until an open escalation is "
                           "resolved (`rmo escalations list`, `rmo escalations resolve ID "
                           "--answer FILE | --skip`)" if r.awaiting_operator else f"still {r.phase}")
    lines = [f"Outcome: {outcome}" + (f" ({r.reason})" if r.reason else "") + f", after {span:,.1f} s.",
             (f"Subtasks: {accepted} of {len(subs)} have an accepted answer ({passed} passed "
              f"validation, {sum(x.status == 'resolved' for x in subs)} answered by a person, "
              f"{sum(x.status == 'skipped' for x in subs)} skipped)."),
             f"Tokens: {r.tokens_used:,} used of {_tokens(r.budget_tokens)} ({_pct(r.tokens_used, r.budget_tokens)}).",
             f"Reserve left: {_tokens(r.reserve_tokens_left)} tokens."]
    spent = sorted((m for m in r.masters if m.tokens_used), key=lambda m: -m.tokens_used)
    lines.append("Where the tokens went: " + (", ".join(
        f"{m.domain} {m.tokens_used:,} ({_pct(m.tokens_used, r.tokens_used)})" for m in spent)
        if spent else "nowhere yet, no master has used any") + ".")
    short = sorted({x.domain for x in subs
                    if x.status == "escalated" and x.reason == "budget_exhausted"})
    if short:
        done = [m for m in r.masters if m.tokens_allocated is not None and m.domain not in short
                and all(x.status in FINAL for x in subs if x.domain == m.domain)]
        spare = sum(m.tokens_allocated - m.tokens_used - m.tokens_held for m in done)
        lines.append(f"Out of budget: {', '.join(short)}; the finished masters left {spare:,} "
                     "tokens unused, which a reallocation could move there.")
    if r.escalations:
        lines.append(f"Open escalations: {len(r.escalations)} ({', '.join(r.escalations[:10])}"
                     + (", ..." if len(r.escalations) > 10 else "") + ").")
    return lines


def _master_rows(r: jobs.JobReport) -> list[tuple[Any, ...]]:
    rows = []
    for m in r.masters:
        subs = [x for x in r.subtasks if x.domain == m.domain]
        ok = sum(x.status in ACCEPTED for x in subs)
        unused = None if m.tokens_allocated is None else m.tokens_allocated - m.tokens_used - m.tokens_held
        rows.append((m.domain, len(subs), ok, _tokens(m.tokens_allocated),
                     f"{_tokens(m.personal_tokens)} / {_tokens(m.workers_tokens)}",
                     f"{m.tokens_used:,}", _pct(m.tokens_used, m.tokens_allocated),
                     _tokens(unused), f"{m.reserve_tokens_granted:,}"))
    return rows


MASTER_HEADERS = ("master", "subtasks", "accepted", "allocated", "personal / workers", "used",
                  "efficiency", "unused (reallocatable)", "from reserve")


def _markdown(r: jobs.JobReport, timeline: list[TimelineEntry]) -> str:
    def cells(row) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    def table(headers, rows) -> list[str]:
        return [cells(headers), "|" + "---|" * len(headers), *map(cells, rows)]

    out = [f"# Job {r.job_id}: run report", "", "## Executive summary", "",
           *(f"- {line}" for line in summary_lines(r, timeline)), "", "## Masters", "",
           *table(MASTER_HEADERS, _master_rows(r)), "", "## Subtasks", "",
           *table(("subtask", "master", "status", "tokens", "cap", "provider", "detail"),
                  ((x.subtask_id, x.domain, x.status, f"{x.tokens:,}", _tokens(x.cap_tokens),
                    x.provider or "-", x.detail or "") for x in r.subtasks)),
           "", "## Timeline", "",
           *table(("time", "event", "subtask / master", "detail"),
                  ((fmt_time(t.at), t.event_type, t.subject, t.detail) for t in timeline)),
           "", "## Artefacts", ""]
    for sid, text in r.artefacts.items():
        out += [f"### {sid}", "", "```", text[:ARTEFACT_CHARS], "```", ""]
    return "\n".join(out) + "\n"


def plot_budget_flow(r: jobs.JobReport):
    """Allocated (personal and workers) against used tokens per master, and the reserve."""
    fig, ax = new_figure(3.8)
    masters = [m for m in r.masters if m.tokens_allocated is not None]
    if not masters:
        ax.text(0.5, 0.5, "no token budget: every master is unlimited", ha="center", va="center",
                transform=ax.transAxes)
        return fig
    names = [m.domain for m in masters] + (["reserve"] if r.reserve_tokens_left is not None else [])
    xs = range(len(names))
    personal = [m.personal_tokens or 0 for m in masters] + [0] * (len(names) - len(masters))
    workers = [m.workers_tokens or 0 for m in masters] + [0] * (len(names) - len(masters))
    used = [m.tokens_used for m in masters] + [0] * (len(names) - len(masters))
    granted = [m.reserve_tokens_granted for m in masters] + [0] * (len(names) - len(masters))
    ax.bar([x - 0.2 for x in xs], personal, 0.4, label="allocated: personal", color="#8fb3d9")
    ax.bar([x - 0.2 for x in xs], workers, 0.4, bottom=personal, label="allocated: workers", color="#c6d9ec")
    if any(granted):
        ax.bar([x - 0.2 for x in xs], granted, 0.4, bottom=[p + w for p, w in zip(personal, workers)],
               label="granted from the reserve", color="#b39ddb")
    ax.bar([x + 0.2 for x in xs], used, 0.4, label="used", color="#d9822b")
    if r.reserve_tokens_left is not None:
        ax.bar([len(names) - 1 - 0.2], [r.reserve_tokens_left], 0.4, label="reserve left", color="#9e9e9e")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("tokens")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_timeline(timeline: list[TimelineEntry]):
    """Each subtask from its assignment to its verdict (seconds since the job was submitted)."""
    fig, ax = new_figure(max(2.5, min(12.0, 0.12 * len(timeline))))
    if not timeline:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
        return fig
    t0 = timeline[0].at
    start: dict[str, float] = {}
    bars: list[tuple[str, float, float, str]] = []
    for t in timeline:
        s = (t.at - t0).total_seconds()
        if t.event_type == "WorkAssigned":
            start[t.subject] = s
        elif t.event_type == "SubtaskCompleted" and t.subject in start:
            ok = t.detail.startswith(("passed", "unverified"))
            bars.append((t.subject, start.pop(t.subject), s, "#4caf50" if ok else "#e53935"))
    for i, (name, a, b, colour) in enumerate(bars):
        ax.barh(i, max(b - a, 0.01), left=a, color=colour)
    if len(bars) <= LABELLED_ATTEMPTS:
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
    else:  # hundreds of names overprint each other; the subtasks table has them
        ax.set_yticks([])
        ax.set_ylabel(f"{len(bars)} attempts, in order of verdict")
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the job was submitted (green: accepted, red: failed)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _html(r: jobs.JobReport, timeline: list[TimelineEntry], generated: datetime) -> str:
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(r, timeline))
    subtasks = table_html(("subtask", "master", "status", "tokens", "cap", "provider", "detail"),
                          ((x.subtask_id, x.domain, x.status, f"{x.tokens:,}", _tokens(x.cap_tokens),
                            x.provider or "-", x.detail or "") for x in r.subtasks))
    events = table_html(("time", "event", "subtask / master", "detail"),
                        ((fmt_time(t.at), t.event_type, t.subject, t.detail) for t in timeline))
    artefacts = "".join(f"<h3>{html.escape(k)}</h3><pre>{html.escape(v[:ARTEFACT_CHARS])}</pre>"
                        for k, v in r.artefacts.items())
    body = f"""
<h1>Job {html.escape(r.job_id)}: run report</h1>
<p class="meta">generated {fmt_time(generated)}</p>
<h2>Executive summary</h2><ul>{summary}</ul>
<h2>Masters</h2>{table_html(MASTER_HEADERS, _master_rows(r))}
<h2>Token budget flow</h2>
{figure_html("budget-flow", plot_budget_flow(r), "Tokens allocated (personal, workers, granted from the reserve) and used per master; the reserve left.")}
<h2>Subtasks</h2>{subtasks}
<h2>Timeline</h2>
{figure_html("timeline", plot_timeline(timeline), "Each subtask from its assignment to its verdict.")}
{events}
<h2>Artefacts</h2>{artefacts or '<p>none yet</p>'}
"""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Job '
            f"{html.escape(r.job_id)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


async def build_job_report(settings: Settings, job_id: str, now: datetime | None = None) -> JobRunReport:
    """The run report of ``job_id``.

    Raises:
        streams.jobs.JobNotFound: the coordinator has not applied a job of that id.
        LookupError: a topic does not exist; TimeoutError: the broker reports no high watermark.
    """
    r = await jobs.job_status(settings, job_id)
    timeline = await job_timeline(settings, job_id)
    return JobRunReport(job_id, _markdown(r, timeline), _html(r, timeline, now or datetime.now(UTC)),
                        len(timeline))
