"""The `openai` and `anthropic` kinds end to end: `rmo demo` and `rmo providers check` against a
local server that speaks both protocols (tests/fakes/llm_server.py), run as its own process
like a real endpoint. The issue's "done means": all 164 HumanEval tasks complete, the cost is
the server's usage times genai-prices' prices, and with the openai endpoint down every task
still passes through fallback, with a breaker trip."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
from genai_prices import Usage, calc_price

from streams.client import read_topic
from streams.config import Settings
from streams.embedded import free_port
from streams.topics import load_topics
from tests.integration.helpers import cli_env, llm_server_process, rmo

pytestmark = pytest.mark.integration

KEY = "sk-fake-0123456789abcdef"
KEYS = {"FAKE_OPENAI_KEY": KEY, "FAKE_ANTHROPIC_KEY": KEY}


@pytest.fixture(scope="module")
def llm_server() -> Iterator[str]:
    """URL of a fake LLM server process (both protocols), stopped by pid afterwards."""
    with llm_server_process(KEY) as url:
        yield url


def providers_yaml(tmp_path: Path, openai_base: str, anthropic_base: str,
                   openai_key_env: str = "FAKE_OPENAI_KEY") -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(f"""providers:
  - id: gpt
    kind: openai
    model: gpt-4o-mini
    base_url: {openai_base}
    api_key_env: {openai_key_env}
    timeout_s: 10
  - id: claude
    kind: anthropic
    model: claude-3-5-haiku-latest
    base_url: {anthropic_base}
    api_key_env: FAKE_ANTHROPIC_KEY
    timeout_s: 10
""")
    return path


def server_requests(url: str) -> list[dict]:
    return httpx.get(f"{url}/_requests").json()


async def raw_values(settings: Settings, topic: str) -> list[bytes]:
    return [r.value or b"" async for r in read_topic(settings.require_kafka(), topic)]


def demo(settings: Settings, tmp_path: Path, providers: Path, **extra: str) -> dict:
    env = cli_env(settings, RMO_STATE_DIR=str(tmp_path / "state"), **KEYS, **extra)
    result = rmo("demo", "--json", "--providers", str(providers), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return orjson.loads(result.stdout)


def test_demo_with_openai_and_anthropic_costs_what_the_server_reported(llm_server: str,
                                                                       settings: Settings,
                                                                       tmp_path: Path) -> None:
    httpx.post(f"{llm_server}/_reset")
    summary = demo(settings, tmp_path, providers_yaml(tmp_path, f"{llm_server}/v1", llm_server))
    assert summary["completed"] == 164 and summary["dead_lettered"] == 0
    assert summary["passed"] == 164, summary
    answered = [r for r in server_requests(llm_server) if "response" in r]
    assert {r["protocol"] for r in answered} == {"openai", "anthropic"}
    assert all(r["auth_ok"] for r in answered)
    expected = Decimal(0)
    for r in answered:
        usage = r["response"]["usage"]
        tokens_in = usage.get("prompt_tokens", usage.get("input_tokens"))
        tokens_out = usage.get("completion_tokens", usage.get("output_tokens"))
        expected += calc_price(Usage(input_tokens=tokens_in, output_tokens=tokens_out),
                               model_ref=r["response"]["model"]).total_price
    assert summary["cost_usd"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert sum(p["calls"] for p in summary["providers"].values()) == len(answered)
    # the key reached the server and nowhere else: no event on any topic, no worker log line
    registry = load_topics(settings.namespace)
    for role in registry.specs:
        values = asyncio.run(raw_values(settings, registry.name(role)))
        assert not [v for v in values if KEY.encode() in v], role
    logs = list((tmp_path / "state").glob("*.log"))
    assert logs and all(KEY not in p.read_text(errors="replace") for p in logs)


def test_demo_with_the_openai_endpoint_down_passes_every_task_through_fallback(
        llm_server: str, settings: Settings, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    summary = demo(settings, tmp_path, providers_yaml(tmp_path, closed, llm_server))
    assert summary["completed"] == 164
    assert summary["passed"] == 164, summary
    gpt, claude = summary["providers"]["gpt"], summary["providers"]["claude"]
    assert gpt["failures"] == gpt["calls"] > 0 and gpt["tasks_chosen"] == 0 or gpt["pass_rate"] == 0
    assert claude["tasks_chosen"] == 164 - summary["dead_lettered"]
    assert gpt["breaker_trips"] >= 1


def test_providers_check_reports_both_healthy_and_names_the_fix_for_a_wrong_key(
        llm_server: str, tmp_path: Path) -> None:
    good = providers_yaml(tmp_path, f"{llm_server}/v1", llm_server)
    ok = rmo("providers", "check", "--providers", str(good), "--json",
             env=cli_env(**KEYS), timeout=60)
    assert ok.returncode == 0, ok.stderr
    checks = orjson.loads(ok.stdout)
    assert [(c["provider"]["id"], c["ok"], c["reachable"], c["auth_ok"]) for c in checks] == [
        ("gpt", True, True, True), ("claude", True, True, True)]

    wrong = rmo("providers", "check", "--providers", str(good),
                env=cli_env(FAKE_OPENAI_KEY="sk-wrong-key-999", FAKE_ANTHROPIC_KEY=KEY), timeout=60)
    assert wrong.returncode == 1
    assert "gpt          FAILED   reachable, auth FAILED" in wrong.stdout
    assert "FAKE_OPENAI_KEY" in wrong.stdout and "fix: set the environment variable" in wrong.stdout
    assert "sk-wrong-key-999" not in wrong.stdout + wrong.stderr
    assert "claude       ok" in wrong.stdout

    listed = rmo("providers", "list", "--providers", str(good), "--json", env=cli_env(**KEYS))
    infos = {i["id"]: i for i in orjson.loads(listed.stdout)}
    assert infos["gpt"]["endpoint"].rstrip("/") == f"{llm_server}/v1" and infos["gpt"]["priced"]
    assert infos["gpt"]["input_usd_per_mtok"] == pytest.approx(0.15)


def test_a_missing_key_variable_is_one_line_naming_it(llm_server: str, tmp_path: Path) -> None:
    path = providers_yaml(tmp_path, f"{llm_server}/v1", llm_server, openai_key_env="NO_SUCH_KEY_VAR")
    env = {k: v for k, v in cli_env(**KEYS).items() if k != "NO_SUCH_KEY_VAR"}
    for args in (("providers", "check"), ("demo", "--limit", "1")):
        result = rmo(*args, "--providers", str(path), env=env, timeout=60)
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "NO_SUCH_KEY_VAR is not set" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    assert os.environ.get("NO_SUCH_KEY_VAR") is None
