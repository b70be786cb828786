"""Metrics read from the projections: per-provider stats, breaker states, counters.

``collect`` builds the ``MetricsSnapshot`` a running worker publishes on the metrics topic
(every ``metrics_interval_s``, default 5 s) and the summary ``rmo demo`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis

from agents.policy.base import Policy
from models.events import MetricsSnapshot
from streams.keys import Keys
from streams.projections import MICRO


@dataclass(frozen=True)
class ProviderSummary:
    """One provider's figures. Latency in ms, cost in USD; pass_rate over tasks it answered."""

    provider: str
    calls: int
    failures: int
    tasks: int
    tasks_passed: int
    pass_rate: float
    p50_latency_ms: float
    p95_latency_ms: float
    cost_usd: float
    breaker_state: str
    trips: int


def percentile(histogram: dict[int, int], q: float) -> float:
    """The q-quantile (0..1) of a histogram of 1 ms buckets (lower edge, ms -> count)."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = q * (total - 1)
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen > rank:
            return float(ms)
    return float(max(histogram))


async def provider_summaries(redis: Redis, keys: Keys) -> dict[str, ProviderSummary]:
    providers = sorted(await redis.smembers(keys.providers_index))
    pipe = redis.pipeline(transaction=False)
    for p in providers:
        pipe.hgetall(keys.provider_stats(p))
        pipe.hget(keys.breaker(p), "state")
    raw = await pipe.execute()
    out = {}
    for i, p in enumerate(providers):
        h, state = raw[2 * i], raw[2 * i + 1]
        hist = {int(f.split(":", 1)[1]): int(v) for f, v in h.items() if f.startswith("latency_ms:")}
        tasks, passed = int(h.get("tasks", 0)), int(h.get("tasks_passed", 0))
        out[p] = ProviderSummary(
            provider=p, calls=int(h.get("calls", 0)), failures=int(h.get("failures", 0)),
            tasks=tasks, tasks_passed=passed, pass_rate=passed / tasks if tasks else 0.0,
            p50_latency_ms=percentile(hist, 0.5), p95_latency_ms=percentile(hist, 0.95),
            cost_usd=int(h.get("cost_microusd", 0)) / MICRO, breaker_state=state or "closed",
            trips=int(h.get("trips", 0)),
        )
    return out


async def learned_policy(redis: Redis, keys: Keys, policy: Policy) -> dict[str, tuple[str, float]]:
    """What ``policy`` learned in ``keys``' namespace: state -> (best action, its score) (the
    Q-table's greedy action and Q-value, the bandit's best posterior mean per task type)."""
    return policy.learned(await policy.load(redis, keys))


async def collect(redis: Redis, keys: Keys, window_start: datetime, window_end: datetime) -> MetricsSnapshot:
    counters = {k: int(v) for k, v in (await redis.hgetall(keys.counters)).items()}
    gauges: dict[str, float] = {"q.updates": float(await redis.hget(keys.qmeta, "updates") or 0)}
    histograms: dict[str, dict[str, float]] = {}
    for p, s in (await provider_summaries(redis, keys)).items():
        counters[f"provider:{p}:calls"] = s.calls
        counters[f"provider:{p}:failures"] = s.failures
        counters[f"provider:{p}:trips"] = s.trips
        gauges[f"provider:{p}:pass_rate"] = s.pass_rate
        gauges[f"provider:{p}:cost_usd"] = s.cost_usd
        gauges[f"provider:{p}:breaker_open"] = float(s.breaker_state != "closed")
        histograms[f"provider:{p}:latency_ms"] = {"p50": s.p50_latency_ms, "p95": s.p95_latency_ms}
    return MetricsSnapshot(window_start=window_start, window_end=window_end, counters=counters,
                           gauges=gauges, histograms=histograms)
