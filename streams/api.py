"""The HTTP API (FastAPI on uvicorn): ``rmo serve [--host H] [--port P]``.

A thin front-end (SPEC §6): every endpoint parses its input, calls one function of
:mod:`streams.service` and renders the result, so the API, the CLI and the MCP server cannot
disagree. OpenAPI at ``/openapi.json`` (docs at ``/docs``).

- **Auth.** With ``RMO_API_TOKEN`` set, every write (``POST``) needs ``Authorization: Bearer
  <token>``, compared in constant time (:func:`hmac.compare_digest`); reads are open. Without
  a token the server binds only a loopback host (:func:`check_bind`), and writes are open to
  local clients. The token is never logged or echoed.
- **Limits and errors.** A request body over :data:`MAX_BODY_BYTES` gets 413 (FastAPI's
  ``max_body_size``); bad input 422 whose ``detail[].loc`` names the field (FastAPI's
  validation; a task over the record limit too); an unknown task 404; an unreachable Kafka or
  Redis 503 naming it; ``GET /health`` answers 503 when the broker, Redis or every worker is
  down.
- **Task ids** may hold ``/`` (HumanEval's ``HumanEval/0``): ``GET /tasks/HumanEval/0`` works,
  with or without ``%2F``. An id ending in ``/lineage``, ``/events`` or ``/reexecute`` is
  read as that sub-resource of the shorter id.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from typing import Annotated, Any, TypeVar

from aiokafka.errors import KafkaError
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    model_validator,
)
from redis.exceptions import RedisError

from agents.breaker import Command
from agents.budget import BudgetUsage
from agents.providers.registry import ProviderConfigError
from agents.sandbox import SandboxUnavailable
from models.events import DeadLettered, TaskSubmitted
from models.jobs import JobSubmitted
from streams import jobs, service
from streams.client import MAX_OFFSET
from streams.config import Settings

log = logging.getLogger("rmo.api")

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted, in bytes (1 MiB): one task record may hold up to
:data:`models.codec.MAX_VALUE_BYTES` (1,000,000 bytes) plus its JSON framing."""

T = TypeVar("T")
TOKEN_VARIABLE = "RMO_API_TOKEN"
LOOPBACK_NAMES = ("localhost",)


class InsecureBind(ValueError):
    """A non-loopback host was asked for without an API token."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: SecretStr | None) -> None:
    """Refuse to serve writes to the network without a token.

    Raises:
        InsecureBind: ``host`` is not loopback and ``token`` is None or empty.
    """
    if not is_loopback(host) and not (token and token.get_secret_value()):
        raise InsecureBind(
            f"refusing to serve on {host} without {TOKEN_VARIABLE}: anyone who can reach it could "
            f"submit work; set {TOKEN_VARIABLE}=<a long random secret> (clients send "
            "Authorization: Bearer <it>), or serve on 127.0.0.1")


def token_from_env() -> SecretStr | None:
    """``RMO_API_TOKEN`` from the environment (unset or empty: None), wrapped so that no repr
    or log line shows it."""
    value = os.environ.get(TOKEN_VARIABLE, "")
    return SecretStr(value) if value else None


# --------------------------------------------------------------------------- models


class ErrorBody(BaseModel):
    """Any 4xx/5xx other than 422: what went wrong, one line."""

    detail: str


class SubmitResponse(BaseModel):
    """The tasks accepted (202), in request order, with where the broker stored them."""

    tasks: list[service.SubmittedTask]


class ReplayRequest(BaseModel):
    """``POST /replay``: rebuild every projection into a fresh namespace (named in the
    answer), optionally from an offset or a time, and with ``verify`` compare it with the live
    one. The target namespace is always a new one the service names: the API lets no client
    write into a namespace of its choosing."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        # what _one_start enforces, stated in the schema (null means absent)
        "not": {"required": ["from_offset", "from_time"],
                "properties": {"from_offset": {"type": "integer"},
                               "from_time": {"type": "string"}}}})

    # strict: a "5" or a 0 must not pass as an offset or a boolean the schema refuses
    # a Kafka offset is a signed 64-bit integer: a larger one cannot be sent (found by fuzzing)
    from_offset: StrictInt | None = Field(default=None, ge=0, le=MAX_OFFSET,
                                    description="start every partition at this offset")
    from_time: datetime | None = Field(
        default=None, description="skip events that occurred before this time (RFC 3339; "
                                  "without a zone: UTC)")
    verify: StrictBool = Field(default=False, description="compare with the live namespace key by key")

    @model_validator(mode="after")
    def _one_start(self) -> ReplayRequest:
        if self.from_offset is not None and self.from_time is not None:
            raise ValueError("choose one of from_offset, from_time")
        return self


class ReexecutionResponse(BaseModel):
    """A task re-run from its recorded provider calls: original and new outcome, calls
    replayed and new (0 when history answered every attempt), the new events (wire JSON)."""

    task_id: str
    original_passed: bool | None
    passed: bool
    same_outcome: bool
    replayed_calls: int
    new_provider_calls: int
    events: list[dict[str, Any]]


def _task_or_list(value: Any) -> str:
    return "list" if isinstance(value, list) else "task"


TasksBody = Annotated[
    Annotated[TaskSubmitted, Tag("task")]
    | Annotated[list[TaskSubmitted], Tag("list"), Field(min_length=1)],
    Discriminator(_task_or_list),
]
"""One task object, or a non-empty list of them (``rmo schema TaskSubmitted``)."""


def _untagged(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return loc[:1] + loc[2:] if loc[:1] == ("body",) and loc[1:2] in (("task",), ("list",)) else loc


TaskId = Annotated[str, Path(min_length=1, max_length=256, description="the task id")]

BEARER = HTTPBearer(auto_error=False, description=f"the server's {TOKEN_VARIABLE}")
"""Reads the ``Authorization: Bearer`` header (module level: endpoint annotations are
resolved from this module's names)."""

NOT_FOUND = {404: {"model": ErrorBody, "description": "no such task"}}
UNAVAILABLE = {503: {"model": ErrorBody, "description": "Kafka or Redis does not answer"}}
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (RedisError, KafkaError, TimeoutError,
                                                  ConnectionError)
"""What the service raises when Kafka or Redis stops answering: 503, never 500."""
WRITE = {400: {"model": ErrorBody, "description": "the body is not UTF-8"},
         401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
         # Starlette's body limit answers in plain text
         413: {"description": f"body over {MAX_BODY_BYTES:,} bytes",
               "content": {"text/plain": {"schema": {"type": "string"}}}}}


class DeadLetter(BaseModel):
    """One ``DeadLettered`` event: its id (what ``POST /deadletters/{id}/retry`` takes), when
    and by whom it was produced, and the payload (reason, error type, stage, source
    topic/partition/offset, original key and value in base64)."""

    event_id: str
    occurred_at: datetime
    producer: str
    payload: DeadLettered


class BreakerCommandRequest(BaseModel):
    """``POST /breakers/{provider}``: force the provider's breaker ``open`` (held until a
    ``close``), ``close`` it, or ``reset`` it (closed, counters and trips zeroed)."""

    model_config = ConfigDict(extra="forbid")

    command: Command
    reason: str = Field(default="", max_length=500, description="why, shown in rmo breaker list")
    operator: str = Field(default="", max_length=200, description="who")


class ResolveRequest(BaseModel):
    """``POST /escalations/{id}/resolve``: the subtask's ``answer``, or ``skip: true``."""

    model_config = ConfigDict(extra="forbid")

    answer: str | None = Field(default=None, description="the escalated subtask's accepted answer")
    skip: bool = Field(default=False, description="skip the subtask and what depends on it")
    by: str = Field(default="operator", max_length=200, description="who")


class Accepted(BaseModel):
    """A command event the broker acknowledged (202): its id and type; a consumer applies it."""

    event_id: str
    event_type: str


ProviderId = Annotated[str, Path(min_length=1, max_length=256, description="the provider id")]
Since = Annotated[str | None, Query(description="only events from this time on: RFC 3339 "
                                                "(2026-01-01T12:00:00Z) or an age (90s, 30m, 2h, 7d)")]


# --------------------------------------------------------------------------- app


async def _until_disconnected(items: AsyncGenerator[T, None], request: Request) -> AsyncIterator[T]:
    """``items`` until they end or the client goes away, then ``items`` is closed (a task's
    event stream holds one Kafka consumer per topic). Needed because under ASGI 2.4 Starlette's
    streaming response learns of a disconnect only from a failed write, and uvicorn drops
    writes to a closed connection silently: a stream waiting for a task that never comes would
    never end."""
    gone = asyncio.ensure_future(_disconnected(request))
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        gone.cancel()
        # cancel once, then shield: anyio cancels the task iterating this again and again
        # while it unwinds, and a second cancellation would interrupt ``items`` stopping its
        # consumers (their connections would stay open)
        if step is not None and not step.done():
            step.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await asyncio.shield(step)
        else:
            with suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.ensure_future(items.aclose()))


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings, token: SecretStr | None) -> FastAPI:
    """The API over ``settings`` (Kafka and Redis already resolved). ``token``: the bearer
    token writes need (None: writes are open; only for a loopback bind, see
    :func:`check_bind`)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # as a worker does: reads of a topic that does not exist would fail until a submit
        try:
            await service.create_topics(settings)
        except (*UNAVAILABLE_ERRORS, OSError) as exc:
            log.warning("could not create the topics (the first submit will): %s", exc)
        yield

    app = FastAPI(title="Fractal-RMO", version="1", max_body_size=MAX_BODY_BYTES, lifespan=lifespan,
                  description="Submit tasks, follow them, replay history, read metrics "
                              "(the operations of streams/service.py).")
    expected = token.get_secret_value().encode() if token else None

    async def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, f"a valid bearer token is required: Authorization: Bearer "
                                     f"<{TOKEN_VARIABLE}>", headers={"WWW-Authenticate": "Bearer"})

    write = [Depends(authorized)]

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # the messages name host and port, never a password
        what = "Redis" if isinstance(exc, RedisError) else "Kafka"
        log.warning("%s %s: %s unavailable: %s", request.method, request.url.path, what, exc)
        return JSONResponse({"detail": f"{what} does not answer: {type(exc).__name__}: {exc}"[:500]},
                            status_code=503)

    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, unavailable)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the one-task-or-list body is a tagged union, whose tag pydantic puts in every error
        # location: ["body", "list", 1, "kind"] is reported as ["body", 1, "kind"]
        errors = [{**e, "loc": _untagged(tuple(e["loc"]))} for e in exc.errors()]
        return await request_validation_exception_handler(
            request, RequestValidationError(errors, body=exc.body))

    @app.post("/tasks", status_code=202, dependencies=write, responses={**WRITE, **UNAVAILABLE})
    async def submit_tasks(body: Annotated[TasksBody, Body()]) -> SubmitResponse:
        """Submit one task or a list of them (each a ``TaskSubmitted`` payload); 202 with the
        task ids once the broker acknowledged every one. One invalid task submits nothing."""
        tasks = body if isinstance(body, list) else [body]
        events = []
        for i, task in enumerate(tasks):
            loc = ("body", i) if isinstance(body, list) else ("body",)
            try:
                events.append(service.task_event(task, f"body[{i}]", producer="api.submit"))
            except service.InvalidTask as exc:
                kind = "too_large" if isinstance(exc, service.TaskTooLarge) else "value_error"
                raise RequestValidationError([{"loc": loc, "msg": exc.problem,
                                               "type": kind}]) from None
        return SubmitResponse(tasks=await service.submit_tasks(settings, events))

    # sub-resources first: a task id may hold "/", and {task_id:path} would swallow them
    @app.get("/tasks/{task_id:path}/lineage", responses={**NOT_FOUND, **UNAVAILABLE})
    async def task_lineage(
        task_id: TaskId,
        payload: Annotated[bool, Query(description="include each event's payload")] = False,
    ) -> list[service.LineageNode]:
        """The causation tree of the task's events (type, producer, time, topic/partition/
        offset), read from every topic."""
        try:
            roots = await service.task_lineage(settings, task_id)
        except service.TaskNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return [service.LineageNode.of(r, payload) for r in roots]

    @app.get("/tasks/{task_id:path}/events", response_class=EventSourceResponse,
             responses={200: {"description": "one SSE event per task event: `event` its "
                                             "event_type, `id` its event_id, `data` JSON "
                                             "{topic, partition, offset, event}"}})
    async def task_events(task_id: TaskId, request: Request) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events of the task's events: those already logged, then each new one
        as it is produced; the stream ends after the task's TaskCompleted. A task not
        submitted yet is waited for."""
        async for te in _until_disconnected(service.task_events(settings, task_id), request):
            yield ServerSentEvent(data=te.to_dict(), event=te.event.event_type,
                                  id=te.event.event_id)

    @app.post("/tasks/{task_id:path}/reexecute", dependencies=write,
              responses={**WRITE, **NOT_FOUND, **UNAVAILABLE,
                         409: {"model": ErrorBody, "description": "a stage fails on the task"}})
    async def reexecute(task_id: TaskId) -> ReexecutionResponse:
        """Re-run the task through analyzer, executor and validator, answered from its
        recorded provider calls (no new call); the new events are returned, not published."""
        from streams.reexecute import NothingToReexecute

        try:
            result = await service.reexecute(settings, task_id)
        except NothingToReexecute as exc:
            raise HTTPException(404, str(exc)) from None
        except service.ReexecutionFailed as exc:
            raise HTTPException(409, str(exc)) from None
        except SandboxUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        return ReexecutionResponse.model_validate(result.to_dict())

    @app.get("/tasks/{task_id:path}", responses={**NOT_FOUND, **UNAVAILABLE})
    async def task_status(task_id: TaskId) -> service.TaskReport:
        """Status and why: providers called, answer, validation levels and the failed one,
        result, cost (USD), tokens, latency (ms). 404 until an event of the task has been
        projected."""
        report = await service.task_report(settings, task_id)
        if report.status == "unknown":
            raise HTTPException(404, f"no event of task {task_id!r} has been projected in "
                                     f"namespace {settings.namespace}")
        return report

    @app.get("/providers", responses={**UNAVAILABLE})
    async def providers() -> list[service.ProviderInfo]:
        """The configured providers: id, kind, model, endpoint, price per million tokens."""
        try:
            return service.list_providers(settings.providers_file, seed=settings.seed)
        except ProviderConfigError as exc:  # the file changed under a running server
            raise HTTPException(503, str(exc)) from None

    @app.get("/breakers", responses={**UNAVAILABLE})
    async def breakers() -> list[service.BreakerReport]:
        """Every provider's circuit breaker: state, what it admits now, trips, open deadline."""
        return await service.breaker_list(settings)

    @app.get("/budgets", responses={**UNAVAILABLE})
    async def budgets() -> list[BudgetUsage]:
        """Every budget line in its current period: limit, spent, reserved, remaining (USD,
        tokens)."""
        try:
            return await service.budget_report(settings)
        except (OSError, ValidationError) as exc:  # the file changed under a running server
            raise HTTPException(503, f"{settings.budgets_file}: {str(exc).splitlines()[0]}") from None

    @app.get("/metrics/summary", responses={**UNAVAILABLE})
    async def metrics_summary() -> service.MetricsSummary:
        """Tasks per status, pass rate, cost, per-provider figures, the learned policy, live
        workers."""
        return await service.metrics_summary(settings)

    @app.post("/replay", dependencies=write, responses={
        **WRITE, **UNAVAILABLE, 409: {"model": ErrorBody, "description": "the target is taken"}})
    async def replay(body: Annotated[ReplayRequest | None, Body()] = None) -> service.ReplayResult:
        """Rebuild every projection from the log into a fresh namespace (kept, named in the
        answer); with ``verify``, ``verified`` and the differing keys. No body: from the
        beginning, without verify."""
        from streams.replay import ReplayTargetError

        body = body or ReplayRequest()
        try:
            return await service.replay(settings, from_offset=body.from_offset,
                                        from_time=body.from_time, verify=body.verify)
        except ReplayTargetError as exc:  # two replays drew the same name: try again
            raise HTTPException(409, str(exc)) from None
        except ProviderConfigError as exc:  # the file changed under a running server
            raise HTTPException(503, str(exc)) from None

    @app.post("/breakers/{provider}", status_code=202, dependencies=write, responses={
        **WRITE, **UNAVAILABLE, 404: {"model": ErrorBody, "description": "no such provider"}})
    async def breaker_command(provider: ProviderId, body: BreakerCommandRequest) -> Accepted:
        """Produce a ``BreakerCommand`` for the provider (202 once the broker acknowledged it);
        the executor applies it in order with the provider's calls (``GET /breakers`` shows
        the new state once it has)."""
        try:
            event = await service.breaker_command(settings, provider, body.command,
                                                  reason=body.reason, operator=body.operator)
        except service.UnknownProvider as exc:
            raise HTTPException(404, str(exc)) from None
        except ProviderConfigError as exc:  # the file changed under a running server
            raise HTTPException(503, str(exc)) from None
        return Accepted(event_id=event.event_id, event_type=event.event_type)

    @app.get("/deadletters", responses={**UNAVAILABLE})
    async def dead_letters() -> list[DeadLetter]:
        """Every dead letter, in log order: why a record could not be processed, and its
        original bytes."""
        return [DeadLetter(event_id=e.event_id, occurred_at=e.occurred_at, producer=e.producer,
                           payload=e.payload) for e in await service.dead_letters(settings)]

    @app.post("/deadletters/{event_id}/retry", dependencies=write, responses={
        **WRITE, **UNAVAILABLE, 404: {"model": ErrorBody, "description": "no such dead letter"}})
    async def retry_dead_letter(
        event_id: Annotated[str, Path(min_length=1, max_length=256,
                                      description="the dead letter's event id")],
    ) -> service.Resubmitted:
        """Produce the dead letter's record to its source topic again (after fixing what made
        it fail): an event a stage raised on as a copy with an id of its own (``event_id``),
        other bytes unchanged; where the broker stored it."""
        try:
            return await service.retry_dead_letter(settings, event_id)
        except service.DeadLetterNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/jobs", status_code=202, dependencies=write, responses={**WRITE, **UNAVAILABLE})
    async def submit_job(body: Annotated[JobSubmitted, Body()]) -> jobs.SubmittedJob:
        """Submit a Cortex job (a ``JobSubmitted``: subtasks with domains and dependencies, or
        a goal to plan; budget and reserve); 202 once the broker acknowledged it."""
        try:
            event = jobs.job_event(body, "body", producer="api.job")
        except jobs.InvalidJob as exc:
            raise RequestValidationError([{"loc": ("body",), "msg": exc.problem,
                                           "type": "value_error"}]) from None
        return await jobs.submit_job(settings, event)

    @app.get("/jobs", responses={**UNAVAILABLE})
    async def list_jobs(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[jobs.JobLine]:
        """The namespace's jobs, newest first: phase, status, subtasks accepted, tokens used."""
        return await jobs.list_jobs(settings, limit)

    @app.get("/jobs/{job_id}/report", response_model=None, responses={
        200: {"description": "the job's report", "content": {"text/html": {"schema": {"type": "string"}}}},
        **NOT_FOUND, **UNAVAILABLE})
    async def job_report(job_id: Annotated[str, Path(min_length=1, max_length=128)]) -> HTMLResponse:
        """The job's run report (executive summary, masters, budget flow, timeline) as one
        self-contained HTML page."""
        from streams.job_report import build_job_report

        try:
            return HTMLResponse((await build_job_report(settings, job_id)).page)
        except jobs.JobNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/jobs/{job_id}", responses={**NOT_FOUND, **UNAVAILABLE})
    async def job_status(job_id: Annotated[str, Path(min_length=1, max_length=128)]) -> jobs.JobReport:
        """A job's phase and end status, its masters' budget lines (allocated, used, held,
        reserve granted; tokens and USD), its subtasks and open escalations."""
        try:
            return await jobs.job_status(settings, job_id)
        except jobs.JobNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/escalations", responses={**UNAVAILABLE})
    async def escalations() -> list[jobs.Escalation]:
        """Open escalations: failed subtasks and exhausted budgets waiting for a person."""
        return await jobs.list_escalations(settings)

    @app.post("/escalations/{escalation_id:path}/resolve", status_code=202, dependencies=write,
              responses={**WRITE, **UNAVAILABLE,
                         404: {"model": ErrorBody, "description": "no such open escalation"}})
    async def resolve_escalation(escalation_id: Annotated[str, Path(min_length=1, max_length=200)],
                                 body: ResolveRequest) -> jobs.ResolvedEscalation:
        """Give the escalated subtask its ``answer``, or ``skip`` it; the job goes on."""
        if (body.answer is None) == (not body.skip):
            raise RequestValidationError([{"loc": ("body",), "msg": "give answer or skip: true",
                                           "type": "value_error"}])
        try:
            return await jobs.resolve_escalation(settings, escalation_id, answer=body.answer,
                                                 skip=body.skip, by=body.by)
        except jobs.EscalationNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/report", response_model=None, responses={
        200: {"description": "the report", "content": {"text/html": {"schema": {"type": "string"}}}},
        **UNAVAILABLE, 400: {"model": ErrorBody, "description": "since is not a time or an age"}})
    async def report(since: Since = None) -> HTMLResponse:
        """The self-contained HTML report of the log (what ``rmo report`` writes): summary,
        providers, learning, breakers, budgets, stage latencies, dead letters, stalls."""
        from streams.report import parse_since

        try:
            start = parse_since(since) if since is not None else None
        except ValueError as exc:
            raise HTTPException(400, f"since: {exc}") from None
        try:
            built = await service.report(settings, since=start)
        except LookupError as exc:  # a topic is missing: nothing was submitted yet
            raise HTTPException(503, str(exc)) from None
        except (OSError, ValueError) as exc:  # the budgets file changed under a running server
            raise HTTPException(503, f"{settings.budgets_file}: {str(exc).splitlines()[0]}") from None
        return HTMLResponse(built.page)

    @app.get("/health", responses={503: {"model": service.Health,
                                         "description": "a dependency or every worker is down"}})
    async def health(response: Response) -> service.Health:
        """Broker, Redis and live workers; 503 (same body) when one of them is down."""
        h = await service.health(settings)
        if not h.ok:
            response.status_code = 503
        return h

    return app


def serve(settings: Settings, host: str, port: int, token: SecretStr | None) -> None:
    """Run the API with uvicorn until SIGINT/SIGTERM (open event streams get 5 s to end).
    Logs go through the ``logging`` configuration of the process (``uvicorn.*`` loggers).

    Raises:
        InsecureBind: see :func:`check_bind`.
    """
    import uvicorn

    check_bind(host, token)
    config = uvicorn.Config(create_app(settings, token), host=host, port=port, log_config=None,
                            timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run()
