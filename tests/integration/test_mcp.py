"""The MCP server (streams/mcp_server.py) end to end with the SDK's own client: over stdio the
client launches `rmo mcp` against a running worker, lists the tools and their input schemas,
submits a task and polls task_status until it completed; over streamable HTTP (`--http`) the
bearer token is required."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from redis.asyncio import Redis

from streams.config import Settings
from streams.demo import humaneval_tasks, stop_worker
from streams.pipeline import wait_caught_up
from tests.integration.helpers import cli_env, providers_file, rmo_command, sim, worker

pytestmark = pytest.mark.integration

TOOLS = {"submit_task", "task_status", "task_lineage", "replay_verify", "metrics_summary",
         "list_providers", "submit_job", "job_status", "list_escalations", "resolve_escalation", "list_jobs",
         "job_report"}
FINAL = {"passed", "failed", "rejected", "unverified", "dead_lettered", "budget_exceeded"}


def check_input_schemas(tools: dict) -> None:
    """The tools' JSON-Schema'd inputs, as an MCP host sees them."""
    submit = tools["submit_task"].input_schema
    assert submit["required"] == ["task"]
    task = submit["$defs"]["TaskSubmitted"]
    assert {"task_id", "kind", "prompt"} <= set(task["required"])
    assert task["properties"]["kind"]["enum"] == ["code", "json", "text"]
    assert task["properties"]["priority"]["maximum"] == 10 and task["additionalProperties"] is False
    status = tools["task_status"].input_schema
    assert status["required"] == ["task_id"]
    assert (status["properties"]["task_id"]["minLength"], status["properties"]["task_id"]["maxLength"]) == (1, 256)
    lineage = tools["task_lineage"].input_schema
    assert lineage["properties"]["payload"] == {
        "default": False, "description": "include each event's payload", "title": "Payload",
        "type": "boolean"}
    replay = tools["replay_verify"].input_schema
    assert {"minimum": 0, "type": "integer"} in replay["properties"]["from_offset"]["anyOf"]
    assert {"format": "date-time", "type": "string"} in replay["properties"]["from_time"]["anyOf"]
    assert "required" not in replay
    assert tools["metrics_summary"].input_schema["properties"] == {}
    assert tools["list_providers"].input_schema["properties"] == {}
    # structured results have schemas too
    assert "status" in tools["task_status"].output_schema["properties"]
    assert "verified" in tools["replay_verify"].output_schema["properties"]


async def test_stdio_submit_and_poll_until_completed(settings: Settings, topics,
                                                     tmp_path: Path) -> None:
    s = settings.model_copy(update={"providers_file": providers_file(tmp_path,
                                                                     "providers:\n" + sim("solid"))})
    task = humaneval_tasks(1)[0].model_dump(mode="json", by_alias=True, exclude_none=True)
    command, *prefix = rmo_command()
    params = StdioServerParameters(command=command, env=cli_env(s),
                                   args=[*prefix, "mcp", "--providers", str(s.providers_file)])
    with worker(s, tmp_path):
        # the server's stderr (its logs) goes to this test's captured stderr
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == TOOLS
            check_input_schemas(tools)

            submitted = await session.call_tool("submit_task", {"task": task})
            assert not submitted.is_error, submitted.content
            assert submitted.structured_content["task_id"] == "HumanEval/0"
            assert submitted.structured_content["topic"] == topics.name("tasks")

            deadline = time.monotonic() + 120
            while True:
                status = await session.call_tool("task_status", {"task_id": "HumanEval/0"})
                assert not status.is_error, status.content
                report = status.structured_content
                if report["status"] in FINAL:
                    break
                assert time.monotonic() < deadline, report
                await asyncio.sleep(0.5)
            assert report["status"] == "passed" and report["provider"] == "solid"
            assert report["cost_usd"] > 0 and report["latency_ms"] > 0

            lineage = await session.call_tool("task_lineage", {"task_id": "HumanEval/0"})
            (root,) = lineage.structured_content["result"]
            assert (root["event_type"], root["producer"], root["payload"]) == (
                "TaskSubmitted", "mcp.submit", None)
            providers = await session.call_tool("list_providers", {})
            assert [p["id"] for p in providers.structured_content["result"]] == ["solid"]
            summary = (await session.call_tool("metrics_summary", {})).structured_content
            assert summary["tasks"] == {"passed": 1} and summary["workers"] == 1

            redis = Redis.from_url(s.require_redis(), decode_responses=True)
            try:
                assert await wait_caught_up(s, topics, redis)
            finally:
                await redis.aclose()
            replay = (await session.call_tool("replay_verify", {})).structured_content
            assert replay["verified"] is True and replay["differences"] == []
            assert replay["target_namespace"].startswith(f"{s.namespace}-replay-")

            # mistakes come back as tool errors naming what is wrong
            bad = await session.call_tool("submit_task", {"task": {**task, "kind": "sql"}})
            assert bad.is_error and "kind" in bad.content[0].text
            unknown = await session.call_tool("task_lineage", {"task_id": "no-such-task"})
            assert unknown.is_error and "no-such-task" in unknown.content[0].text
            both = await session.call_tool("replay_verify", {"from_offset": 0,
                                                             "from_time": "2026-01-01T00:00:00Z"})
            assert both.is_error and "choose one" in both.content[0].text
    await _delete(s, f"{s.namespace}-replay-*")


async def _delete(s: Settings, pattern: str) -> None:
    redis = Redis.from_url(s.require_redis())
    try:
        async for key in redis.scan_iter(pattern, count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mcp_http(env: dict[str, str], log: Path) -> Iterator[str]:
    """`rmo mcp --http --port P` in its own process group until it answers; yields its URL;
    SIGTERM (then SIGKILL) to that group on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([*rmo_command(), "mcp", "--http", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        stop_worker(proc)  # SIGTERM to its process group, SIGKILL after 20 s


async def test_streamable_http_needs_the_token(settings: Settings, topics, tmp_path: Path) -> None:
    token = "mcp-" + os.urandom(8).hex()
    log = tmp_path / "mcp-http.log"
    with mcp_http(cli_env(settings, RMO_API_TOKEN=token), log) as url:
        async with httpx.AsyncClient(timeout=10) as plain:
            refused = await plain.post(url, json={})
            wrong = await plain.post(url, json={}, headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert wrong.status_code == 401
        client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        async with client, streamable_http_client(url, http_client=client) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            assert {t.name for t in (await session.list_tools()).tools} == TOOLS
            providers = await session.call_tool("list_providers", {})
            assert not providers.is_error and providers.structured_content["result"]
    assert token not in log.read_text()
