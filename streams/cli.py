"""`rmo`: the command line of Fractal-RMO (typer).

Every command resolves its services the same way: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else
what ``rmo up`` started, else an embedded Tansu; ``REDIS_URL`` if reachable, else ``rmo up``'s,
else an embedded Redis. Commands that start a worker create the topics first.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from pydantic import ValidationError
from redis.asyncio import Redis

from models.codec import decode, json_schemas, make_event
from models.events import TaskSubmitted
from streams import embedded
from streams.client import EventProducer, read_topic
from streams.config import Settings
from streams.keys import Keys
from streams.projections import task_status
from streams.topics import load_topics

app = typer.Typer(help="Fractal-RMO: event-sourced multi-agent LLM orchestration over Kafka and Redis.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Topics of topics.yaml.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")

log = logging.getLogger("rmo.cli")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error naming the fix and return the Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(code)


@contextmanager
def services(settings: Settings | None = None) -> Iterator[Settings]:
    """Settings with Kafka and Redis resolved; services started here stop on exit."""
    settings = settings or Settings()
    bootstrap, redis_url, handles = embedded.resolve_services(settings.kafka_bootstrap_servers,
                                                              settings.redis_url)
    try:
        yield settings.model_copy(update={"kafka_bootstrap_servers": bootstrap, "redis_url": redis_url})
    finally:
        for h in handles:
            h.stop()


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url, decode_responses=True)


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


# --------------------------------------------------------------------------- services


@app.command()
def up() -> None:
    """Start an embedded Kafka (Tansu) and Redis in the background and record their
    addresses, so later `rmo` commands use them. `rmo down` stops them."""
    running, _ = embedded.bring_up("kafka", "redis")
    for h in running.values():
        var = "KAFKA_BOOTSTRAP_SERVERS" if h.name == "kafka" else "REDIS_URL"
        typer.echo(f"{var}={h.address}  (pid {h.pid})")
    typer.echo(f"state: {embedded.state_file()}")


@app.command()
def down() -> None:
    """Stop only what `rmo up` started."""
    running = embedded.read_up_state(check_service=False)
    for h in running.values():
        h.stop()
        typer.echo(f"stopped {h.name} at {h.address}")
    embedded.clear_up_state()
    if not running:
        typer.echo("nothing started by `rmo up` is running")


@app.command()
def worker(
    providers: Annotated[Path | None, typer.Option(help="Providers YAML file.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of sim providers and exploration.")] = None,
    loglevel: Annotated[str, typer.Option(help="crit, error, warn, info or debug.")] = "warn",
) -> None:
    """Run the four stages (analyzer, executor, validator, learning) as a Faust worker."""
    from streams.worker import run_worker

    update = {k: v for k, v in (("providers_file", providers), ("seed", seed)) if v is not None}
    with services(Settings().model_copy(update=update)) as s:
        run_worker(s, loglevel)


# --------------------------------------------------------------------------- producing


def parse_tasks(lines: Iterator[str], source: str) -> list[TaskSubmitted]:
    """JSONL task lines -> TaskSubmitted payloads. Raises typer.Exit naming the bad line."""
    tasks = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tasks.append(TaskSubmitted.model_validate(orjson.loads(line)))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise fail(f"{source}:{n}: not a task ({str(exc).splitlines()[0]}); each line must be a "
                       "JSON object with task_id, kind, prompt (entry_point, test optional)") from None
    return tasks


@app.command()
def submit(file: Annotated[str, typer.Argument(help="JSONL file of tasks, or - for stdin.")]) -> None:
    """Produce one TaskSubmitted per JSONL line to the tasks topic; prints the task ids."""
    if file == "-":
        tasks = parse_tasks(iter(sys.stdin), "stdin")
    else:
        path = Path(file)
        if not path.exists():
            raise fail(f"{file} does not exist; give a JSONL file or - for stdin")
        tasks = parse_tasks(iter(path.read_text().splitlines()), file)
    with services() as s:
        asyncio.run(_submit(s, tasks))
        for t in tasks:
            typer.echo(t.task_id)


async def _submit(s: Settings, tasks: list[TaskSubmitted]) -> list:
    registry = _registry(s)
    await _prepare(s)
    async with EventProducer(s.require_kafka()) as producer:
        events = [make_event(t, producer="cli.submit") for t in tasks]
        return await producer.send_events(registry.name("tasks"), events)


# --------------------------------------------------------------------------- consuming


@app.command()
def status(task_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A task's state from the task projection: pending, analyzed, executed, validated,
    passed, failed, rejected, dead_lettered (unknown if never seen)."""
    with services() as s:
        h = asyncio.run(_hgetall(s, Keys(s.namespace).task(task_id)))
    st = task_status(h)
    if as_json:
        typer.echo(json.dumps({"task_id": task_id, "status": st, **h}))
    else:
        typer.echo(f"{task_id}: {st}")
        for k, v in sorted(h.items()):
            typer.echo(f"  {k}: {v}")
    if st == "unknown":
        raise typer.Exit(1)


async def _hgetall(s: Settings, key: str) -> dict[str, str]:
    r = redis_client(s)
    try:
        return await r.hgetall(key)
    finally:
        await r.aclose()


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
    async for r in read_topic(s.require_kafka(), _registry(s).name("metrics"), follow=follow):
        e = decode(r.value, max_bytes=None)
        if as_json:
            typer.echo(orjson.dumps(e.model_dump(mode="json")).decode())
            continue
        p = e.payload
        typer.echo(f"[{p.window_end.isoformat(timespec='seconds')}] "
                   + " ".join(f"{k}={v}" for k, v in sorted(p.counters.items())))


# --------------------------------------------------------------------------- history


@app.command("replay")
def replay_cmd(
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="Read every topic from offset 0 (the default).")] = False,
    from_offset: Annotated[int | None, typer.Option("--from-offset", help="Start every partition at this offset.")] = None,
    from_time: Annotated[datetime | None, typer.Option("--from-time", help="Skip events that occurred before this time (RFC 3339).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Empty namespace to rebuild into (default: {namespace}-replay-{time}).")] = None,
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
    if from_time is not None and from_time.tzinfo is None:
        from_time = from_time.replace(tzinfo=UTC)
    with services() as s:
        code = asyncio.run(_reexecute(s, task, as_json) if task else
                           _replay(s, from_offset, from_time, namespace, verify, as_json))
    raise typer.Exit(code)


async def _replay(s: Settings, from_offset: int | None, from_time: datetime | None,
                  namespace: str | None, verify: bool, as_json: bool) -> int:
    from agents.providers.registry import load_providers
    from streams import replay
    from streams.pipeline import build_consumers

    target = namespace or f"{s.namespace}-replay-{datetime.now(UTC):%Y%m%d%H%M%S}"
    consumers = build_consumers(s, load_providers(s.providers_file, seed=s.seed))
    redis = redis_client(s)
    try:
        try:
            report = await replay.replay(s, _registry(s), consumers, redis, target,
                                         from_offset=from_offset, from_time=from_time)
        except replay.ReplayTargetError as exc:
            raise fail(str(exc)) from None
        if verify:
            report.differences = await replay.verify(redis, Keys(s.namespace), Keys(target))
    finally:
        await redis.aclose()
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(f"rebuilt {report.events} events into namespace {target} in {report.seconds:.2f} s "
                   f"({report.events_per_s:,.0f} events/s)")
        if report.differences is not None:
            typer.echo(f"verify: {len(report.differences)} difference(s) with {s.namespace}")
            for d in report.differences:
                typer.echo(f"  {d}")
    return 1 if report.differences else 0


async def _reexecute(s: Settings, task_id: str, as_json: bool) -> int:
    from streams.reexecute import NothingToReexecute, reexecute

    redis = redis_client(s)
    try:
        result = await reexecute(s, _registry(s), redis, task_id)
    except NothingToReexecute as exc:
        raise fail(f"{exc}; check the id with `rmo lineage {task_id}`") from None
    finally:
        await redis.aclose()
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
def lineage_cmd(task_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The causation tree of one task's events: type, producer, time, topic/partition/offset."""
    from streams.lineage import lineage

    with services() as s:
        roots = asyncio.run(lineage(s, _registry(s), task_id))
    if not roots:
        raise fail(f"no events with correlation id {task_id!r}", code=1)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in roots]))
    else:
        for r in roots:
            typer.echo("\n".join(r.render()))


@app.command("deadletter")
def deadletter_cmd(
    retry: Annotated[str | None, typer.Option("--retry", help="Re-produce this dead letter's original record to its source topic.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List dead-lettered records (reason, stage, source topic/partition/offset), or retry one."""
    with services() as s:
        code = asyncio.run(_deadletter(s, retry, as_json))
    raise typer.Exit(code)


async def _deadletter(s: Settings, retry: str | None, as_json: bool) -> int:
    letters = []
    async for r in read_topic(s.require_kafka(), _registry(s).name("deadletter")):
        letters.append(decode(r.value, max_bytes=None))
    if retry is None:
        for e in letters:
            p = e.payload
            if as_json:
                typer.echo(orjson.dumps({"id": e.event_id, "occurred_at": e.occurred_at.isoformat(),
                                         **p.model_dump()}).decode())
            else:
                typer.echo(f"{e.event_id}  {e.occurred_at.isoformat(timespec='seconds')}  {p.stage:10} "
                           f"{p.source_topic}[{p.source_partition}]@{p.source_offset}  {p.reason}")
        return 0
    match = [e for e in letters if e.event_id == retry]
    if not match:
        raise fail(f"no dead letter {retry!r}; list them with `rmo deadletter`")
    p = match[-1].payload
    async with EventProducer(s.require_kafka()) as producer:
        fut = await producer.send(p.source_topic,
                                  base64.b64decode(p.original_key_b64) if p.original_key_b64 else None,
                                  base64.b64decode(p.original_value_b64))
        md = await fut
    typer.echo(f"re-submitted {retry} to {md.topic}[{md.partition}]@{md.offset}")
    return 0


# --------------------------------------------------------------------------- jobs


@app.command()
def demo(
    limit: Annotated[int | None, typer.Option(help="Only the first N HumanEval problems.")] = None,
    providers: Annotated[Path | None, typer.Option(help="Providers YAML file (default: the three sim profiles).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sim providers and exploration.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
) -> None:
    """Run HumanEval (164 problems) through the pipeline and summarize: starts a broker and
    Redis if none is configured (kept running, like `rmo up`), and a worker if none runs."""
    from streams.demo import run_demo

    if providers is not None and not providers.exists():
        raise fail(f"{providers} does not exist; pass a providers YAML file")
    code = run_demo(limit=limit, providers=providers, seed=seed, as_json=as_json, timeout_s=timeout)
    raise typer.Exit(code)


@app.command()
def bench(
    tasks: Annotated[int, typer.Option(help="Tasks for the end-to-end run.")] = 5000,
    workers: Annotated[int, typer.Option(help="Worker processes for the end-to-end run.")] = 2,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure ingest events/s, end-to-end tasks/s (instant sim provider, sandbox off),
    p50/p99 task latency, and a raw aiokafka four-hop relay as the baseline."""
    from streams.bench import run_bench

    raise typer.Exit(run_bench(tasks=tasks, workers=workers, as_json=as_json))


def tune_gc() -> None:
    """Raise CPython's cyclic-GC thresholds (defaults 700/10/10).

    Every event allocates a burst of short-lived, acyclic objects (dicts, pydantic models)
    that reference counting frees; with the default gen-0 threshold the cyclic collector ran
    thousands of times a second and cost a third of replay time (replay went from ~15k to
    ~23k events/s on a 2-core VM). Cycles are still collected, just in larger steps.
    """
    gc.set_threshold(100_000, 50, 100)


def main() -> None:
    tune_gc()
    logging.basicConfig(level=logging.INFO if "-v" in sys.argv else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if "-v" in sys.argv:
        sys.argv.remove("-v")
    app()


if __name__ == "__main__":
    main()
