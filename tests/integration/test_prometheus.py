"""A real Prometheus server scrapes a real worker's /metrics and answers PromQL over its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from agents import qlearning
from agents.executor import qconfig
from streams import liveness
from streams.demo import humaneval_tasks
from streams.keys import Keys
from tests.integration.helpers import providers_file, sim, submit, wait_completed, worker
from tests.unit.test_prometheus_deploy import dashboard_names, dashboard_queries

pytestmark = pytest.mark.integration

TASKS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, target: str) -> Iterator[str]:
    """Debian's prometheus scraping ``target`` every second, on a free port; yields its URL.
    Stopped (SIGTERM, then SIGKILL) by its pid."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed: apt-get install prometheus (bash scripts/setup.sh)")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "rmo-worker", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def query(client: httpx.AsyncClient, promql: str) -> list[dict]:
    """The result vector of an instant query (/api/v1/query); raises on a PromQL error."""
    r = await client.get("/api/v1/query", params={"query": promql})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


async def scalar_eventually(client: httpx.AsyncClient, promql: str, expected: float,
                            timeout_s: float = 20.0) -> float | None:
    """Poll until ``promql`` returns one sample equal to ``expected``; returns the last value."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        result = await query(client, promql)
        if len(result) == 1:
            last = float(result[0]["value"][1])
            if last == pytest.approx(expected):
                return last
        await asyncio.sleep(0.5)
    return last


async def metrics_port(settings, timeout_s: float = 30.0) -> int:
    """The port the worker announced in its heartbeat."""
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for hb in await liveness.live_workers(redis, Keys(settings.namespace)):
                if hb.metrics_port:
                    return hb.metrics_port
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    raise AssertionError("no worker announced a metrics port")


async def test_prometheus_scrapes_a_worker_and_answers_promql(settings, topics, tmp_path,
                                                              monkeypatch):
    # 0: any free port, so this test never collides with a worker already on 9700
    monkeypatch.setenv("RMO_METRICS_PORT", "0")
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("budgets:\n"
                       "  - {scope: global, period: total, limit_usd: 5.0, limit_tokens: 900000}\n")
    s = settings.model_copy(update={
        "providers_file": providers_file(tmp_path, "providers:\n" + sim("oracle", accuracy=1.0)),
        "budgets_file": budgets})
    ns = s.namespace
    tasks = humaneval_tasks(TASKS)
    with worker(s, tmp_path) as log:
        port = await metrics_port(s)
        assert f":{port}/metrics" in log.read_text()
        with prometheus_server(tmp_path, f"127.0.0.1:{port}") as url:
            await submit(s, topics, tasks)
            producer = AIOKafkaProducer(bootstrap_servers=s.require_kafka())
            await producer.start()
            await producer.send_and_wait(topics.name("tasks"), b"{not json", key=b"poison")
            await producer.stop()
            await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                # the example: tasks passed after N oracle tasks, through PromQL
                passed = await scalar_eventually(client, "max by (namespace) (rmo_tasks_completed_"
                                                 f'total{{namespace="{ns}",status="passed"}})', TASKS)
                assert passed == TASKS
                assert await scalar_eventually(
                    client, f'sum(rmo_task_latency_seconds_count{{namespace="{ns}"}})',
                    TASKS) == TASKS
                assert await scalar_eventually(
                    client, f'sum(rmo_dead_letters_total{{namespace="{ns}",reason="not_json"}})',
                    1) == 1
                assert await scalar_eventually(
                    client, f'max(rmo_provider_calls_total{{namespace="{ns}",provider="oracle"}})',
                    TASKS) == TASKS
                eps = qlearning.epsilon(TASKS, qconfig(s))
                assert await scalar_eventually(
                    client, f'max(rmo_qlearning_epsilon{{namespace="{ns}"}})', eps) == \
                    pytest.approx(eps)
                assert await scalar_eventually(
                    client, f'max(rmo_budget_limit_usd{{namespace="{ns}",scope="global"}})',
                    5.0) == 5.0
                # every dashboard query is valid PromQL for this server, and every metric it
                # uses is one this worker exported in a real scrape
                for q in dashboard_queries():
                    await query(client, q.replace("$namespace", ns)
                                .replace("$__rate_interval", "30s"))
                names = (await client.get("/api/v1/label/__name__/values")).json()["data"]
                assert dashboard_names() <= set(names), dashboard_names() - set(names)
