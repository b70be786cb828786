"""Prometheus exposition of a worker (SPEC §6): ``GET /metrics`` on ``RMO_METRICS_PORT``.

Served by prometheus_client's own threaded HTTP server (:func:`prometheus_client.start_http_server`)
from a registry of this process. Three kinds of series:

- **Namespace-wide** (label ``namespace``, no ``worker``): read by :class:`StateCollector` from
  the projected state in Redis at scrape time: tasks by final status, events applied, per
  provider calls, failures by ``error_type``, latency histogram, tokens and cost, breaker state
  and trips, budgets, Q-learning. They are projections of the log, so they are exact (budget
  reservations in flight are shared ephemeral state, and a budget's current period follows the
  host's clock, as in ``rmo budget``), and every worker of a namespace exports the *same* values. Several workers therefore export duplicate
  series that differ only in Prometheus' ``instance`` label: aggregate them across targets with
  ``max by (...)`` (or ``max without (instance)``), never ``sum``, or they count once per worker.
- **Per-process** (labels ``namespace`` and ``worker`` = ``host:pid``): observed in this process
  after each applied batch (:data:`streams.stage.observers`): batch processing time and size per
  consumer, submit-to-completed time of the tasks this process completed, dead letters it
  produced. Each is counted by exactly one process: ``sum`` across workers.
- **Consumer lag** (labels ``namespace``, ``consumer``, ``topic``, ``partition``): for the
  partitions assigned to this worker, the high watermark its Kafka consumer last saw in a fetch
  response minus the committed offset (the consumer's Redis checkpoint + 1, streams/keys.py).
  A partition is assigned to one worker at a time, so ``sum`` across workers is right.

Plus prometheus_client's process, platform and GC collectors (``process_*``, ``python_*``).

Units are base units (seconds, USD, tokens); counters end in ``_total``; label values come from
bounded sets (configured providers and budget lines, event types, statuses, error types,
consumers, topic partitions): never task ids.

**Port.** ``RMO_METRICS_PORT`` (:attr:`streams.config.Settings.metrics_port`, default 9700)
is the first port tried: a worker binds the first free one of
``port .. port + PORT_SPAN - 1``, so several workers on one host get consecutive ports that a
static scrape config can list; ``0`` binds any free port the OS picks; ``-1`` serves nothing.
The bound port is logged and announced in the worker's heartbeat (streams/liveness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

import orjson
from faust.exceptions import ConsumerNotStarted
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis

from agents import qlearning
from agents.breaker import BreakerState
from agents.budget import BudgetLine, BudgetUsage, load_budgets, usage
from agents.executor import qconfig
from agents.providers.base import ERROR_CLASSES, Provider
from models.events import Envelope
from streams import liveness, stage
from streams.config import Settings
from streams.keys import Keys
from streams.pipeline import SOURCES
from streams.projections import MICRO
from streams.stage import REDIS_DOWN, Tx
from streams.topics import load_topics

log = logging.getLogger("rmo.prometheus")

PORT_SPAN = 20
"""Ports tried from ``RMO_METRICS_PORT`` on: up to this many workers on one host."""
READ_TIMEOUT_S = 5.0
"""A scrape's Redis reads give up after this long (Prometheus' default scrape timeout is 10 s)."""

CALL_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                          10.0, 20.0, 30.0, 60.0)
"""Provider call latency buckets (s): whole milliseconds, because the projection keeps a 1 ms
histogram (``latency_ms:{ms}`` fields of ``{ns}:provider:{id}``, streams/projections.py)."""
BATCH_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                            5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Records per batch; a batch holds at most ``RMO_BATCH_MAX`` (1000) records."""
TASK_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                          600.0)
BREAKER_STATES = ("closed", "open", "half_open")
"""agents/breaker.py ``BreakerStateName``: one ``rmo_breaker_state`` series each."""


class MetricsPortUnavailable(OSError):
    """No port of the configured range could be bound; the message names the range and the fix."""


# ----------------------------------------------------------------------------- state read


@dataclass(frozen=True)
class State:
    """What one scrape read from Redis (strings as stored; see streams/keys.py)."""

    counters: dict[str, str]
    providers: dict[str, dict[str, str]]
    breakers: dict[str, BreakerState]
    updates: int
    rewards: list[float]
    checkpoints: dict[tuple[str, str, int], int]
    budgets: list[BudgetUsage]


async def read_state(redis: Redis, keys: Keys, providers: Sequence[str],
                     lag_keys: Sequence[tuple[str, str, int]], lines: Sequence[BudgetLine],
                     now: datetime) -> State:
    """Read the namespace's projected state: counters, per-provider stats and breakers (for
    ``providers`` and every provider with stats), the Q-table's update count and experience
    buffer's rewards, the checkpoints of ``lag_keys`` ((consumer, topic, partition); -1 when
    none yet) and the budget ``lines``' usage at ``now``.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: Redis is unreachable.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.counters)
    pipe.smembers(keys.providers_index)
    pipe.hget(keys.qmeta, "updates")
    pipe.lrange(keys.experience, 0, -1)
    if lag_keys:
        pipe.mget([keys.checkpoint(c, t, p) for c, t, p in lag_keys])
    counters, indexed, updates, experience, *marks = await pipe.execute()
    ids = sorted(set(providers) | set(indexed))
    pipe = redis.pipeline(transaction=False)
    for p in ids:
        pipe.hgetall(keys.provider_stats(p))
        pipe.hgetall(keys.breaker(p))
    raw = await pipe.execute()
    checkpoints = {k: -1 if m is None else int(m)
                   for k, m in zip(lag_keys, marks[0] if marks else [])}
    return State(
        counters=counters,
        providers={p: raw[2 * i] for i, p in enumerate(ids)},
        breakers={p: BreakerState.from_hash(raw[2 * i + 1]) if raw[2 * i + 1] else BreakerState()
                  for i, p in enumerate(ids)},
        updates=int(updates or 0),
        rewards=[float(orjson.loads(x)[2]) for x in experience],
        checkpoints=checkpoints,
        budgets=await usage(redis, keys, tuple(lines), now) if lines else [],
    )


def latency_buckets(stats: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (``le`` in s, count) and the sum (s) of a provider's 1 ms
    latency histogram (fields ``latency_ms:{ms}`` -> count, ``ms`` the call's latency rounded
    down). A call counts in bucket ``le`` only when ``ms + 1 <= le`` in ms, i.e. when it surely
    took at most ``le``; the sum takes each call at its bucket's midpoint (``ms + 0.5``), so it
    is an estimate within 0.5 ms per call."""
    hist = sorted((int(f[11:]), int(n)) for f, n in stats.items() if f.startswith("latency_ms:"))
    out: list[tuple[str, float]] = []
    for le in CALL_LATENCY_BUCKETS_S:
        le_ms = round(le * 1000)
        out.append((repr(le), float(sum(n for ms, n in hist if ms + 1 <= le_ms))))
    out.append(("+Inf", float(sum(n for _, n in hist))))
    return out, sum((ms + 0.5) * n for ms, n in hist) / 1000


# ----------------------------------------------------------------------------- collector


@dataclass(eq=False)  # hashable by identity: the registry keys its collectors
class StateCollector:
    """A prometheus_client custom collector: the namespace-wide series (module docstring), read
    from Redis on each scrape, and the consumer lag of this worker's assigned partitions.

    ``models``: provider id -> configured model (the ``model`` label; ``unknown`` for a provider
    that has stats in Redis but is not in this worker's providers file). ``highwaters``:
    returns (topic, partition) -> high watermark for the partitions assigned to this process
    (empty when it has none). Each scrape opens its own Redis connection in the scraping
    thread (``asyncio.run``: call :meth:`collect` from a thread without a running event loop, as
    the HTTP server's are), so a busy worker event loop never delays a scrape and a scrape
    never blocks it."""

    settings: Settings
    models: dict[str, str]
    lines: tuple[BudgetLine, ...] = ()
    highwaters: Callable[[], dict[tuple[str, int], int]] = dict
    _readers: dict[str, list[str]] = field(default_factory=dict)
    _down: bool = False

    def __post_init__(self) -> None:
        registry = load_topics(self.settings.namespace, self.settings.topics_file)
        for name, role in SOURCES:
            self._readers.setdefault(registry.name(role), []).append(name)

    def collect(self) -> Iterator[Metric]:
        ns = self.settings.namespace
        started = time.perf_counter()
        hw = self.highwaters()
        lag_keys = [(c, t, p) for t, p in sorted(hw) for c in self._readers.get(t, ())]
        state = self._read(lag_keys)
        up = GaugeMetricFamily("rmo_redis_up", "1 when this scrape read the namespace's state "
                               "from Redis, 0 when Redis was unreachable (the rmo_* namespace "
                               "series are then missing)", labels=["namespace"])
        up.add_metric([ns], 1.0 if state else 0.0)
        yield up
        if state is not None:
            yield from self._families(ns, state)
            lag = GaugeMetricFamily(
                "rmo_consumer_lag_records", "Records not applied yet on a partition assigned "
                "to this worker: high watermark (last fetch response) minus committed offset "
                "(Redis checkpoint + 1)", labels=["namespace", "consumer", "topic", "partition"])
            for lag_key in lag_keys:
                consumer, topic, partition = lag_key
                behind = hw[(topic, partition)] - (state.checkpoints[lag_key] + 1)
                lag.add_metric([ns, consumer, topic, str(partition)], float(max(behind, 0)))
            yield lag
        took = GaugeMetricFamily("rmo_state_read_duration_seconds",
                                 "Seconds this scrape spent reading the namespace's state",
                                 labels=["namespace"])
        took.add_metric([ns], time.perf_counter() - started)
        yield took

    def _read(self, lag_keys: list[tuple[str, str, int]]) -> State | None:
        """The state, or None (logged once per outage) when Redis cannot be read in time."""
        async def read() -> State:
            redis = Redis.from_url(self.settings.require_redis(), decode_responses=True,
                                   socket_timeout=READ_TIMEOUT_S, socket_connect_timeout=2.0)
            try:
                return await asyncio.wait_for(
                    read_state(redis, Keys(self.settings.namespace), list(self.models),
                               lag_keys, self.lines, datetime.now(UTC)), READ_TIMEOUT_S)
            finally:
                await redis.aclose()

        try:
            state = asyncio.run(read())
        except (*REDIS_DOWN, TimeoutError) as exc:
            if not self._down:
                log.error("metrics: cannot read the namespace's state from Redis (%s); "
                          "rmo_redis_up is 0 until it can", exc)
                self._down = True
            return None
        if self._down:
            log.warning("metrics: Redis readable again")
            self._down = False
        return state

    def _families(self, ns: str, s: State) -> Iterator[Metric]:
        tasks = CounterMetricFamily("rmo_tasks_completed", "Tasks completed, by final status",
                                    labels=["namespace", "status"])
        events = CounterMetricFamily("rmo_events", "Events applied by the stage consumers "
                                     "(tasks, analyses, executions, validations topics), by type",
                                     labels=["namespace", "event_type"])
        for f, v in sorted(s.counters.items()):
            if f.startswith("tasks:"):
                tasks.add_metric([ns, f[6:]], float(v))
            elif f.startswith("events:"):
                events.add_metric([ns, f[7:]], float(v))
        cost = CounterMetricFamily("rmo_tasks_cost_usd", "Cost of the completed tasks' calls (USD)",
                                   labels=["namespace"])
        cost.add_metric([ns], int(s.counters.get("cost_microusd", 0)) / MICRO)
        yield from (tasks, events, cost)
        yield from self._provider_families(ns, s)
        yield from _budget_families(ns, s.budgets)
        eps = GaugeMetricFamily("rmo_qlearning_epsilon", "Exploration rate of the routing policy "
                                "after the rewards applied so far", labels=["namespace"])
        eps.add_metric([ns], qlearning.epsilon(s.updates, qconfig(self.settings)))
        updates = CounterMetricFamily("rmo_qlearning_updates", "Rewards applied to the Q-table",
                                      labels=["namespace"])
        updates.add_metric([ns], float(s.updates))
        yield from (eps, updates)
        if s.rewards:
            mean = GaugeMetricFamily(
                "rmo_qlearning_reward_mean", "Mean reward of the experience buffer (the latest "
                f"{self.settings.experience_size} rewards)", labels=["namespace"])
            mean.add_metric([ns], sum(s.rewards) / len(s.rewards))
            yield mean

    def _provider_families(self, ns: str, s: State) -> Iterator[Metric]:
        pm = ["namespace", "provider", "model"]
        calls = CounterMetricFamily("rmo_provider_calls", "Provider calls (every attempt)",
                                    labels=pm)
        failures = CounterMetricFamily("rmo_provider_call_failures", "Failed provider calls, by "
                                       "error type", labels=[*pm, "error_type"])
        latency = HistogramMetricFamily("rmo_provider_call_duration_seconds", "Provider call "
                                        "latency, failed calls included", labels=pm)
        tokens = CounterMetricFamily("rmo_provider_tokens", "Tokens of provider calls, by type "
                                     "(input, output)", labels=[*pm, "type"])
        cost = CounterMetricFamily("rmo_provider_cost_usd", "Cost of provider calls (USD)",
                                   labels=pm)
        answered = CounterMetricFamily("rmo_provider_tasks", "Completed tasks this provider "
                                       "answered (its answer was chosen)", labels=pm)
        passed = CounterMetricFamily("rmo_provider_tasks_passed", "Completed tasks this provider "
                                     "answered that passed validation", labels=pm)
        trips = CounterMetricFamily("rmo_breaker_trips", "Times the provider's circuit breaker "
                                    "opened", labels=["namespace", "provider"])
        state = GaugeMetricFamily("rmo_breaker_state", "Projected circuit breaker state: 1 for "
                                  "the current state, 0 for the others",
                                  labels=["namespace", "provider", "state"])
        for p, h in s.providers.items():
            labels = [ns, p, self.models.get(p, "unknown")]
            calls.add_metric(labels, float(h.get("calls", 0)))
            # every known error type from 0 (Prometheus' advice for known label values: a
            # first failure is then an increase), plus any other the log recorded
            errors = dict.fromkeys(ERROR_CLASSES, "0") | {
                f[7:]: v for f, v in h.items() if f.startswith("errors:")}
            for error_type, v in sorted(errors.items()):
                failures.add_metric([*labels, error_type], float(v))
            buckets, total = latency_buckets(h)
            latency.add_metric(labels, buckets, total)
            tokens.add_metric([*labels, "input"], float(h.get("input_tokens", 0)))
            tokens.add_metric([*labels, "output"], float(h.get("output_tokens", 0)))
            cost.add_metric(labels, int(h.get("cost_microusd", 0)) / MICRO)
            answered.add_metric(labels, float(h.get("tasks", 0)))
            passed.add_metric(labels, float(h.get("tasks_passed", 0)))
            trips.add_metric([ns, p], float(h.get("trips", 0)))
            for name in BREAKER_STATES:
                state.add_metric([ns, p, name], float(s.breakers[p].state == name))
        yield from (calls, failures, latency, tokens, cost, answered, passed, trips, state)


def _budget_families(ns: str, budgets: list[BudgetUsage]) -> Iterator[Metric]:
    """Gauges of each budget line in its current period bucket (agents/budget.py ``usage``):
    limit, spent (projected), pending (settled, not yet projected), reserved (in flight) and
    remaining, in USD and tokens; a line without a USD (token) limit has no USD (token) limit or
    remaining series."""
    if not budgets:
        return
    labels = ["namespace", "scope", "part", "period"]
    what = {"limit": "Limit", "spent": "Spent (projected)",
            "pending": "Settled, not yet projected", "reserved": "Reserved by calls in flight",
            "remaining": "Remaining (limit - spent - pending - reserved)"}
    for unit in ("usd", "tokens"):
        for kind, text in what.items():
            fam = GaugeMetricFamily(f"rmo_budget_{kind}_{unit}", f"{text} of a budget line in "
                                    f"its current period ({'USD' if unit == 'usd' else 'tokens'})",
                                    labels=labels)
            for b in budgets:
                value = getattr(b, f"{kind}_{unit}")
                if value is not None:
                    fam.add_metric([ns, b.scope, b.part, b.period], float(value))
            yield fam


# ----------------------------------------------------------------------------- per process


class ProcessMetrics:
    """The per-process series (module docstring), registered in ``registry`` and observed by
    :meth:`observe_batch` after each applied batch."""

    def __init__(self, registry: CollectorRegistry, namespace: str, worker: str) -> None:
        self.labels = {"namespace": namespace, "worker": worker}
        common = ["namespace", "worker"]
        self.batch_seconds = Histogram(
            "rmo_stage_batch_duration_seconds", "Time to apply one batch (stage logic, "
            "projections, produce, commit), by consumer", [*common, "consumer"],
            buckets=BATCH_DURATION_BUCKETS_S, registry=registry)
        self.batch_records = Histogram(
            "rmo_stage_batch_records", "Records per applied batch, by consumer",
            [*common, "consumer"], buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.task_seconds = Histogram(
            "rmo_task_latency_seconds", "Submit-to-completed time of the tasks this process "
            "completed, by status (dead-lettered tasks have no measured latency and are left "
            "out)", [*common, "status"], buckets=TASK_LATENCY_BUCKETS_S, registry=registry)
        self.dead_letters = Counter(
            "rmo_dead_letters", "Records this process dead-lettered, by consumer and reason "
            "(the dead letter's error_type: not_json, schema, oversized, ... or the exception "
            "a stage raised)", [*common, "consumer", "reason"], registry=registry)
        for name, _ in SOURCES:  # known label sets start at 0, so rate() sees the first batch
            self.batch_seconds.labels(**self.labels, consumer=name)
            self.batch_records.labels(**self.labels, consumer=name)

    def observe_batch(self, consumer: str, records: int, tx: Tx, seconds: float) -> None:
        """A :data:`streams.stage.BatchObserver`: ``records`` taken, ``seconds`` to apply them,
        and the events ``tx`` produced (dead letters, completed tasks)."""
        self.batch_seconds.labels(**self.labels, consumer=consumer).observe(seconds)
        self.batch_records.labels(**self.labels, consumer=consumer).observe(records)
        for _, _, event in tx.emitted:
            self._emitted(consumer, event)

    def _emitted(self, consumer: str, event: Envelope) -> None:
        p = event.payload
        if event.event_type == "DeadLettered":
            self.dead_letters.labels(**self.labels, consumer=consumer, reason=p.error_type).inc()
        elif event.event_type == "TaskCompleted" and p.status != "dead_lettered":
            self.task_seconds.labels(**self.labels, status=p.status).observe(p.latency_ms / 1000)


# ----------------------------------------------------------------------------- exporter


@dataclass
class Exporter:
    """A running exposition: its HTTP server on ``port`` and the registry it serves."""

    port: int
    registry: CollectorRegistry
    collector: StateCollector
    process: ProcessMetrics
    _server: WSGIServer
    _thread: threading.Thread
    _consumer: Any = None

    def watch(self, app: Any) -> None:
        """Report consumer lag for the partitions assigned to ``app``'s (a faust.App) Kafka
        consumer, from its first completed rebalance on (before that it has no assignment)."""
        async def assigned(sender: Any, **_: Any) -> None:
            self._consumer = sender.consumer

        app.on_rebalance_complete.connect(assigned)

    def highwaters(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> high watermark (from fetch responses) of the partitions
        assigned to the watched consumer; those it has not fetched from yet are left out. Read
        from the scrape thread while Faust's consumer thread may be rebalancing: a read that
        races a rebalance yields nothing this scrape."""
        consumer = self._consumer
        if consumer is None:
            return {}
        try:
            out = {}
            for tp in list(consumer.assignment()):
                hw = consumer.highwater(tp)
                if hw is not None:
                    out[(tp.topic, tp.partition)] = hw
            return out
        except (AssertionError, RuntimeError, ConsumerNotStarted):
            # aiokafka asserts the partition is still assigned; a set changed by a rebalance
            # raises RuntimeError; a stopping worker has no consumer thread any more
            return {}

    def close(self) -> None:
        """Stop serving and stop observing batches (the worker never needs this; tests do)."""
        with contextlib.suppress(ValueError):  # closed twice
            stage.observers.remove(self.process.observe_batch)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def worker_id() -> str:
    """This process as the ``worker`` label: ``host:pid``, as its heartbeat's ``worker_id``."""
    return f"{liveness.HOST}:{os.getpid()}"


def build_registry(settings: Settings, providers: dict[str, Provider]
                   ) -> tuple[CollectorRegistry, StateCollector, ProcessMetrics]:
    """A registry holding the state collector, the per-process metrics and prometheus_client's
    process/platform/GC collectors.

    Raises:
        OSError, ValueError: the budgets file is unreadable or invalid (the worker checked it
            at start already).
    """
    # no `_created` series: a gauge of start times per labelled child, doubling the series of
    # every in-process metric for nothing a dashboard uses (prometheus_client-wide switch)
    disable_created_metrics()
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    lines = load_budgets(settings.budgets_file).budgets
    collector = StateCollector(settings, {p.id: p.model for p in providers.values()}, lines)
    registry.register(collector)
    return registry, collector, ProcessMetrics(registry, settings.namespace, worker_id())


def start_exporter(settings: Settings, providers: dict[str, Provider]) -> Exporter | None:
    """Serve this worker's metrics (module docstring) and observe its batches; None when
    ``settings.metrics_port`` is -1. Logs the URL it serves.

    Raises:
        MetricsPortUnavailable: every port of the range is in use.
        OSError: the address cannot be bound for another reason (e.g. ``RMO_METRICS_ADDR`` is
            not an address of this host).
    """
    if settings.metrics_port < 0:
        return None
    registry, collector, process = build_registry(settings, providers)
    server, thread, port = _serve(registry, settings.metrics_addr, settings.metrics_port)
    exporter = Exporter(port, registry, collector, process, server, thread)
    collector.highwaters = exporter.highwaters
    stage.observers.append(process.observe_batch)
    # WARNING, the level a worker logs at by default: where to scrape must be findable in its log
    log.warning("metrics: Prometheus exposition on http://%s:%d/metrics", settings.metrics_addr,
                port)
    return exporter


def _serve(registry: CollectorRegistry, addr: str, first: int
           ) -> tuple[WSGIServer, threading.Thread, int]:
    """Bind the first free port of ``first .. first + PORT_SPAN - 1`` (any free port for 0)."""
    ports = [0] if first == 0 else range(first, min(first + PORT_SPAN, 65536))
    for port in ports:
        try:
            server, thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        return server, thread, server.server_port
    raise MetricsPortUnavailable(
        f"RMO_METRICS_PORT: ports {ports[0]}-{ports[-1]} on {addr} are all in use; set "
        "RMO_METRICS_PORT to another first port, 0 for any free port, or -1 to serve no metrics")
