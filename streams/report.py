"""`rmo report`: one self-contained HTML file describing what the log says.

The report is built from the topics alone (read once each, from the beginning; ``since``
keeps the events that occurred at or after it), so it describes any namespace, live or
finished, without Redis. Budget limits come from the budgets file (``--budgets`` or
``RMO_BUDGETS_FILE``), since the log holds spending, not limits.

Sections, each a table and a plot (matplotlib's Agg renderer, embedded as base64 PNG
``<img>`` elements, so the file needs no network and no other file):

- **summary** (Cortex's run report): tasks submitted and completed per status, pass rate,
  cost (USD), tokens, and use of the budget lines; plot ``completions``: completed tasks over
  time per status;
- **providers**: per provider calls, failures, tasks answered, pass rate, cost, p50/p95 call
  latency, breaker trips; plots ``provider-pass-rate`` (cumulative pass rate of the tasks each
  provider answered), ``provider-cost`` (cumulative USD), ``provider-latency`` (every call's
  latency in ms, log scale, with a rolling median);
- **learning**: plots ``epsilon`` (the learner's ε after each reward, and the ε each routing
  decision used) and ``q-values`` (each action's Q-value in the state most rewards were for,
  after each reward: the rewards topic folded as the Q-table projection folds it);
- **breakers**: plot ``breakers`` (each provider's state over time) and the transitions;
- **budget**: plot ``budget`` (cumulative USD per budget line, per period bucket, against
  its limit; without budgets, the cumulative USD and tokens of all calls);
- **stages**: plot ``stage-latency`` (distribution, ms, of the time from an event to the event
  it caused, per stage: analyzer, executor, validator, learning, and end to end);
- **dead letters**: plot ``deadletters`` (count per stage and error type) and the list;
- **stalls**: the ``StageStalled`` events (streams/stall.py).

Events are read as plain JSON (orjson, no model validation): the report must be quick on a
long log and must not stop at an event an older or newer version wrote.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import re
import statistics
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import orjson
from matplotlib.figure import Figure  # not pyplot: no global state, no display backend
from matplotlib.patches import Patch

from agents import qlearning
from agents.budget import BudgetLine, bucket, load_budgets
from agents.executor import qconfig
from streams.client import read_topic
from streams.config import Settings
from streams.topics import TopicRegistry

ROLES = ("tasks", "analyses", "executions", "validations", "decisions", "calls", "errors",
         "rewards", "system", "deadletter")
"""Topics the report reads (not ``metrics``: snapshots of what these topics already say)."""

PLOTS = ("completions", "provider-pass-rate", "provider-cost", "provider-latency", "epsilon",
         "q-values", "breakers", "budget", "stage-latency", "deadletters")
"""Every plot of a report; each is an ``<img id="plot-{name}">``."""

STAGES = {"TaskAnalyzed": "analyzer", "TaskExecuted": "executor", "TaskValidated": "validator",
          "RewardComputed": "learning.reward", "TaskCompleted": "learning.qtable"}
"""A derived event type -> the stage whose latency its time minus its cause's time is."""

STATE_COLORS = {"closed": "#4caf50", "half_open": "#ff9800", "open": "#e53935"}
STATUS_COLORS = {"passed": "#4caf50", "failed": "#e53935", "unverified": "#9e9e9e",
                 "rejected": "#8e24aa", "dead_lettered": "#212121", "budget_exceeded": "#ff9800"}
DPI = 100
ROLLING = 25
"""Calls in the rolling median of the latency plot."""


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Event:
    """One event as the report sees it: ``at`` its event time (UTC), ``payload`` the JSON."""

    role: str
    type: str
    id: str
    at: datetime
    correlation_id: str
    causation_id: str | None
    producer: str
    payload: dict[str, Any]


@dataclass
class Log:
    """The events of the report's window, per event type, in event-time order."""

    by_type: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    times: dict[str, datetime] = field(default_factory=dict)  # event id -> time, all events
    count: int = 0
    rewards: list[Event] = field(default_factory=list)
    """Every RewardComputed of the log, in window or not, in the rewards topic's order (one
    partition): the Q-table is their fold from the first (:func:`learning_curve`)."""

    def of(self, *types: str) -> list[Event]:
        return sorted((e for t in types for e in self.by_type.get(t, ())), key=lambda e: e.at)

    @property
    def span(self) -> tuple[datetime, datetime] | None:
        """(first, last) event time, None for an empty window."""
        if not self.count:
            return None
        ats = [e.at for events in self.by_type.values() for e in events]
        return min(ats), max(ats)


def _event(role: str, value: bytes | None) -> Event | None:
    try:
        e = orjson.loads(value or b"")
        return Event(role, e["event_type"], e["event_id"], datetime.fromisoformat(e["occurred_at"]),
                     e.get("correlation_id", ""), e.get("causation_id"), e.get("producer", ""),
                     e.get("payload") or {})
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return None  # not an envelope: the dead-letter topic holds what the stages made of it


async def read_log(settings: Settings, registry: TopicRegistry, since: datetime | None) -> Log:
    """Every event of :data:`ROLES` that occurred at or after ``since`` (all when None),
    each event id once (a re-produced duplicate is dropped).

    Raises:
        LookupError: a topic does not exist (`rmo topics create`).
        TimeoutError: the broker reports no high watermark.
    """
    async def one(role: str) -> list[Event]:
        out = []
        async for r in read_topic(settings.require_kafka(), registry.name(role)):
            if (e := _event(role, r.value)) is not None:
                out.append(e)
        return out

    log = Log()
    for events in await asyncio.gather(*(one(role) for role in ROLES)):
        for e in events:
            if e.id in log.times:
                continue
            log.times[e.id] = e.at  # causes before ``since`` still time the stages after it
            if e.type == "RewardComputed":
                log.rewards.append(e)
            if since is None or e.at >= since:
                log.by_type[e.type].append(e)
                log.count += 1
    for events in log.by_type.values():
        events.sort(key=lambda e: e.at)
    return log


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an RFC 3339 / ISO 8601 time (UTC when it has no offset) or an age before
    ``now``: a number and ``s``, ``m``, ``h`` or ``d`` (``90s``, ``30m``, ``2h``, ``7d``).

    Raises:
        ValueError: neither, with what is accepted.
    """
    if m := _AGE.match(text):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: float(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a time (2026-01-01T12:00:00Z) nor an age "
                         "(90s, 30m, 2h, 7d)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- figures


def new_figure(height: float = 3.6) -> tuple[Figure, Any]:
    """A 10-inch-wide figure (``height`` inches) and its one axes, laid out by matplotlib."""
    fig = Figure(figsize=(10, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _time_axis(ax: Any) -> None:
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("event time (UTC)")
    ax.grid(alpha=0.3)


EMPTY = "empty"
"""The label of a figure drawn without data (:attr:`ReportResult.empty`)."""


def _empty(ax: Any, what: str) -> None:
    ax.figure.set_label(EMPTY)
    ax.text(0.5, 0.5, f"no {what} in this window", ha="center", va="center", fontsize=14,
            color="#555555", transform=ax.transAxes)
    ax.set_facecolor("#f4f4f4")
    ax.set_xticks([])
    ax.set_yticks([])


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return base64.b64encode(buf.getvalue()).decode()


def _cumulative(events: Iterable[tuple[datetime, float]]) -> tuple[list[datetime], list[float]]:
    xs, ys, total = [], [], 0.0
    for at, v in sorted(events, key=lambda p: p[0]):
        total += v
        xs.append(at)
        ys.append(total)
    return xs, ys


def plot_completions(log: Log) -> Figure:
    fig, ax = new_figure()
    done = _completions(log)
    if not done:
        _empty(ax, "completed tasks")
        return fig
    for status in sorted({e.payload.get("status", "?") for e in done}):
        xs, ys = _cumulative((e.at, 1) for e in done if e.payload.get("status") == status)
        ax.step(xs, ys, where="post", label=f"{status} ({len(xs)})",
                color=STATUS_COLORS.get(status), linewidth=2)
    ax.set_ylabel("tasks completed (cumulative)")
    ax.legend(loc="upper left")
    _time_axis(ax)
    return fig


def _by_provider(events: Iterable[Event]) -> dict[str, list[Event]]:
    """provider id -> its events in log order, providers sorted (one pass over ``events``)."""
    groups: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        groups[e.payload.get("provider", "?")].append(e)
    return dict(sorted(groups.items()))


def plot_provider_pass_rate(log: Log) -> Figure:
    fig, ax = new_figure()
    answered = [e for e in _completions(log) if e.payload.get("provider")
                and e.payload.get("status") in ("passed", "failed")]
    if not answered:
        _empty(ax, "validated answers")
        return fig
    for provider, mine in _by_provider(answered).items():
        xs, ys, passed = [], [], 0
        for n, e in enumerate(mine, 1):
            passed += e.payload["status"] == "passed"
            xs.append(e.at)
            ys.append(100 * passed / n)
        ax.step(xs, ys, where="post", label=f"{provider} ({len(xs)} tasks, {ys[-1]:.1f} %)",
                linewidth=2)
    ax.set_ylabel("pass rate of the tasks it answered (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    _time_axis(ax)
    return fig


def plot_provider_cost(log: Log) -> Figure:
    fig, ax = new_figure()
    calls = log.of("ProviderCallCompleted", "ProviderCallFailed")
    if not calls:
        _empty(ax, "provider calls")
        return fig
    for provider, mine in _by_provider(calls).items():
        xs, ys = _cumulative((e.at, float(e.payload.get("cost_usd", 0.0))) for e in mine)
        ax.step(xs, ys, where="post", label=f"{provider} (${ys[-1]:.4f})", linewidth=2)
    ax.set_ylabel("cost, cumulative (USD)")
    ax.legend(loc="upper left")
    _time_axis(ax)
    return fig


def plot_provider_latency(log: Log) -> Figure:
    fig, ax = new_figure()
    calls = log.of("ProviderCallCompleted", "ProviderCallFailed")
    if not calls:
        _empty(ax, "provider calls")
        return fig
    for i, (provider, mine) in enumerate(_by_provider(calls).items()):
        color = f"C{i}"
        xs = [e.at for e in mine]
        ys = [max(float(e.payload.get("latency_ms", 0.0)), 0.01) for e in mine]
        failed = [e.type == "ProviderCallFailed" for e in mine]
        ax.scatter([x for x, f in zip(xs, failed) if not f], [y for y, f in zip(ys, failed) if not f],
                   s=8, alpha=0.35, color=color)
        if any(failed):
            ax.scatter([x for x, f in zip(xs, failed) if f], [y for y, f in zip(ys, failed) if f],
                       s=18, marker="x", color=color)
        rolling = [statistics.median(ys[max(0, k - ROLLING + 1):k + 1]) for k in range(len(ys))]
        ax.step(xs, rolling, where="post", color=color, linewidth=2,
                label=f"{provider}: median of last {ROLLING} calls (x: failed call)")
    ax.set_yscale("log")
    ax.set_ylabel("call latency (ms, log scale)")
    ax.legend(loc="upper left", fontsize=8)
    _time_axis(ax)
    return fig


@dataclass(frozen=True)
class LearnPoint:
    """The learner after one reward: ``updates`` applied so far, ``epsilon`` the exploration
    rate the executor uses from then on, ``q`` the Q-values of the tracked state."""

    at: datetime
    updates: int
    epsilon: float
    q: dict[str, float]


def learning_curve(rewards: Sequence[Event], cfg: qlearning.QConfig,
                   state: str | None) -> list[LearnPoint]:
    """Fold ``rewards`` (the rewards topic in order) into a Q-table exactly as the Q-table
    projection does (streams/projections.py ``QTableProjection.apply``: a Q-update, the
    experience appended, a minibatch of it replayed; a reward with ``budget_scope`` is no
    update), recording the learner and ``state``'s Q-values after each update. ``cfg`` must
    be the live run's (``RMO_LEARNING_RATE``, ``RMO_DISCOUNT``, ``RMO_EPSILON_*``, …, as for
    `rmo replay`)."""
    q: qlearning.QTable = {}
    experience: deque[tuple[str, str, float, str]] = deque(maxlen=cfg.experience_size)
    points, updates = [], 0
    for e in rewards:
        p = e.payload
        if p.get("budget_scope") is not None:
            continue
        row = (p["state"], p["action"], float(p["reward"]), p["next_state"])
        qlearning.update(q, *row, cfg)
        experience.append(row)
        for idx in qlearning.minibatch(e.id, len(experience), cfg.minibatch):
            qlearning.update(q, *experience[idx], cfg)
        updates += 1
        points.append(LearnPoint(e.at, updates, qlearning.epsilon(updates, cfg),
                                 dict(q.get(state, {})) if state else {}))
    return points


def most_updated_state(log: Log) -> str | None:
    """The state most rewards of the window were for (the Q-value plot follows it)."""
    states = Counter(e.payload.get("state") for e in log.of("RewardComputed")
                     if e.payload.get("state") and e.payload.get("budget_scope") is None)
    return states.most_common(1)[0][0] if states else None


def _in_window(points: Sequence[LearnPoint], log: Log) -> list[LearnPoint]:
    span = log.span
    return [p for p in points if span and p.at >= span[0]]


def plot_epsilon(log: Log, cfg: qlearning.QConfig) -> Figure:
    fig, ax = new_figure(3.2)
    curve = _in_window(learning_curve(log.rewards, cfg, None), log)
    decisions = log.of("ProviderSelected")
    if not curve and not decisions:
        _empty(ax, "rewards or routing decisions")
        return fig
    if curve:
        ax.step([p.at for p in curve], [p.epsilon for p in curve], where="post", color="C3",
                linewidth=2, label=f"ε after each reward ({curve[-1].updates} updates: "
                                   f"{curve[-1].epsilon:.3f})")
    if decisions:
        explored = [e.payload.get("explored", False) for e in decisions]
        for flag, color, what in ((True, "C0", "explored"), (False, "C2", "greedy")):
            mine = [e for e, x in zip(decisions, explored) if x == flag]
            ax.scatter([e.at for e in mine], [float(e.payload.get("epsilon", 0.0)) for e in mine],
                       s=10, color=color, alpha=0.5, label=f"decision, {what} ({len(mine)})")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("ε (probability of exploring)")
    ax.legend(loc="lower left", fontsize=8)
    _time_axis(ax)
    return fig


def plot_q_values(log: Log, cfg: qlearning.QConfig) -> Figure:
    fig, ax = new_figure()
    state = most_updated_state(log)
    curve = _in_window(learning_curve(log.rewards, cfg, state), log)
    if state is None or not curve:
        _empty(ax, "rewards")
        return fig
    actions = sorted({a for p in curve for a in p.q})
    for action in actions:
        points = [(p.at, p.q[action]) for p in curve if action in p.q]
        ax.step([t for t, _ in points], [v for _, v in points], where="post", linewidth=2,
                label=f"{action} ({points[-1][1]:.3f})")
    ax.axhline(0.0, color="#999999", linewidth=0.8)
    updated = sum(e.payload.get("state") == state for e in log.of("RewardComputed"))
    ax.set_title(f"state {state} ({updated} of {len(log.of('RewardComputed'))} rewards in the window)",
                 fontsize=10)
    ax.set_ylabel("Q-value after each reward")
    ax.legend(loc="best", fontsize=8)
    _time_axis(ax)
    return fig


def breaker_segments(log: Log, providers: Iterable[str], start: datetime,
                     end: datetime) -> dict[str, list[tuple[datetime, datetime, str]]]:
    """provider -> [(from, to, state)] covering ``start``..``end``; a provider without a
    transition in the window is closed throughout, one whose first transition leaves state S
    was in S before it."""
    transitions: dict[str, list[Event]] = defaultdict(list)
    for e in log.of("BreakerTransitioned"):
        transitions[e.payload.get("provider", "?")].append(e)
    out = {}
    for p in sorted(set(providers) | set(transitions)):
        ts = transitions.get(p, [])
        state = ts[0].payload.get("from_state", "closed") if ts else "closed"
        at, segments = start, []
        for e in ts:
            segments.append((at, e.at, state))
            at, state = e.at, e.payload.get("to_state", "closed")
        segments.append((at, end, state))
        out[p] = [s for s in segments if s[1] > s[0]] or [(start, end, state)]
    return out


def plot_breakers(log: Log) -> Figure:
    providers = {e.payload.get("provider", "?") for e in log.of("ProviderCallCompleted",
                                                               "ProviderCallFailed")}
    span = log.span
    segments = breaker_segments(log, providers, *span) if span else {}
    fig, ax = new_figure(max(1.6, 0.6 * len(segments) + 1.2))
    if not segments:
        _empty(ax, "providers")
        return fig
    for row, (provider, segs) in enumerate(segments.items()):
        ax.broken_barh([(mdates.date2num(a), mdates.date2num(b) - mdates.date2num(a))
                        for a, b, _ in segs], (row - 0.4, 0.8),
                       facecolors=[STATE_COLORS.get(s, "#9e9e9e") for _, _, s in segs])
    ax.set_yticks(range(len(segments)), list(segments))
    ax.set_ylim(-0.6, len(segments) - 0.4)
    ax.xaxis_date()
    handles = [Patch(color=c, label=s) for s, c in STATE_COLORS.items()]
    ax.legend(handles=handles, loc="upper right", ncols=3, fontsize=8)
    _time_axis(ax)
    return fig


def budget_series(calls: Sequence[Event], line: BudgetLine) -> tuple[list[datetime], list[float]]:
    """Cumulative spend of ``line`` (USD, or tokens for a token-only line) over ``calls``,
    restarting at each of its period buckets (a ``day`` line starts each UTC day at 0)."""
    xs, ys, current, total = [], [], None, 0.0
    for e in calls:
        p = e.payload
        if not line.applies(p.get("provider", ""), p.get("task_type") or "", bool(p.get("worker"))):
            continue
        b = bucket(line.period, e.at)
        if b != current:
            current, total = b, 0.0
        total += (float(p.get("cost_usd", 0.0)) if line.limit_usd is not None
                  else int(p.get("input_tokens", 0)) + int(p.get("output_tokens", 0)))
        xs.append(e.at)
        ys.append(total)
    return xs, ys


def plot_budget(log: Log, lines: Sequence[BudgetLine]) -> Figure:
    fig, ax = new_figure()
    calls = log.of("ProviderCallCompleted", "ProviderCallFailed")
    if not calls:
        _empty(ax, "provider calls")
        return fig
    usd_lines = [ln for ln in lines if ln.limit_usd is not None]
    token_lines = [ln for ln in lines if ln.limit_usd is None]
    if not lines:
        xs, ys = _cumulative((e.at, float(e.payload.get("cost_usd", 0.0))) for e in calls)
        ax.step(xs, ys, where="post", color="C0", linewidth=2, label=f"all calls (${ys[-1]:.4f})")
        ax.set_ylabel("cost, cumulative (USD)")
        twin = ax.twinx()
        xs, ys = _cumulative((e.at, int(e.payload.get("input_tokens", 0))
                              + int(e.payload.get("output_tokens", 0))) for e in calls)
        twin.step(xs, ys, where="post", color="C1", linewidth=2, linestyle="--",
                  label=f"tokens ({int(ys[-1]):,})")
        twin.set_ylabel("tokens, cumulative")
        ax.set_title("no budgets configured (--budgets FILE or RMO_BUDGETS_FILE)", fontsize=10)
        ax.legend(handles=ax.get_lines() + twin.get_lines(), loc="upper left")
        _time_axis(ax)
        return fig
    for i, ln in enumerate(usd_lines):
        xs, ys = budget_series(calls, ln)
        ax.step(xs or [calls[0].at], ys or [0.0], where="post", color=f"C{i}", linewidth=2,
                label=f"{ln.id} (${(ys or [0.0])[-1]:.4f})")
        ax.axhline(ln.limit_usd, color=f"C{i}", linestyle="--", linewidth=1,
                   label=f"{ln.id} limit ${ln.limit_usd:g}")
    if usd_lines:
        ax.set_ylabel("spent in the period (USD)")
    target = ax.twinx() if usd_lines and token_lines else ax
    for j, ln in enumerate(token_lines, start=len(usd_lines)):
        xs, ys = budget_series(calls, ln)
        target.step(xs or [calls[0].at], ys or [0], where="post", color=f"C{j}", linewidth=2,
                    label=f"{ln.id} ({int((ys or [0])[-1]):,} tok)")
        target.axhline(ln.limit_tokens, color=f"C{j}", linestyle="--", linewidth=1,
                       label=f"{ln.id} limit {ln.limit_tokens:,} tok")
    if token_lines:
        target.set_ylabel("spent in the period (tokens)")
    handles = ax.get_lines() + (target.get_lines() if target is not ax else [])
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    _time_axis(ax)
    return fig


def stage_latencies(log: Log) -> dict[str, list[float]]:
    """stage -> latencies (ms): each derived event's time minus its cause's (:data:`STAGES`),
    and ``end to end``: every ``TaskCompleted``'s ``latency_ms`` (from its submission)."""
    out: dict[str, list[float]] = {s: [] for s in STAGES.values()}
    for etype, stage in STAGES.items():
        for e in log.of(etype):
            cause = log.times.get(e.causation_id or "")
            if cause is not None:
                out[stage].append(max((e.at - cause).total_seconds() * 1000, 0.0))
    out["end to end"] = [float(e.payload["latency_ms"]) for e in _completions(log)
                         if e.payload.get("latency_ms")]
    return out


def plot_stage_latency(log: Log) -> Figure:
    fig, ax = new_figure(4.0)
    data = {k: v for k, v in stage_latencies(log).items() if v}
    if not data:
        _empty(ax, "stage events")
        return fig
    values = [[max(x, 0.01) for x in v] for v in data.values()]
    ax.boxplot(values, vert=False, whis=(5, 95), showfliers=True,
               flierprops={"markersize": 2, "alpha": 0.4})
    ax.set_yticks(range(1, len(data) + 1),
                  [f"{k}\n(n={len(v)}, p50 {statistics.median(v):.0f} ms)" for k, v in data.items()])
    ax.set_xscale("log")
    ax.set_xlabel("ms from the event a stage consumed to the event it produced (log scale); "
                  "box: p25-p75, whiskers: p5-p95")
    ax.grid(alpha=0.3, axis="x")
    return fig


def plot_deadletters(log: Log) -> Figure:
    fig, ax = new_figure(3.0)
    letters = log.of("DeadLettered")
    if not letters:
        _empty(ax, "dead letters")
        return fig
    counts = Counter(f"{e.payload.get('stage', '?')}: {e.payload.get('error_type', '?')}"
                     for e in letters)
    labels, values = zip(*sorted(counts.items(), key=lambda kv: kv[1]))
    ax.barh(labels, values, color="#616161")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v}", va="center")
    ax.set_xlabel("dead letters (stage: error type)")
    ax.grid(alpha=0.3, axis="x")
    return fig


# --------------------------------------------------------------------------- figures -> HTML


def _completions(log: Log) -> list[Event]:
    """Each task's first TaskCompleted in the window (a task completes once)."""
    seen, out = set(), []
    for e in log.of("TaskCompleted"):
        task = e.payload.get("task_id")
        if task not in seen:
            seen.add(task)
            out.append(e)
    return out


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def table_html(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table of ``rows`` under ``headers``, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclass
class Summary:
    """The executive summary's figures (USD, tokens, ms)."""

    submitted: int
    completed: int
    statuses: dict[str, int]
    pass_rate: float | None
    cost_usd: float
    tokens: int
    calls: int
    failed_calls: int
    trips: int
    dead_letters: int
    stalls: int
    p50_latency_ms: float
    p95_latency_ms: float


def summarize(log: Log) -> Summary:
    done = _completions(log)
    statuses = Counter(e.payload.get("status", "?") for e in done)
    checked = statuses["passed"] + statuses["failed"]
    calls = log.of("ProviderCallCompleted", "ProviderCallFailed")
    latencies = [float(e.payload.get("latency_ms", 0.0)) for e in done]
    return Summary(
        submitted=len({e.payload.get("task_id") for e in log.of("TaskSubmitted")}),
        completed=len(done), statuses=dict(sorted(statuses.items())),
        pass_rate=statuses["passed"] / checked if checked else None,
        cost_usd=sum(float(e.payload.get("cost_usd", 0.0)) for e in calls),
        tokens=sum(int(e.payload.get("input_tokens", 0)) + int(e.payload.get("output_tokens", 0))
                   for e in calls),
        calls=len(calls), failed_calls=sum(e.type == "ProviderCallFailed" for e in calls),
        trips=sum(e.payload.get("to_state") == "open" for e in log.of("BreakerTransitioned")),
        dead_letters=len(log.of("DeadLettered")), stalls=len(log.of("StageStalled")),
        p50_latency_ms=_percentile(latencies, 0.5), p95_latency_ms=_percentile(latencies, 0.95),
    )


def _summary_html(s: Summary, lines: Sequence[BudgetLine], log: Log) -> str:
    statuses = ", ".join(f"{k} {v}" for k, v in s.statuses.items()) or "-"
    rows = [
        ("tasks submitted", s.submitted),
        ("tasks completed", f"{s.completed} ({statuses})"),
        ("pass rate (passed / validated)", "-" if s.pass_rate is None else f"{100 * s.pass_rate:.1f} %"),
        ("cost", f"${s.cost_usd:.6f} USD"),
        ("tokens (input + output)", f"{s.tokens:,}"),
        ("provider calls", f"{s.calls} ({s.failed_calls} failed)"),
        ("task latency, submitted to completed",
         f"p50 {s.p50_latency_ms:,.0f} ms, p95 {s.p95_latency_ms:,.0f} ms"),
        ("breaker trips", s.trips), ("dead letters", s.dead_letters), ("stalls", s.stalls),
    ]
    calls = log.of("ProviderCallCompleted", "ProviderCallFailed")
    for ln in lines:
        _, ys = budget_series(calls, ln)
        used = ys[-1] if ys else 0.0
        if ln.limit_usd is not None:
            used_text = (f"${used:.6f} of ${ln.limit_usd:g} ({_pct(used, ln.limit_usd)}, "
                         "last period bucket)")
        else:
            used_text = (f"{int(used):,} of {ln.limit_tokens:,} tokens "
                         f"({_pct(used, ln.limit_tokens or 0)}, last period bucket)")
        rows.append((f"budget {ln.id}", used_text))
    if not lines:
        rows.append(("budgets", "none configured"))
    return table_html(("", "value"), rows)


def _providers_html(log: Log) -> str:
    calls = log.of("ProviderCallCompleted", "ProviderCallFailed")
    done = _completions(log)
    trips = Counter(e.payload.get("provider") for e in log.of("BreakerTransitioned")
                    if e.payload.get("to_state") == "open")
    rows = []
    answers = _by_provider(e for e in done if e.payload.get("status") in ("passed", "failed"))
    for p, mine in _by_provider(calls).items():
        lat = [float(e.payload.get("latency_ms", 0.0)) for e in mine
               if e.type == "ProviderCallCompleted"]
        answered = answers.get(p, [])
        passed = sum(e.payload["status"] == "passed" for e in answered)
        rows.append((p, len(mine), sum(e.type == "ProviderCallFailed" for e in mine), len(answered),
                     _pct(passed, len(answered)),
                     f"${sum(float(e.payload.get('cost_usd', 0.0)) for e in mine):.6f}",
                     f"{_percentile(lat, 0.5):.1f}", f"{_percentile(lat, 0.95):.1f}", trips[p]))
    return table_html(("provider", "calls", "failed", "tasks answered", "pass rate", "cost USD",
                   "p50 ms", "p95 ms", "trips"), rows)


def _innermost(stack: str) -> str:
    """The last line of a stack (where it waits or blocks), "-" for none."""
    lines = stack.strip().splitlines()
    return lines[-1].strip() if lines else "-"


def fmt_time(t: datetime) -> str:
    """``t`` in UTC as ``YYYY-MM-DD HH:MM:SS.mmmZ``."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def figure_html(name: str, fig: Figure, caption: str) -> str:
    """``fig`` as an ``<img id="plot-{name}">`` of embedded PNG, with its caption."""
    return (f'<figure><img id="plot-{name}" alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1050px; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } figure { margin: 1em 0; } img { max-width: 100%; }
figcaption { color: #555; font-size: 0.85em; } .meta { color: #666; }
"""


@dataclass(frozen=True)
class Report:
    """A built report: ``page`` the self-contained HTML, the window (``since`` None: the whole
    log) and the counts it was built from; ``plots`` the plot names embedded (:data:`PLOTS`),
    ``empty`` those of them the window had no data for."""

    namespace: str
    page: str
    since: datetime | None
    events: int
    tasks: int
    plots: tuple[str, ...]
    empty: tuple[str, ...] = ()
    """Plots drawn without data ("no … in this window")."""

    def write(self, out_dir: Path) -> Path:
        """Write ``out_dir/rmo-report-{namespace}.html`` (``out_dir`` created if missing);
        returns the path. Raises OSError when ``out_dir`` cannot be written."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"rmo-report-{self.namespace}.html"
        path.write_text(self.page, encoding="utf-8")
        return path

    def to_dict(self, path: Path | None = None) -> dict[str, Any]:
        """The JSON form without the page; ``path`` where it was written, if it was."""
        return {"path": str(path) if path else None,
                "since": self.since.isoformat() if self.since else None,
                "events": self.events, "tasks": self.tasks, "plots": list(self.plots),
                "empty": list(self.empty)}


def render(log: Log, namespace: str, since: datetime | None, lines: Sequence[BudgetLine],
           cfg: qlearning.QConfig, generated: datetime) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The report's HTML for ``log``, the names of its plots and of those without data;
    ``cfg`` the run's Q-learning settings (:func:`learning_curve`)."""
    s = summarize(log)
    span = log.span
    window = (f"{fmt_time(span[0])} to {fmt_time(span[1])}" if span else "no events")
    figures = {
        "completions": (plot_completions(log), "Completed tasks over time, per final status."),
        "provider-pass-rate": (plot_provider_pass_rate(log),
                               "Cumulative pass rate of the tasks each provider answered."),
        "provider-cost": (plot_provider_cost(log), "Cumulative cost of each provider's calls (USD)."),
        "provider-latency": (plot_provider_latency(log),
                             "Latency of every provider call (dots; x: failed) and its rolling median."),
        "epsilon": (plot_epsilon(log, cfg), ("Exploration rate ε: the learner's after each "
                    "reward (line) and the one each routing decision used (dots).")),
        "q-values": (plot_q_values(log, cfg), ("Q-value of each action in the state most rewards "
                     "were for, after each reward (the Q-table projection replayed).")),
        "breakers": (plot_breakers(log), "Circuit breaker state of each provider over time."),
        "budget": (plot_budget(log, lines), "Spending against each budget line (dashed: its limit)."),
        "stage-latency": (plot_stage_latency(log), "Time each stage took per event (ms)."),
        "deadletters": (plot_deadletters(log), "Dead-lettered records per stage and error type."),
    }
    img = {name: figure_html(name, fig, caption) for name, (fig, caption) in figures.items()}
    transitions = table_html(("time", "provider", "from", "to", "trigger", "reason"), (
        (fmt_time(e.at), e.payload.get("provider"), e.payload.get("from_state"),
         e.payload.get("to_state"), e.payload.get("trigger", ""), e.payload.get("reason", ""))
        for e in log.of("BreakerTransitioned")))
    stages = table_html(("stage", "events", "p50 ms", "p95 ms", "max ms"), (
        (k, len(v), f"{_percentile(v, 0.5):,.1f}", f"{_percentile(v, 0.95):,.1f}",
         f"{max(v):,.1f}") for k, v in stage_latencies(log).items() if v))
    letters = table_html(("time", "stage", "error type", "source", "reason"), (
        (fmt_time(e.at), e.payload.get("stage"), e.payload.get("error_type"),
         (f"{e.payload.get('source_topic')}[{e.payload.get('source_partition')}]"
          f"@{e.payload.get('source_offset')}"), str(e.payload.get("reason", ""))[:300])
        for e in log.of("DeadLettered")))
    stalls = table_html(("time", "worker", "kind", "stage", "stalled ms", "lag", "where"), (
        (fmt_time(e.at), e.payload.get("worker"), e.payload.get("kind"), e.payload.get("stage") or "-",
         f"{float(e.payload.get('stalled_ms', 0)):,.0f}", e.payload.get("lag") or "-",
         _innermost(e.payload.get("stack") or "")) for e in log.of("StageStalled")))
    errors = Counter(e.payload.get("category", "?") for e in log.of("ErrorLogged"))
    error_counts = ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    state = most_updated_state(log)
    body = f"""
<h1>Fractal-RMO run report</h1>
<p class="meta">namespace <b>{html.escape(namespace)}</b>; events {window} ({log.count:,} events
{'since ' + html.escape(fmt_time(since)) if since else 'in the whole log'});
generated {fmt_time(generated)}</p>
<h2>Summary</h2>
{_summary_html(s, lines, log)}
{img['completions']}
<h2>Providers</h2>
{_providers_html(log)}
{img['provider-pass-rate']}
{img['provider-cost']}
{img['provider-latency']}
<h2>Learning</h2>
<p>{len(log.of('ProviderSelected'))} routing decisions, {len(log.of('RewardComputed'))} rewards;
state most rewards were for: {html.escape(state or '-')}.</p>
{img['epsilon']}
{img['q-values']}
<h2>Circuit breakers</h2>
{img['breakers']}
{transitions if log.of('BreakerTransitioned') else '<p>no transitions in this window</p>'}
<h2>Budget</h2>
{img['budget']}
<h2>Stages</h2>
{stages}
{img['stage-latency']}
<p>errors logged per category: {html.escape(error_counts or 'none')}</p>
<h2>Dead letters</h2>
{img['deadletters']}
{letters if log.of('DeadLettered') else '<p>none</p>'}
<h2>Stalls</h2>
{stalls if log.of('StageStalled') else '<p>none</p>'}
"""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Fractal-RMO report: {html.escape(namespace)}</title><style>{CSS}</style>"
            f"</head><body>{body}</body></html>\n")
    empty = tuple(name for name, (fig, _) in figures.items() if fig.get_label() == EMPTY)
    return page, tuple(figures), empty


async def build_report(settings: Settings, registry: TopicRegistry,
                       since: datetime | None = None, budgets_file: Path | None = None,
                       now: datetime | None = None) -> Report:
    """Read the log (:func:`read_log`) and render the report of ``settings.namespace``.
    Budget limits from ``budgets_file``, else ``settings.budgets_file``.

    Raises:
        LookupError: a topic does not exist.
        TimeoutError: the broker reports no high watermark.
        OSError: the budgets file cannot be read; ValueError: it is invalid.
    """
    lines = load_budgets(budgets_file or settings.budgets_file).budgets
    log = await read_log(settings, registry, since)
    page, plots, empty = render(log, settings.namespace, since, lines, qconfig(settings),
                                now or datetime.now(UTC))
    return Report(namespace=settings.namespace, page=page, since=since, events=log.count,
                  tasks=len(_completions(log)), plots=plots, empty=empty)
