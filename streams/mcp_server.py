"""The MCP server (the official ``mcp`` SDK's MCPServer): ``rmo mcp [--http --host --port]``.

A thin front-end (SPEC §6): each tool calls one function of :mod:`streams.service` and returns
its result as structured content, with a JSON Schema for its input (from the type hints) and
its output. Tools: ``submit_task``, ``task_status``, ``task_lineage``, ``replay_verify``,
``metrics_summary``, ``list_providers``.

Transports: stdio (the default: an MCP host launches ``rmo mcp`` and speaks JSON-RPC on its
stdin/stdout, so nothing else may print to stdout; logs go to stderr), or streamable HTTP at
``/mcp`` (``--http``). Over HTTP the API's rules hold: a non-loopback host needs
``RMO_API_TOKEN`` (:func:`streams.api.check_bind`), and with the token set every request needs
``Authorization: Bearer <token>`` (compared in constant time).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field, SecretStr
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from models.events import TaskSubmitted
from models.jobs import JobSubmitted
from streams import jobs, service
from streams.config import Settings

INSTRUCTIONS = (
    "Fractal-RMO runs LLM tasks (kinds code, json, text) through analyzer, executor, validator "
    "and learning stages over Kafka. Submit with submit_task, then poll task_status until its "
    "status is final (passed, failed, rejected, unverified, dead_lettered, budget_exceeded); "
    "task_lineage shows every event of a task; replay_verify rebuilds the state from the log "
    "and compares it with the live state. A Cortex job (submit_job: subtasks with domains and "
    "dependencies, or a goal to plan, and a budget) runs through the same stages; poll "
    "job_status until its phase is done or awaiting_operator is true, answer list_escalations with resolve_escalation, "
    "read job_report.")


def create_server(settings: Settings) -> MCPServer:
    """The MCP server over ``settings`` (Kafka and Redis already resolved)."""
    mcp = MCPServer("fractal-rmo", instructions=INSTRUCTIONS)

    @mcp.tool()
    async def submit_task(task: TaskSubmitted) -> service.SubmittedTask:
        """Submit one task (a TaskSubmitted payload: task_id, kind code|json|text, prompt, and
        what its kind checks: code entry_point + test, json schema (+ expected), text expected /
        must_match / must_contain). Returns its task id and where the broker stored it."""
        try:
            event = service.task_event(task, "task", producer="mcp.submit")
        except service.TaskTooLarge as exc:
            raise ToolError(str(exc)) from None
        return (await service.submit_tasks(settings, [event]))[0]

    @mcp.tool()
    async def task_status(
        task_id: Annotated[str, Field(min_length=1, max_length=256)],
    ) -> service.TaskReport:
        """A task's status (pending, analyzed, executed, validated while running; passed,
        failed, rejected, unverified, dead_lettered, budget_exceeded when done; unknown if
        none of its events was projected yet) and why: providers called, answer, validation
        levels and the failed one, result, cost (USD), tokens, latency (ms)."""
        return await service.task_report(settings, task_id)

    @mcp.tool(structured_output=True)
    async def task_lineage(
        task_id: Annotated[str, Field(min_length=1, max_length=256)],
        payload: Annotated[bool, Field(description="include each event's payload")] = False,
    ) -> list[service.LineageNode]:
        """The causation tree of a task's events: type, producer, time, topic/partition/offset
        and (with payload) what each event said."""
        try:
            roots = await service.task_lineage(settings, task_id)
        except service.TaskNotFound as exc:
            raise ToolError(str(exc)) from None
        return [service.LineageNode.of(r, payload) for r in roots]

    @mcp.tool()
    async def replay_verify(
        from_offset: Annotated[int | None, Field(ge=0, description="start every partition at "
                                                 "this offset")] = None,
        from_time: Annotated[datetime | None, Field(description="skip events that occurred "
                                                    "before this time (RFC 3339)")] = None,
    ) -> service.ReplayResult:
        """Rebuild every projection from the log into a fresh namespace and compare it key by
        key with the live one: verified true when equal, else the differing keys."""
        if from_offset is not None and from_time is not None:
            raise ToolError("choose one of from_offset, from_time")
        return await service.replay(settings, from_offset=from_offset, from_time=from_time,
                                    verify=True)

    @mcp.tool()
    async def submit_job(job: JobSubmitted) -> jobs.SubmittedJob:
        """Submit a Cortex job: subtasks (task payloads with a domain and depends_on) or only
        a goal for the coordinator to plan, a token/USD budget and an emergency reserve.
        Poll job_status until its phase is done or awaiting_operator is true (open
        escalations: answer them with resolve_escalation)."""
        try:
            event = jobs.job_event(job, "job", producer="mcp.job")
        except jobs.InvalidJob as exc:
            raise ToolError(str(exc)) from None
        return await jobs.submit_job(settings, event)

    @mcp.tool()
    async def job_status(job_id: Annotated[str, Field(min_length=1, max_length=128)]) -> jobs.JobReport:
        """A job's phase (planning, running, done) and end status, its masters' budget lines
        (allocated, used, held), its subtasks and open escalations; awaiting_operator is true
        when nothing runs until an escalation is resolved."""
        try:
            return await jobs.job_status(settings, job_id)
        except jobs.JobNotFound as exc:
            raise ToolError(str(exc)) from None

    @mcp.tool(structured_output=True)
    async def list_jobs() -> list[jobs.JobLine]:
        """The namespace's jobs, newest first: phase, end status, subtasks accepted, tokens used."""
        return await jobs.list_jobs(settings)

    @mcp.tool()
    async def job_report(job_id: Annotated[str, Field(min_length=1, max_length=128)]) -> str:
        """The job's run report as Markdown: executive summary, each master's budget line
        (allocated, used, efficiency, reallocatable), the timeline, the artefacts."""
        from streams.job_report import build_job_report

        try:
            return (await build_job_report(settings, job_id)).markdown
        except jobs.JobNotFound as exc:
            raise ToolError(str(exc)) from None

    @mcp.tool(structured_output=True)
    async def list_escalations() -> list[jobs.Escalation]:
        """Open escalations: subtasks that failed after retries, or whose master's budget is
        exhausted with the reserve denied."""
        return await jobs.list_escalations(settings)

    @mcp.tool()
    async def resolve_escalation(
        escalation_id: Annotated[str, Field(min_length=1, max_length=200)],
        answer: Annotated[str | None, Field(description="the subtask's answer")] = None,
        skip: Annotated[bool, Field(description="skip the subtask and its dependents")] = False,
    ) -> jobs.ResolvedEscalation:
        """Answer an open escalation or skip it; the job goes on."""
        try:
            return await jobs.resolve_escalation(settings, escalation_id, answer=answer,
                                                 skip=skip, by="mcp")
        except (jobs.EscalationNotFound, ValueError) as exc:
            raise ToolError(str(exc)) from None

    @mcp.tool()
    async def metrics_summary() -> service.MetricsSummary:
        """Tasks per final status, pass rate, cost (USD), tokens, per-provider calls, failures,
        pass rate, latency and breaker state, the learned routing policy, live workers."""
        return await service.metrics_summary(settings)

    @mcp.tool(structured_output=True)
    async def list_providers() -> list[service.ProviderInfo]:
        """The configured LLM providers: id, kind, model, endpoint, price per million tokens."""
        return service.list_providers(settings.providers_file, seed=settings.seed)

    return mcp


def serve_stdio(settings: Settings) -> None:
    """Serve the tools over stdin/stdout until the client closes them."""
    create_server(settings).run("stdio")


class RequireBearer:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>`` (compared
    with :func:`hmac.compare_digest`), else 401; other scopes (lifespan) pass through."""

    def __init__(self, app: ASGIApp, token: SecretStr) -> None:
        self.app = app
        self._expected = token.get_secret_value().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     self._expected):
                response = JSONResponse(
                    {"detail": "a valid bearer token is required: Authorization: Bearer "
                               "<RMO_API_TOKEN>"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve_http(settings: Settings, host: str, port: int, token: SecretStr | None) -> None:
    """Serve the tools as streamable HTTP at ``http://host:port/mcp`` with uvicorn until
    SIGINT/SIGTERM.

    Raises:
        streams.api.InsecureBind: ``host`` is not loopback and there is no token.
    """
    import uvicorn

    from streams.api import check_bind

    check_bind(host, token)
    app: ASGIApp = create_server(settings).streamable_http_app(host=host)
    if token is not None:
        app = RequireBearer(app, token)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None,
                                  timeout_graceful_shutdown=5, server_header=False)).run()
