"""streams/prometheus.py: the exposition of a namespace's projected state (real Redis, state
built by the real projections), per-process batch metrics, ports, and `promtool check metrics`."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from agents import qlearning
from agents.executor import breaker_config, qconfig
from agents.learning import QTableConsumer
from agents.providers.registry import load_providers
from models.codec import encode, make_event
from models.events import (
    Envelope,
    ProviderCallCompleted,
    ProviderCallFailed,
    RewardComputed,
    TaskCompleted,
)
from streams import prometheus, stage
from streams.config import Settings
from streams.keys import Keys
from streams.projections import BreakerProjection, BudgetProjection, CountersProjection
from streams.stage import BatchRunner, Context, ProjectionConsumer, Record, Tx
from streams.topics import load_topics

PROVIDERS = """providers:
  - id: oracle
    kind: sim
    model: grok-4
    accuracy: 1.0
  - id: idle
    kind: sim
    model: claude-opus-4
    accuracy: 1.0
"""
BUDGETS = """budgets:
  - {scope: global, period: total, limit_usd: 1.0, limit_tokens: 100000}
  - {scope: "provider:oracle", period: day, limit_tokens: 5000}
"""
CALL_LATENCIES_MS = (3.2, 7.9, 150.0)
NO_PROMTOOL = "promtool not installed: apt-get install prometheus (bash scripts/setup.sh as root)"


def make_settings(tmp_path: Path, redis_url: str, namespace: str, **update) -> Settings:
    (tmp_path / "providers.yaml").write_text(PROVIDERS)
    (tmp_path / "budgets.yaml").write_text(BUDGETS)
    return Settings(namespace=namespace, redis_url=redis_url, metrics_port=0,
                    providers_file=tmp_path / "providers.yaml",
                    budgets_file=tmp_path / "budgets.yaml", breaker_failure_threshold=2, **update)


def call(i: int, latency_ms: float, error: str | None = None) -> Envelope:
    fields = {"task_id": f"t{i}", "provider": "oracle", "model": "grok-4", "attempt": 0,
              "latency_ms": latency_ms, "input_tokens": 100 + i, "output_tokens": 20,
              "cost_usd": 0.001}
    payload = (ProviderCallFailed(**fields, error_type=error, http_status=429) if error
               else ProviderCallCompleted(**fields, response_text="x"))
    return make_event(payload, producer="executor", correlation_id=f"t{i}")


def reward(i: int, value: float) -> Envelope:
    return make_event(RewardComputed(
        task_id=f"t{i}", state="none|simple|low", action="oracle:single",
        next_state="oracle|simple|low", performance=1.0, cost_usd=0.0, cost_weight=10.0,
        reward=value, passed=True, provider="oracle", tokens=10), producer="learning")


def completed(i: int, status: str, latency_ms: float = 0.0) -> Envelope:
    return make_event(TaskCompleted(task_id=f"t{i}", status=status, provider="oracle",
                                    cost_usd=0.002, tokens=30, latency_ms=latency_ms),
                      producer="learning.qtable", correlation_id=f"t{i}")


def records(topic: str, events: list[Envelope]) -> list[Record]:
    return [Record(topic, 0, i, e.correlation_id.encode(), encode(e)) for i, e in enumerate(events)]


async def project(settings: Settings) -> None:
    """Build a namespace's state the way replay does: the real projections over events."""
    topics = load_topics(settings.namespace)
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    ctx = Context(settings=settings, keys=Keys(settings.namespace), topics=topics, redis=redis,
                  producer=None, mode="replay")
    tasks = ProjectionConsumer("analyzer", "tasks", (CountersProjection(),))
    calls = ProjectionConsumer("executor.breaker", "calls",
                               (BreakerProjection(breaker_config(settings)), BudgetProjection()))
    try:
        await BatchRunner(tasks, ctx).run(records(topics.name("tasks"), [
            completed(1, "passed"), completed(2, "passed"), completed(3, "failed")]))
        # two consecutive failures trip the breaker (threshold 2); the last call is the 150 ms one
        await BatchRunner(calls, ctx).run(records(topics.name("calls"), [
            call(1, CALL_LATENCIES_MS[0]), call(2, CALL_LATENCIES_MS[1]),
            call(3, 1.0, "rate_limited"), call(4, 2.0, "timeout"), call(5, CALL_LATENCIES_MS[2])]))
        await BatchRunner(QTableConsumer(settings, qconfig(settings)), ctx).run(
            records(topics.name("rewards"), [reward(1, 1.0), reward(2, 0.5)]))
    finally:
        await redis.aclose()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, namespace: str) -> Settings:
    return make_settings(tmp_path, redis_url, namespace)


@pytest.fixture
def exporter(settings: Settings) -> Iterator[prometheus.Exporter]:
    ex = prometheus.start_exporter(settings, load_providers(settings.providers_file))
    assert ex is not None
    yield ex
    ex.close()


@pytest.fixture
async def exposition(settings: Settings, exporter: prometheus.Exporter) -> str:
    """The scraped text of a namespace with tasks, calls, a tripped breaker, rewards, budget
    spending and one observed batch."""
    await project(settings)
    tx = Tx(Context(settings=settings, keys=Keys(settings.namespace), topics=None, redis=None,
                    producer=None))
    tx.emitted.append(("tasks", b"t1", completed(1, "passed", latency_ms=1500.0)))
    exporter.process.observe_batch("learning", 3, tx, 0.02)
    return await asyncio.to_thread(scrape, exporter.port)


def test_projected_state_is_exported_with_exact_values(exposition: str, settings: Settings) -> None:
    found = samples(exposition)
    ns = settings.namespace
    oracle = {"namespace": ns, "provider": "oracle", "model": "grok-4"}
    assert value(found, "rmo_redis_up", namespace=ns) == 1.0
    assert value(found, "rmo_tasks_completed_total", namespace=ns, status="passed") == 2
    assert value(found, "rmo_tasks_completed_total", namespace=ns, status="failed") == 1
    assert value(found, "rmo_events_total", namespace=ns, event_type="TaskCompleted") == 3
    assert value(found, "rmo_provider_calls_total", **oracle) == 5
    failures = "rmo_provider_call_failures_total"
    assert value(found, failures, **oracle, error_type="rate_limited") == 1
    assert value(found, failures, **oracle, error_type="timeout") == 1
    # the other known error types are there from 0
    assert value(found, failures, **oracle, error_type="auth_error") == 0
    assert value(found, "rmo_provider_tokens_total", **oracle, type="input") == sum(
        100 + i for i in range(1, 6))
    assert value(found, "rmo_provider_tokens_total", **oracle, type="output") == 100
    assert value(found, "rmo_provider_cost_usd_total", **oracle) == pytest.approx(0.005)
    assert value(found, "rmo_provider_tasks_total", **oracle) == 3
    assert value(found, "rmo_provider_tasks_passed_total", **oracle) == 2
    # the 1 ms histogram as seconds: 1, 2, 3 and 7 ms calls are surely <= 10 ms, 150 ms is not
    assert value(found, "rmo_provider_call_duration_seconds_bucket", **oracle, le="0.01") == 4
    assert value(found, "rmo_provider_call_duration_seconds_bucket", **oracle, le="0.002") == 1
    assert value(found, "rmo_provider_call_duration_seconds_bucket", **oracle, le="0.2") == 5
    assert value(found, "rmo_provider_call_duration_seconds_count", **oracle) == 5
    assert value(found, "rmo_provider_call_duration_seconds_sum", **oracle) == pytest.approx(
        (1.5 + 2.5 + 3.5 + 7.5 + 150.5) / 1000)
    # two consecutive failures tripped it; the success after them does not close an open breaker
    assert value(found, "rmo_breaker_trips_total", namespace=ns, provider="oracle") == 1
    assert value(found, "rmo_breaker_state", namespace=ns, provider="oracle", state="open") == 1
    assert value(found, "rmo_breaker_state", namespace=ns, provider="oracle", state="closed") == 0
    # a configured provider without calls has its series at 0 and a closed breaker
    idle = {"namespace": ns, "provider": "idle", "model": "claude-opus-4"}
    assert value(found, "rmo_provider_calls_total", **idle) == 0
    assert value(found, "rmo_breaker_state", namespace=ns, provider="idle", state="closed") == 1
    cfg = qconfig(settings)
    assert value(found, "rmo_qlearning_updates_total", namespace=ns) == 2
    assert value(found, "rmo_qlearning_epsilon", namespace=ns) == pytest.approx(
        qlearning.epsilon(2, cfg))
    # the minibatch replays old experiences, but the buffer holds each reward once
    assert value(found, "rmo_qlearning_reward_mean", namespace=ns) == pytest.approx(0.75)


def test_budget_lines_are_exported_as_rmo_budget_shows_them(exposition: str,
                                                             settings: Settings) -> None:
    found = samples(exposition)
    ns = settings.namespace
    total = {"namespace": ns, "scope": "global", "part": "all", "period": "total"}
    day = {"namespace": ns, "scope": "provider:oracle", "part": "all", "period": "day"}
    tokens = sum(100 + i + 20 for i in range(1, 6))
    assert value(found, "rmo_budget_limit_usd", **total) == 1.0
    assert value(found, "rmo_budget_spent_usd", **total) == pytest.approx(0.005)
    assert value(found, "rmo_budget_remaining_usd", **total) == pytest.approx(0.995)
    assert value(found, "rmo_budget_reserved_usd", **total) == 0
    assert value(found, "rmo_budget_spent_tokens", **total) == tokens
    assert value(found, "rmo_budget_remaining_tokens", **day) == 5000 - tokens
    # a line without a USD limit has no USD limit or remaining series
    assert ("rmo_budget_limit_usd", frozenset(day.items())) not in found
    assert ("rmo_budget_remaining_usd", frozenset(day.items())) not in found


def test_per_process_series_carry_the_worker_and_no_task_id(exposition: str,
                                                           settings: Settings) -> None:
    found = samples(exposition)
    who = {"namespace": settings.namespace, "worker": prometheus.worker_id()}
    assert value(found, "rmo_stage_batch_records_sum", **who, consumer="learning") == 3
    assert value(found, "rmo_stage_batch_duration_seconds_sum", **who, consumer="learning") == 0.02
    # the batches project() ran through the real BatchRunner were observed too
    assert value(found, "rmo_stage_batch_records_sum", **who, consumer="learning.qtable") == 2
    assert value(found, "rmo_stage_batch_records_sum", **who, consumer="executor.breaker") == 5
    # every consumer's batch series exist from the start
    assert value(found, "rmo_stage_batch_records_count", **who, consumer="executor") == 0
    assert value(found, "rmo_task_latency_seconds_sum", **who, status="passed") == 1.5
    assert value(found, "rmo_task_latency_seconds_bucket", **who, status="passed", le="2.5") == 1
    assert value(found, "rmo_task_latency_seconds_bucket", **who, status="passed", le="1.0") == 0
    # namespace-wide series have no worker label: identical in every worker of the namespace
    assert all("worker" not in dict(labels) for name, labels in found
               if name.startswith(("rmo_tasks_", "rmo_provider_", "rmo_budget_", "rmo_breaker_")))
    task_ids = {f"t{i}" for i in range(1, 6)}
    assert not any(v in task_ids for _, labels in found for _, v in labels)


def test_exposition_passes_promtool_check_metrics(exposition: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(NO_PROMTOOL)
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, text=True,
                            capture_output=True, timeout=30, check=False)
    # promtool prints lint problems (a counter without _total, a non-base unit...) and exits 1
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


async def test_a_batch_with_a_dead_letter_is_counted_by_reason(settings: Settings,
                                                             exporter: prometheus.Exporter) -> None:
    class Sent:
        async def send(self, topic: str, key: bytes | None, value: bytes):
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    topics = load_topics(settings.namespace)
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    ctx = Context(settings=settings, keys=Keys(settings.namespace), topics=topics, redis=redis,
                  producer=Sent())
    consumer = ProjectionConsumer("validator", "executions", ())
    try:
        await BatchRunner(consumer, ctx).run([Record(topics.name("executions"), 0, 0, b"k", b"{")])
    finally:
        await redis.aclose()
    found = samples(await asyncio.to_thread(scrape, exporter.port))
    who = {"namespace": settings.namespace, "worker": prometheus.worker_id()}
    assert value(found, "rmo_dead_letters_total", **who, consumer="validator",
                 reason="not_json") == 1
    assert value(found, "rmo_stage_batch_records_count", **who, consumer="validator") == 1


def test_a_closed_exporter_observes_no_more_batches(settings: Settings) -> None:
    ex = prometheus.start_exporter(settings, load_providers(settings.providers_file))
    assert ex.process.observe_batch in stage.observers
    ex.close()
    assert ex.process.observe_batch not in stage.observers


async def test_consumer_lag_is_high_watermark_minus_committed_offset(
        settings: Settings, exporter: prometheus.Exporter) -> None:
    topics = load_topics(settings.namespace)
    tasks, calls = topics.name("tasks"), topics.name("calls")
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        await redis.set(Keys(settings.namespace).checkpoint("analyzer", tasks, 2), 6)
    finally:
        await redis.aclose()
    # partition 2 applied up to offset 6 of 10 records; calls partition 0 applied nothing yet
    exporter.collector.highwaters = lambda: {(tasks, 2): 10, (calls, 0): 4, ("other", 0): 9}
    found = samples(await asyncio.to_thread(scrape, exporter.port))
    ns = settings.namespace
    assert value(found, "rmo_consumer_lag_records", namespace=ns, consumer="analyzer",
                 topic=tasks, partition="2") == 3
    assert value(found, "rmo_consumer_lag_records", namespace=ns, consumer="executor.breaker",
                 topic=calls, partition="0") == 4
    assert not any(labels and dict(labels).get("topic") == "other" for _, labels in found)


def test_unreachable_redis_reports_redis_down_and_still_serves(tmp_path: Path,
                                                               namespace: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = make_settings(tmp_path, f"redis://127.0.0.1:{dead}/0", namespace)
    ex = prometheus.start_exporter(settings, load_providers(settings.providers_file))
    try:
        found = samples(scrape(ex.port))
    finally:
        ex.close()
    assert value(found, "rmo_redis_up", namespace=namespace) == 0
    assert not any(name.startswith("rmo_tasks_") for name, _ in found)
    assert any(name == "rmo_stage_batch_records_count" for name, _ in found)
    assert any(name == "process_cpu_seconds_total" for name, _ in found)


def test_workers_on_one_host_take_the_next_free_ports(settings: Settings) -> None:
    providers = load_providers(settings.providers_file)
    first = prometheus.start_exporter(settings, providers)
    try:
        base = settings.model_copy(update={"metrics_port": first.port})
        second = prometheus.start_exporter(base, providers)
        third = prometheus.start_exporter(base, providers)
        try:
            # the next free ones of the range (another process may hold one of them)
            assert first.port < second.port < third.port < first.port + prometheus.PORT_SPAN
            assert "rmo_redis_up" in scrape(third.port)
        finally:
            second.close()
            third.close()
    finally:
        first.close()


def test_a_full_port_range_is_one_error_naming_the_fix(settings: Settings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus, "PORT_SPAN", 2)
    held = []
    try:
        while True:  # two consecutive ports held by this test
            a = socket.socket()
            a.bind(("0.0.0.0", 0))
            b = socket.socket()
            try:
                b.bind(("0.0.0.0", a.getsockname()[1] + 1))
            except OSError:
                a.close()
                b.close()
                continue
            held = [a, b]
            break
        for s in held:
            s.listen()
        port = a.getsockname()[1]
        busy = settings.model_copy(update={"metrics_port": port})
        with pytest.raises(prometheus.MetricsPortUnavailable,
                           match=f"ports {port}-{port + 1} .* all in use; set RMO_METRICS_PORT"):
            prometheus.start_exporter(busy, load_providers(settings.providers_file))
    finally:
        for s in held:
            s.close()


def test_port_minus_one_serves_nothing(settings: Settings) -> None:
    off = settings.model_copy(update={"metrics_port": -1})
    assert prometheus.start_exporter(off, load_providers(settings.providers_file)) is None


def test_latency_buckets_count_a_call_only_where_it_surely_belongs() -> None:
    stats = {"calls": "4", "latency_ms:4": "1", "latency_ms:5": "2", "latency_ms:1200": "1"}
    buckets, total = prometheus.latency_buckets(stats)
    as_dict = dict(buckets)
    # a call of 5.x ms is not surely <= 5 ms; one of 4.x ms is
    assert as_dict["0.005"] == 1 and as_dict["0.01"] == 3 and as_dict["1.0"] == 3
    assert as_dict["2.0"] == 4 and as_dict["+Inf"] == 4
    assert [le for le, _ in buckets[:-1]] == [repr(b) for b in prometheus.CALL_LATENCY_BUCKETS_S]
    assert total == pytest.approx((4.5 + 2 * 5.5 + 1200.5) / 1000)
    assert prometheus.latency_buckets({}) == ([(repr(b), 0.0) for b in
                                               prometheus.CALL_LATENCY_BUCKETS_S] + [("+Inf", 0.0)],
                                              0)
