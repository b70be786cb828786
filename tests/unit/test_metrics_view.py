"""`rmo metrics --follow` on a terminal: one live table of the latest snapshot (rich)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.console import Console

from models.codec import make_event
from models.events import MetricsSnapshot
from streams.cli import _metrics_live, metrics_view

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def snapshot(at: datetime, completed: int, calls: int, breaker_open: float = 0.0) -> MetricsSnapshot:
    return MetricsSnapshot(
        window_start=at - timedelta(seconds=5), window_end=at,
        counters={"tasks:passed": completed, "events:TaskSubmitted": 164,
                  "provider:grok:calls": calls, "provider:grok:failures": 2,
                  "provider:grok:trips": 1, "provider:claude:calls": 7,
                  "provider:claude:failures": 0, "provider:claude:trips": 0},
        gauges={"q.updates": 40.0, "provider:grok:pass_rate": 0.632,
                "provider:grok:cost_usd": 0.0123, "provider:grok:breaker_open": breaker_open,
                "provider:claude:pass_rate": 0.849, "provider:claude:cost_usd": 0.5},
        histograms={"provider:grok:latency_ms": {"p50": 12.0, "p95": 48.5},
                    "provider:claude:latency_ms": {"p50": 30.0, "p95": 90.0}})


def render(renderable) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_the_view_has_a_row_per_provider_and_counter_rates() -> None:
    text = render(metrics_view(snapshot(T0 + timedelta(seconds=5), 60, 80, breaker_open=1.0),
                               snapshot(T0, 10, 30)))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "80" in rows["grok"] and "63.2 %" in rows["grok"] and "0.012300" in rows["grok"]
    assert "12.0" in rows["grok"] and "48.5" in rows["grok"] and "open" in rows["grok"]
    assert "closed" in rows["claude"] and "84.9 %" in rows["claude"]
    # 50 more passed tasks in 5 s: 10.0 per s; a counter that did not move: 0.0
    assert "10.0" in rows["tasks:passed"] and "0.0" in rows["events:TaskSubmitted"]
    assert "provider:grok:calls" not in text  # provider counters are in the providers table


async def test_the_live_table_shows_the_latest_snapshot() -> None:
    async def snapshots():
        for i in range(3):
            yield make_event(snapshot(T0 + timedelta(seconds=5 * i), 10 * i, 30 + i),
                             producer="test", correlation_id="metrics")

    out = io.StringIO()
    await _metrics_live(snapshots(), Console(file=out, width=120, force_terminal=True))
    text = out.getvalue()
    assert "providers at 2026-01-01 12:00:10Z" in text
    # each snapshot redraws the table in place: the cursor goes back up over the last one
    assert text.count("providers at") >= 3 and "\x1b[1A" in text and "\x1b[2K" in text
