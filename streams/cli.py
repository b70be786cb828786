"""`rmo`: the command line of Fractal-RMO (typer).

Every command resolves its services the same way (:mod:`streams.locate`): a set
``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` is used as is and must answer; unset, what ``rmo up``
recorded, else (Redis) the local one on :6379, else an embedded service for that command.
Commands that start a worker create the topics first.

Errors are one line on stderr (exit 2 for a mistake the user can fix, 1 otherwise); ``--debug``
anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import asyncio
import gc
import getpass
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from redis.asyncio import Redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agents.providers.registry import ProviderConfigError
from agents.sandbox import SandboxUnavailable
from models.codec import json_schemas
from models.events import Envelope, MetricsSnapshot, TaskSubmitted
from streams import locate, logs, service
from streams.cli_common import fail, services
from streams.cli_jobs import escalations_app, job_app
from streams.client import MAX_OFFSET
from streams.config import Settings
from streams.embedded import EmbeddedServiceError
from streams.prometheus import MetricsPortUnavailable
from streams.topics import load_topics

app = typer.Typer(help="Fractal-RMO: event-sourced multi-agent LLM orchestration over Kafka and Redis.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Topics of topics.yaml.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
providers_app = typer.Typer(help="The configured LLM providers.", no_args_is_help=True)
app.add_typer(providers_app, name="providers")
breaker_app = typer.Typer(help="The providers' circuit breakers (agents/breaker.py).", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")
rules_app = typer.Typer(help="Error patterns and the protocol rules they propose (agents/rules.py).")
app.add_typer(rules_app, name="rules")
app.add_typer(job_app, name="job")
app.add_typer(escalations_app, name="escalations")

log = logging.getLogger("rmo.cli")


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.require_redis(), decode_responses=True)


def _registry(settings: Settings):
    return load_topics(settings.namespace, settings.topics_file)


# --------------------------------------------------------------------------- contract


@app.command()
def schema(event_type: Annotated[str | None, typer.Argument(help="One event type; all when omitted.")] = None) -> None:
    """Print the JSON Schema of every event type (the wire contract, SPEC §3)."""
    schemas = json_schemas()
    if event_type:
        if event_type not in schemas:
            raise fail(f"unknown event type {event_type!r}; known: {', '.join(schemas)}")
        schemas = {event_type: schemas[event_type]}
    typer.echo(json.dumps(schemas, indent=2))


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic of topics.yaml that does not exist yet (idempotent)."""
    with services() as s:
        created = asyncio.run(_prepare(s))
        typer.echo(f"created {len(created)} topic(s)" + (f": {', '.join(created)}" if created else ""))


async def _prepare(s: Settings) -> list[str]:
    from streams.pipeline import prepare_log

    redis = redis_client(s)
    try:
        return await prepare_log(s, _registry(s), redis)
    finally:
        await redis.aclose()


@topics_app.command("list")
def topics_list() -> None:
    """Print role, name and partitions of every topic for this namespace."""
    for spec in _registry(Settings()):
        typer.echo(f"{spec.role:12} {spec.name:32} partitions={spec.partitions} events={','.join(spec.events)}")


# --------------------------------------------------------------------------- providers

ProvidersOption = Annotated[Path | None, typer.Option(
    "--providers", help="Providers YAML file (default: RMO_PROVIDERS_FILE, else the sim profiles).")]


def _providers_file(path: Path | None) -> Path | None:
    path = path or Settings().providers_file
    if path is not None and not path.exists():
        raise fail(f"{path} does not exist; pass a providers YAML file")
    return path


BudgetsOption = Annotated[Path | None, typer.Option(
    "--budgets", help="Budgets YAML file (default: RMO_BUDGETS_FILE, else no budget).")]


def _budgets_file(path: Path | None) -> Path | None:
    """``path``, checked to exist and parse, so a typo fails here and not in a worker."""
    if path is None:
        return None
    from pydantic import ValidationError

    from agents.budget import load_budgets

    if not path.exists():
        raise fail(f"{path} does not exist; pass a budgets YAML file")
    try:
        load_budgets(path)
    except ValidationError as exc:  # one line per problem is a screenful: join them
        raise fail(f"{path}: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    except (ValueError, OSError) as exc:
        raise fail(f"{path}: {exc}") from None
    return path


def _price(info: service.ProviderInfo) -> str:
    if not info.priced:
        return "unpriced (calls cost 0)"
    return f"${info.input_usd_per_mtok:g} in / ${info.output_usd_per_mtok:g} out per Mtok"


@providers_app.command("list")
def providers_list(providers: ProvidersOption = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Id, kind, model, endpoint and price per million tokens of every provider."""
    infos = service.list_providers(_providers_file(providers))
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos]))
        return
    for i in infos:
        typer.echo(f"{i.id:12} {i.kind:10} {i.model:28} {i.endpoint or '-':36} {_price(i)}")


@providers_app.command("check")
def providers_check(
    providers: ProvidersOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds each call may take.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One tiny call per provider: reachable, auth ok, latency, answer, or the fix for what
    failed. Exit 1 when any provider failed."""
    checks = asyncio.run(service.check_providers(_providers_file(providers), timeout_s=timeout))
    if as_json:
        typer.echo(json.dumps([c.to_dict() for c in checks]))
    for c in checks if not as_json else ():
        p = c.provider
        if c.ok:
            typer.echo(f"{p.id:12} ok       reachable, auth ok, {c.latency_ms:.0f} ms, answer {c.answer!r}")
        else:
            reach = "reachable" if c.reachable else "unreachable"
            auth = {True: "auth ok", False: "auth FAILED", None: "auth unknown"}[c.auth_ok]
            typer.echo(f"{p.id:12} FAILED   {reach}, {auth}, {c.latency_ms:.0f} ms: "
                       f"{c.error_type}: {c.message}")
            typer.echo(f"{'':12} fix: {c.fix}")
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


# --------------------------------------------------------------------------- breakers


def _until(r: service.BreakerReport) -> str:
    if r.open_until is None:
        return "-"
    return "until closed" if r.hold in ("auth", "manual") else f"until {r.open_until:%Y-%m-%d %H:%M:%S}Z"


@breaker_app.command("list")
def breaker_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every provider's breaker: state, what it admits now, reason, trips, open deadline."""
    with services() as s:
        try:
            reports = asyncio.run(service.breaker_list(s))
        except (ValueError, OSError) as exc:
            raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reports]))
        return
    for r in reports:
        typer.echo(f"{r.provider:12} {r.state:9} {r.admits:6} trips={r.trips:<3} {_until(r):28} {r.reason}")


def _breaker_command(command: str, provider: str, reason: str, operator: str | None,
                     providers: Path | None) -> None:
    with services() as s:
        if providers is not None:
            s = s.model_copy(update={"providers_file": _providers_file(providers)})
        try:
            event = asyncio.run(service.breaker_command(
                s, provider, command, reason, operator or getpass.getuser()))  # type: ignore[arg-type]
        except (service.UnknownProvider, ProviderConfigError, ValueError, OSError) as exc:
            raise fail(str(exc)) from None
    typer.echo(f"{command} {provider}: BreakerCommand {event.event_id} produced")


ReasonOption = Annotated[str, typer.Option(help="Why, recorded in the event.")]
OperatorOption = Annotated[str | None, typer.Option(help="Who (default: the login name).")]


@breaker_app.command("open")
def breaker_open(provider: str, reason: ReasonOption = "", operator: OperatorOption = None,
                 providers: ProvidersOption = None) -> None:
    """Hold PROVIDER's breaker open until a close or reset (an event on the calls topic)."""
    _breaker_command("open", provider, reason, operator, providers)


@breaker_app.command("close")
def breaker_close(provider: str, reason: ReasonOption = "", operator: OperatorOption = None,
                  providers: ProvidersOption = None) -> None:
    """Close PROVIDER's breaker, keeping its trip count (the backoff of a next trip)."""
    _breaker_command("close", provider, reason, operator, providers)


@breaker_app.command("reset")
def breaker_reset(provider: str, reason: ReasonOption = "", operator: OperatorOption = None,
                  providers: ProvidersOption = None) -> None:
    """Close PROVIDER's breaker and forget its window and trip count."""
    _breaker_command("reset", provider, reason, operator, providers)


# --------------------------------------------------------------------------- rules


@rules_app.callback(invoke_without_command=True)
def rules_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List error patterns (key, occurrences, confidence, first/last seen) and protocol rules
    (id, kind, params, state, and each stage's reason and evidence)."""
    if ctx.invoked_subcommand is not None:
        return
    with services() as s:
        try:
            report = asyncio.run(service.rules_report(s))
        except (ValueError, OSError) as exc:
            raise fail(str(exc)) from None
    typer.echo(json.dumps(report.to_dict()) if as_json else "\n".join(report.render()))


@rules_app.command("demo")
def rules_demo(
    seed: Annotated[int, typer.Option(help="Seed of sim providers and exploration.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
) -> None:
    """HumanEval twice through a worker whose gemini fails every string task with a syntax
    error: the pattern, the rule it proposes and its evidence, and the string tasks' failure
    rate before and after the rule applied (a fresh namespace; services kept, like `rmo demo`)."""
    from streams.rules_demo import run_rules_demo

    raise typer.Exit(run_rules_demo(seed=seed, as_json=as_json, timeout_s=timeout))


# --------------------------------------------------------------------------- services


@app.command()
def up() -> None:
    """Start an embedded Kafka (Tansu) and Redis in the background and record them in the
    state directory ($RMO_STATE_DIR, default .rmo/ in this checkout), so later `rmo` commands
    from it use them. A second `rmo up` reuses what answers; a service whose variable
    (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL) is set is not started. `rmo down` stops them."""
    s = Settings()
    wanted = [name for name, value in (("kafka", s.kafka_bootstrap_servers), ("redis", s.redis_url))
              if not value]
    for name in set(locate.VARIABLES) - set(wanted):
        typer.echo(f"{locate.VARIABLES[name]} is set: not starting an embedded {name}")
    running, started = locate.bring_up(*wanted)
    for h in running.values():
        how = "started" if h in started else "already running"
        typer.echo(f"{locate.VARIABLES[h.name]}={h.address}  ({how}, pid {h.pid}, log {h.log_path})")
    typer.echo(f"state: {locate.state_file()}")


@app.command()
def down() -> None:
    """Stop what `rmo up` (or `rmo demo`) started from this state directory, and nothing
    else: a recorded pid is signalled only while it is still the process that was started."""
    results = locate.bring_down()
    for r in results:
        h = r.handle
        if r.stopped:
            typer.echo(f"stopped {h.name} at {h.address} (pid {h.pid})")
        else:
            typer.echo(f"{h.name} (pid {h.pid}) was no longer running; record removed")
    if not results:
        typer.echo(f"nothing recorded in {locate.state_file()}")


@app.command()
def worker(
    providers: Annotated[Path | None, typer.Option(help="Providers YAML file.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of sim providers and exploration.")] = None,
    loglevel: Annotated[str, typer.Option(help="crit, error, warn, info or debug.")] = "warn",
    budgets: BudgetsOption = None,
) -> None:
    """Run the four stages (analyzer, executor, validator, learning) as a Faust worker."""
    from streams.worker import run_worker

    update = {k: v for k, v in (("providers_file", providers), ("seed", seed),
                                ("budgets_file", _budgets_file(budgets))) if v is not None}
    with services(Settings().model_copy(update=update)) as s:
        run_worker(s, loglevel)


# --------------------------------------------------------------------------- producing


def task_line_error(where: str, problem: str) -> typer.Exit:
    """The one-line error for a bad task line, with what a line must hold."""
    required = ", ".join(n for n, f in TaskSubmitted.model_fields.items() if f.is_required())
    return fail(f"{where}: {problem}; each line is one JSON object with {required} "
                "(code: entry_point, test; json: schema, expected; text: expected, must_match, "
                "must_contain; see `rmo schema TaskSubmitted`)")


def _parse_tasks(lines: Iterator[str], source: str) -> list[Envelope]:
    """:func:`streams.service.parse_tasks`, its errors as one line each (exit 2): a bad line
    with what a line must hold, an oversized one with the record limit."""
    try:
        return service.parse_tasks(lines, source)
    except service.TaskTooLarge as exc:
        raise fail(str(exc)) from None
    except service.InvalidTask as exc:
        raise task_line_error(exc.where, exc.problem) from None


@app.command()
def submit(file: Annotated[str, typer.Argument(help="JSONL file of tasks, or - for stdin.")]) -> None:
    """Produce one TaskSubmitted per JSONL line to the tasks topic; prints the task ids.
    Every line is checked first: one bad line submits nothing."""
    if file == "-":
        events = _parse_tasks(iter(sys.stdin), "stdin")
    else:
        path = Path(file)
        if not path.exists():
            raise fail(f"{file} does not exist; give a JSONL file or - for stdin")
        events = _parse_tasks(iter(path.read_text().splitlines()), file)
    if not events:
        raise fail(f"{file if file != '-' else 'stdin'} holds no task lines")
    with services() as s:
        submitted = asyncio.run(service.submit_tasks(s, events))
        for t in submitted:
            typer.echo(t.task_id)


# --------------------------------------------------------------------------- consuming


@app.command()
def status(task_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A task's state and why: status (pending, analyzed, executed, validated, passed, failed,
    rejected, dead_lettered; unknown if never seen, exit 1), the providers called, the
    answer, the validation level that failed with its message, cost, tokens, latency."""
    with services() as s:
        report = asyncio.run(service.task_report(s, task_id))
    typer.echo(json.dumps(report.to_dict()) if as_json else "\n".join(report.render()))
    if report.status == "unknown":
        raise typer.Exit(1)


@app.command()
def metrics(
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new snapshots.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print MetricsSnapshot events from the metrics topic (a worker publishes one every 5 s)."""
    with services() as s:
        try:
            asyncio.run(_metrics(s, follow, as_json))
        except KeyboardInterrupt:
            pass


async def _metrics(s: Settings, follow: bool, as_json: bool) -> None:
    if follow:
        workers = await service.live_workers(s)
        note = (f"{len(workers)} worker(s) running" if workers else
                f"no worker is running in namespace {s.namespace} (start one: `rmo worker`)")
        typer.echo(f"following {_registry(s).name('metrics')}: a worker publishes a snapshot every "
                   f"{s.metrics_interval_s:g} s; {note}; Ctrl-C stops", err=True)
    snapshots = service.metrics_snapshots(s, follow=follow)
    if follow and not as_json and sys.stdout.isatty():
        await _metrics_live(snapshots, Console())
        return
    async for e in snapshots:
        if as_json:
            typer.echo(orjson.dumps(e.model_dump(mode="json")).decode())
            continue
        p = e.payload
        typer.echo(f"[{p.window_end.isoformat(timespec='seconds')}] "
                   + " ".join(f"{k}={v}" for k, v in sorted(p.counters.items())))


async def _metrics_live(snapshots: AsyncIterator[Envelope], console: Console) -> None:
    """Redraw one table of the latest snapshot in place as snapshots arrive (a terminal)."""
    previous = None
    with Live(Text("waiting for the first snapshot…"), console=console, auto_refresh=False) as live:
        async for e in snapshots:
            live.update(metrics_view(e.payload, previous), refresh=True)
            previous = e.payload


def metrics_view(p: MetricsSnapshot, previous: MetricsSnapshot | None = None) -> Group:
    """`rmo metrics --follow` on a terminal: a providers table (calls, failures, pass rate,
    cost USD, p50/p95 latency ms, breaker, trips) and the other counters with their rate per
    second since ``previous`` (over the windows between the two snapshots)."""
    providers = sorted({k.split(":")[1] for k in (*p.counters, *p.gauges, *p.histograms)
                        if k.startswith("provider:") and k.count(":") >= 2})
    table = Table(title=f"providers at {p.window_end:%Y-%m-%d %H:%M:%S}Z", title_justify="left")
    for col in ("provider", "calls", "failures", "pass rate", "cost USD", "p50 ms", "p95 ms",
                "breaker", "trips"):
        table.add_column(col, justify="left" if col in ("provider", "breaker") else "right")
    for pid in providers:
        latency = p.histograms.get(f"provider:{pid}:latency_ms", {})
        is_open = p.gauges.get(f"provider:{pid}:breaker_open", 0.0) > 0
        table.add_row(pid, f"{p.counters.get(f'provider:{pid}:calls', 0):,}",
                      f"{p.counters.get(f'provider:{pid}:failures', 0):,}",
                      f"{100 * p.gauges.get(f'provider:{pid}:pass_rate', 0.0):.1f} %",
                      f"{p.gauges.get(f'provider:{pid}:cost_usd', 0.0):.6f}",
                      f"{latency.get('p50', 0.0):.1f}", f"{latency.get('p95', 0.0):.1f}",
                      Text("open", style="bold red") if is_open else Text("closed", style="green"),
                      str(p.counters.get(f"provider:{pid}:trips", 0)))
    seconds = (p.window_end - previous.window_end).total_seconds() if previous else 0.0
    counters = Table(title="counters", title_justify="left")
    for col in ("name", "value", "per s"):
        counters.add_column(col, justify="left" if col == "name" else "right")
    for name, value in sorted(p.counters.items()):
        if name.startswith("provider:"):
            continue
        rate = ((value - previous.counters.get(name, 0)) / seconds
                if previous is not None and seconds > 0 else None)
        counters.add_row(name, f"{value:,}", "-" if rate is None else f"{rate:,.1f}")
    for name, value in sorted(p.gauges.items()):
        if not name.startswith("provider:"):
            counters.add_row(name, f"{value:,.4g}", "")
    return Group(table, counters)


@app.command("report")
def report_cmd(
    since: Annotated[str | None, typer.Option("--since", help="Only events from this time on: "
                                              "RFC 3339 (2026-01-01T12:00:00Z) or an age (90s, 30m, 2h, 7d).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory to write rmo-report-{namespace}.html into "
                                      "(created if missing).")] = Path("."),
    budgets: BudgetsOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Write a self-contained HTML report of the log (no network needed to view it): summary
    (tasks, pass rate, cost, tokens vs budgets), providers' pass rate, cost and latency over
    time, ε and Q-values, breaker timeline, budget use, stage latencies, dead letters, stalls."""
    from streams.report import parse_since

    try:
        start = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise fail(f"--since: {exc}") from None
    with services() as s:
        try:
            result = asyncio.run(service.report(s, since=start, budgets_file=_budgets_file(budgets)))
            path = result.write(out)
        except (LookupError, OSError) as exc:
            raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(path)))
    else:
        empty = f", without data: {', '.join(result.empty)}" if result.empty else ""
        typer.echo(f"wrote {path} ({result.events:,} events, {result.tasks:,} tasks "
                   f"completed, {len(result.plots)} plots{empty})")


# --------------------------------------------------------------------------- history


@app.command("replay")
def replay_cmd(
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="Read every topic from offset 0 (the default).")] = False,
    from_offset: Annotated[int | None, typer.Option("--from-offset", min=0, max=MAX_OFFSET, help="Start every partition at this offset.")] = None,
    from_time: Annotated[datetime | None, typer.Option("--from-time", help="Skip events that occurred before this time (RFC 3339).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Empty namespace to rebuild into (default: {namespace}-replay-{time}-{random}).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare with the live namespace key by key; exit 1 on any difference.")] = False,
    task: Annotated[str | None, typer.Option("--task", help="With --reexecute: the task to re-run.")] = None,
    reexecute: Annotated[bool, typer.Option("--reexecute", help="Re-run --task through the stages with the replay provider.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rebuild every projection from the log into a fresh namespace (and verify it), or
    re-execute one task from its recorded provider calls."""
    if sum(x is not None and x is not False for x in (from_beginning or None, from_offset, from_time)) > 1:
        raise fail("choose one of --from-beginning, --from-offset, --from-time")
    if reexecute != (task is not None):
        raise fail("--reexecute and --task go together: rmo replay --task TASK_ID --reexecute")
    with services() as s:
        code = (_reexecute(s, task, as_json) if task else
                _replay(s, from_offset, from_time, namespace, verify, as_json))
    raise typer.Exit(code)


def _replay(s: Settings, from_offset: int | None, from_time: datetime | None,
            namespace: str | None, verify: bool, as_json: bool) -> int:
    from streams.replay import ReplayTargetError

    try:
        report = asyncio.run(service.replay(s, from_offset=from_offset, from_time=from_time,
                                            target=namespace, verify=verify))
    except ReplayTargetError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(f"rebuilt {report.events} events into namespace {report.target_namespace} in "
                   f"{report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)")
        if report.differences is not None:
            typer.echo(f"verify: {len(report.differences)} difference(s) with {s.namespace}")
            for d in report.differences:
                typer.echo(f"  {d}")
    return 1 if report.differences else 0


def _reexecute(s: Settings, task_id: str, as_json: bool) -> int:
    from streams.reexecute import NothingToReexecute

    try:
        result = asyncio.run(service.reexecute(s, task_id))
    except NothingToReexecute as exc:
        raise fail(f"{exc}; check the id with `rmo lineage {task_id}`") from None
    except service.ReexecutionFailed as exc:
        raise fail(str(exc), code=1) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"{task_id}: originally {'passed' if result.original_passed else 'failed'}, "
                   f"re-executed {'passed' if result.passed else 'failed'}; "
                   f"{result.replayed_calls} recorded call(s) replayed, "
                   f"{result.new_provider_calls} new")
        for e in result.events:
            typer.echo(f"  {e.event_type:22} {e.event_id}  caused by {e.causation_id}")
    return 0 if result.original_passed in (None, result.passed) else 1


@app.command("lineage")
def lineage_cmd(
    task_id: str,
    payload: Annotated[bool, typer.Option("--payload", help="Show each event's payload.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The causation tree of one task's events: type, producer, time, topic/partition/offset
    (and, with --payload, each event's payload fields)."""
    with services() as s:
        try:
            roots = asyncio.run(service.task_lineage(s, task_id))
        except service.TaskNotFound as exc:
            raise fail(str(exc), code=1) from None
    if as_json:
        typer.echo(json.dumps([r.to_dict(payload) for r in roots]))
    else:
        for r in roots:
            typer.echo("\n".join(r.render(payload=payload)))


@app.command("deadletter")
def deadletter_cmd(
    retry: Annotated[str | None, typer.Option("--retry", help="Re-produce this dead letter's record to its source topic (an event as a copy with its own id, other bytes unchanged).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List dead-lettered records (reason, stage, source topic/partition/offset), or retry one."""
    with services() as s:
        if retry is not None:
            try:
                r = asyncio.run(service.retry_dead_letter(s, retry))
            except service.DeadLetterNotFound as exc:
                raise fail(f"{exc}; list them with `rmo deadletter`") from None
            what = f" as event {r.event_id}" if r.event_id else ""
            typer.echo(f"re-submitted {retry} to {r.topic}[{r.partition}]@{r.offset}{what}")
            return
        letters = asyncio.run(service.dead_letters(s))
    if not letters:
        typer.echo(f"no dead letters in {_registry(s).name('deadletter')}", err=True)
    for e in letters:
        p = e.payload
        if as_json:
            typer.echo(orjson.dumps({"id": e.event_id, "occurred_at": e.occurred_at.isoformat(),
                                     **p.model_dump()}).decode())
        else:
            typer.echo(f"{e.event_id}  {e.occurred_at.isoformat(timespec='seconds')}  {p.stage:10} "
                       f"{p.source_topic}[{p.source_partition}]@{p.source_offset}  {p.reason}")


# --------------------------------------------------------------------------- front-ends


HostOption = Annotated[str, typer.Option(
    help="Interface to bind; one that is not loopback needs RMO_API_TOKEN.")]


def _front_end_settings(providers: Path | None, budgets: Path | None) -> Settings:
    update = {k: v for k, v in (("providers_file", _providers_file(providers)),
                                ("budgets_file", _budgets_file(budgets))) if v is not None}
    return Settings().model_copy(update=update)


@app.command()
def serve(
    host: HostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    providers: ProvidersOption = None,
    budgets: BudgetsOption = None,
) -> None:
    """Serve the HTTP API (FastAPI): POST /tasks, GET /tasks/{id}, /tasks/{id}/lineage,
    /tasks/{id}/events (server-sent events), POST /tasks/{id}/reexecute, POST /replay,
    GET /providers, /breakers, /budgets, /metrics/summary, /health; OpenAPI at
    /openapi.json. With RMO_API_TOKEN set, writes need `Authorization: Bearer <token>`."""
    from streams import api

    token = api.token_from_env()
    try:
        api.check_bind(host, token)
    except api.InsecureBind as exc:
        raise fail(str(exc)) from None
    with services(_front_end_settings(providers, budgets)) as s:
        writes = "need the bearer token" if token else "are open (no RMO_API_TOKEN)"
        typer.echo(f"serving the API of namespace {s.namespace} on http://{host}:{port} "
                   f"(OpenAPI: /openapi.json; writes {writes}); Ctrl-C stops", err=True)
        api.serve(s, host, port, token)


@app.command("mcp")
def mcp_cmd(
    http: Annotated[bool, typer.Option("--http", help="Serve streamable HTTP at /mcp instead of stdio.")] = False,
    host: HostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (with --http).", min=1, max=65535)] = 8001,
    providers: ProvidersOption = None,
    budgets: BudgetsOption = None,
) -> None:
    """Serve the MCP tools submit_task, task_status, task_lineage, replay_verify,
    metrics_summary and list_providers, over stdio (for an MCP host that launches `rmo mcp`)
    or streamable HTTP (--http; with RMO_API_TOKEN set every request needs the bearer token)."""
    from streams import api, mcp_server

    token = api.token_from_env()
    if http:
        try:
            api.check_bind(host, token)
        except api.InsecureBind as exc:
            raise fail(str(exc)) from None
    with services(_front_end_settings(providers, budgets)) as s:
        if http:
            typer.echo(f"serving MCP of namespace {s.namespace} on http://{host}:{port}/mcp; "
                       "Ctrl-C stops", err=True)
            mcp_server.serve_http(s, host, port, token)
        else:
            mcp_server.serve_stdio(s)


@app.command("evaluate-policy")
def evaluate_policy_cmd(
    policy: Annotated[str | None, typer.Option("--policy", help="provider:ID, random, greedy or logged.")] = None,
    policy_file: Annotated[Path | None, typer.Option("--policy-file", help="YAML routing: task_types (task type -> action) and default.")] = None,
    from_offset: Annotated[int | None, typer.Option("--from-offset", help="Start every decisions partition at this offset.")] = None,
    from_time: Annotated[datetime | None, typer.Option("--from-time", help="Only decisions made at or after this time (RFC 3339).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples of the intervals.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap and the reward model's folds.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Estimate another routing policy's pass rate and cost per task from the logged
    decisions' propensities and outcomes: IPS, self-normalised IPS and doubly robust, with
    bootstrap intervals, the effective sample size and warnings (streams/policy_eval.py)."""
    from agents.target_policies import UnknownPolicy

    if (policy is None) == (policy_file is None):
        raise fail("give one of --policy NAME and --policy-file FILE")
    if from_offset is not None and from_time is not None:
        raise fail("choose one of --from-offset, --from-time")
    if from_time is not None and from_time.tzinfo is None:
        from_time = from_time.replace(tzinfo=UTC)
    with services() as s:
        try:
            est = asyncio.run(service.evaluate_policy(
                s, policy, policy_file=policy_file, from_offset=from_offset, from_time=from_time,
                n_bootstrap=bootstrap, seed=seed))
        except UnknownPolicy as exc:
            raise fail(str(exc)) from None
        except (LookupError, ValueError) as exc:  # no decisions or outcomes, no topic, no broker
            raise fail(str(exc), code=1) from None
    typer.echo(json.dumps(est.to_dict()) if as_json else "\n".join(est.render()))


# --------------------------------------------------------------------------- jobs


@app.command()
def demo(
    limit: Annotated[int | None, typer.Option(help="Only the first N HumanEval problems.")] = None,
    providers: Annotated[Path | None, typer.Option(help="Providers YAML file (default: the three sim profiles).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sim providers and exploration.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
    budgets: BudgetsOption = None,
    job: Annotated[bool, typer.Option("--job", help="Run HumanEval as one Cortex job instead: a master per task type, a testing master's extra tests per problem, budgets from the Cortex table; writes the job's report.")] = False,
    budget_scale: Annotated[float, typer.Option("--budget-scale", min=0.001, help="With --job: scale the job's budget (0.2: a fifth, which ends with escalations).")] = 1.0,
    out: Annotated[Path, typer.Option("--out", help="With --job: directory for the job's report.")] = Path("."),
) -> None:
    """Run HumanEval (164 problems) through the pipeline and summarize: starts a broker and
    Redis if none is configured (kept running, like `rmo up`), and a worker if none runs.
    With --job, HumanEval runs as a Cortex job through its own worker."""
    from streams.demo import run_demo

    if providers is not None and not providers.exists():
        raise fail(f"{providers} does not exist; pass a providers YAML file")
    if job:
        if budgets is not None:
            raise fail("--job budgets come from the Cortex table (--budget-scale), not --budgets")
        from streams.demo_job import run_demo_job

        raise typer.Exit(run_demo_job(limit=limit, providers=providers, seed=seed, as_json=as_json,
                                      timeout_s=timeout, budget_scale=budget_scale, out=out))
    code = run_demo(limit=limit, providers=providers, seed=seed, as_json=as_json, timeout_s=timeout,
                    budgets=_budgets_file(budgets))
    raise typer.Exit(code)


@app.command()
def bench(
    tasks: Annotated[int, typer.Option(help="Tasks of the end-to-end burst (and of the ingest and relay runs).")] = 10000,
    workers: Annotated[int, typer.Option(help="Worker processes for the end-to-end runs.")] = 2,
    load_s: Annotated[float, typer.Option("--load-s", min=1, help="Seconds of the open-loop load at half the burst's tasks/s.")] = 60.0,
    soak: Annotated[float | None, typer.Option("--soak", min=1, help="Instead: a steady open-loop load for this many seconds, with the workers' RSS and Redis memory after a 180 s warm-up and at the end (seen, task-status and learning join windows of 60 s).")] = None,
    soak_rate: Annotated[float | None, typer.Option("--soak-rate", min=1, help="Tasks/s of the soak (default: half the burst rate measured first).")] = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="Record the workers with py-spy during the burst into this directory (collapsed stacks) and print the top frames.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    budgets: BudgetsOption = None,
) -> None:
    """Measure ingest events/s; end-to-end tasks/s of a burst (instant sim provider, sandbox
    off, validator level syntax) and its ratio to a raw aiokafka four-hop relay; p50/p99
    latency under the burst, under an open-loop load at half that rate and at 10 tasks/s
    (idle: the pipeline's own latency); replay events/s;
    tasks/s with a 1 s provider (calls in flight); HumanEval's 164 problems with the sandbox
    and every validator level, in seconds. With --budgets the workers run under those
    budgets. Prints as it finishes (about 3 minutes)."""
    from streams.bench import run_bench

    took = f"{soak:.0f} s of load after a warm-up" if soak else "about 3 minutes"
    typer.echo(f"benchmarking ({took}; --json prints one line at the end)", err=True)
    raise typer.Exit(run_bench(tasks=tasks, workers=workers, as_json=as_json,
                               budgets=_budgets_file(budgets), load_s=load_s, soak_s=soak,
                               profile=profile, soak_rate=soak_rate))


def _seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-9`` as a list of ints (typer.BadParameter otherwise)."""
    try:
        if "-" in text:
            lo, hi = text.split("-", 1)
            return list(range(int(lo), int(hi) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected e.g. 0,1,2 or 0-9, got {text!r}") from None


STUDY_COLUMNS = (("last_pass_rate", "pass", "{:.3f}"), ("last_cost_usd", "cost $", "{:.3f}"),
                 ("last_pass_per_usd", "pass/$", "{:,.0f}"), ("last_oracle_share", "oracle", "{:.0%}"),
                 ("all_pass_rate", "pass", "{:.3f}"), ("all_cost_usd", "cost $", "{:.3f}"),
                 ("all_pass_per_usd", "pass/$", "{:,.0f}"), ("all_oracle_share", "oracle", "{:.0%}"))


@app.command()
def study(
    epochs: Annotated[int, typer.Option(min=1, help="HumanEval passes per run, back to back.")] = 3,
    seeds: Annotated[str, typer.Option(help="Seeds, e.g. 0,1,2 or 0-9 (sim draws and exploration).")] = "0,1,2",
    providers: ProvidersOption = None,
    policies: Annotated[str | None, typer.Option(help="Comma-separated policies (default: all).")] = None,
    parallel: Annotated[int, typer.Option(min=1, help="Runs at once (one worker each).")] = 2,
    out: Annotated[Path, typer.Option(help="Directory for the plots.")] = Path("rmo-study"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Compare routing policies on HumanEval x EPOCHS per seed, each in its own namespace:
    pass rate, cost, passes per dollar, share of the hindsight oracle's, regret; writes the
    cost-quality plane and the learning curve as PNGs (streams/study.py). The namespaces are
    kept for `rmo evaluate-policy`."""
    import secrets
    import tempfile

    from streams import study as st
    from streams.demo import DemoError

    path = _providers_file(providers)
    chosen = [p.strip() for p in policies.split(",")] if policies else st.default_policies(path)
    seed_list = _seeds(seeds)
    logs = Path(tempfile.mkdtemp(prefix="rmo-study-"))
    s = Settings()
    # like the demo, what it starts stays up: the runs' namespaces are for evaluate-policy
    found = locate.locate(s.kafka_bootstrap_servers, s.redis_url, keep=True)
    for h in found.kept:
        typer.echo(f"started {h.name} at {h.address} (kept running; `rmo down` stops it)", err=True)
    # a fresh prefix per study: a namespace's Redis state must come from its own log
    s = s.model_copy(update={"kafka_bootstrap_servers": found.bootstrap, "redis_url": found.redis_url,
                             "namespace": f"{s.namespace}-study{secrets.token_hex(2)}",
                             "providers_file": path})
    typer.echo(f"study: {len(chosen)} policies x {len(seed_list)} seeds x {epochs} epochs, "
               f"{parallel} at a time, namespaces {s.namespace}-*; worker logs in {logs}", err=True)
    try:
        result = st.study(s, chosen, seed_list, epochs, parallel, out, logs)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except DemoError as exc:
        typer.echo(f"error: {exc}", err=True)
        for line in exc.detail:
            typer.echo(line, err=True)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{'':22}{'last epoch':^36}  {'all epochs':^36}  regret (passes) at epoch end")
    typer.echo(f"{'policy':22}" + "".join(f"{h:>9}" for _, h, _ in STUDY_COLUMNS))
    for name, row in result["table"].items():
        cells = "".join(f"{(fmt.format(row[k]) if k in row else '-'):>9}" for k, _, fmt in STUDY_COLUMNS)
        regrets = " ".join(f"{row[k]:.0f}" for k in sorted(row) if k.startswith("regret_e"))
        typer.echo(f"{name:22}{cells}  {regrets}")
    for name, f in result["floors"].items():
        typer.echo(f"floor {'ok  ' if f['ok'] else 'FAIL'} {name}: {f['value']} (bound {f['bound']})")
    for log_policy, rows in result["ope"].items():
        typer.echo(f"offline evaluation of each provider from the {log_policy} runs' logs (pass rate, "
                   f"median over seeds):")
        for name, m in rows.items():
            typer.echo(f"  {'ok  ' if m['ok'] else 'off '} {name:18} measured {m['measured']:.3f}  "
                       f"SNIPS {m['snips']:.3f}  DR {m['dr']:.3f}  IPS {m['ips']:.3f}  "
                       f"ESS {m['ess']:.0f}  error {m['error_points']:.1f} points")
    typer.echo("plots: " + ", ".join(result["plots"]))


@app.command()
def calibrate(
    seeds: Annotated[str, typer.Option(help="Seeds: a range (0-9), a number, or a comma list of them.")] = "0-9",
    providers: ProvidersOption = None,
    extremes: Annotated[bool, typer.Option(help="Also measure profiles at accuracy 0.0 and 1.0.")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Each sim profile's realised HumanEval pass rate against its configured accuracy (the mean
    over the 164 problems of the accuracy for each problem's task_type): the sim's first-attempt
    answers through the validator's own levels and sandbox (RMO_SANDBOX, RMO_VALIDATOR_LEVELS),
    per seed. Exit 1 when a profile is off by more than 3 points, a wrong answer passed or a
    reference answer failed."""
    from streams.calibrate import (
        CalibrationError,
        parse_seeds,
        render,
        run_calibration,
        validator_config,
    )

    path = _providers_file(providers)
    try:
        seed_list, validator = parse_seeds(seeds), validator_config(Settings())
        if not as_json:
            typer.echo("calibrating: sim answers to HumanEval through the validator...", err=True)
        report = run_calibration(path, seed_list, extremes, validator)
    except CalibrationError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(report.to_dict()) if as_json else "\n".join(render(report)))
    raise typer.Exit(0 if report.ok else 1)


@app.command("budget")
def budget_cmd(budgets: BudgetsOption = None,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Per budget line (current period bucket): limit, spent, pending + reserved, remaining,
    and the part of the emergency reserve granted. USD and tokens."""
    update = {"budgets_file": _budgets_file(budgets)} if budgets else {}
    with services(Settings().model_copy(update=update)) as s:
        try:
            lines = asyncio.run(service.budget_report(s))
        except (ValueError, OSError) as exc:
            raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps([x.to_dict() for x in lines]))
        return
    if not lines:
        typer.echo("no budgets configured (--budgets FILE or RMO_BUDGETS_FILE)")
    for x in lines:
        typer.echo(_budget_row(x))


def _budget_row(x) -> str:
    """One ``rmo budget`` line: USD and token columns, ``-`` where the line has no limit."""
    def usd(v: float | None) -> str:
        return "-" if v is None else f"${v:.6f}"

    def tok(v: int | None) -> str:
        return "-" if v is None else f"{v:,}"

    held_usd, held_tok = x.pending_usd + x.reserved_usd, x.pending_tokens + x.reserved_tokens
    return (f"{x.line:36} {x.bucket:17} limit {usd(x.limit_usd)} / {tok(x.limit_tokens)} tok  "
            f"spent {usd(x.spent_usd)} / {tok(x.spent_tokens)}  "
            f"reserved {usd(held_usd)} / {tok(held_tok)}  "
            f"remaining {usd(x.remaining_usd)} / {tok(x.remaining_tokens)}  "
            f"reserve granted {usd(x.reserve_granted_usd)}")


def tune_gc() -> None:
    """Raise CPython's cyclic-GC thresholds (defaults 700/10/10).

    Every event allocates a burst of short-lived, acyclic objects (dicts, pydantic models)
    that reference counting frees; with the default gen-0 threshold the cyclic collector ran
    thousands of times a second and cost a third of replay time (replay went from ~15k to
    ~23k events/s on a 2-core VM). Cycles are still collected, just in larger steps.
    """
    gc.set_threshold(100_000, 50, 100)


USER_ERRORS: tuple[type[Exception], ...] = (locate.ServiceUnreachable, ProviderConfigError,
                                            EmbeddedServiceError, SandboxUnavailable,
                                            logs.LogConfigError, MetricsPortUnavailable)
"""Mistakes the user can fix from the message alone: exit 2, like a bad option."""


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error. "
                                        "Accepted anywhere on the command line.")] = False,
    verbose: Annotated[bool, typer.Option("-v", help="Log at INFO level. Accepted anywhere "
                                          "on the command line.")] = False,
) -> None:
    """Fractal-RMO: event-sourced multi-agent LLM orchestration over Kafka and Redis."""
    # main() takes both flags off the command line before typer parses it (they must work
    # after a subcommand too); they are declared here so that --help lists them.


def _take_flag(flag: str) -> bool:
    present = flag in sys.argv[1:]
    sys.argv[1:] = [a for a in sys.argv[1:] if a != flag]
    return present


def main() -> None:
    """Console entry point: run the CLI; an error becomes one line on stderr (exit 2 for
    :data:`USER_ERRORS`, 1 otherwise), or its traceback with ``--debug``."""
    tune_gc()
    debug = _take_flag("--debug")
    verbose = _take_flag("-v")
    try:
        # JSON lines, or console lines on a terminal (RMO_LOG_FORMAT): streams/logs.py
        logs.configure(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    except logs.LogConfigError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        text = str(exc).strip().splitlines()
        if isinstance(exc, USER_ERRORS):
            typer.secho(f"error: {text[0] if text else type(exc).__name__}", err=True, fg="red")
            sys.exit(2)
        typer.secho(f"error: {type(exc).__name__}: {text[0] if text else ''} "
                    "(rerun with --debug for the traceback)", err=True, fg="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
