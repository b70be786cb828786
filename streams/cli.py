"""`rmo`: the command line of Fractal-RMO (typer).

Every command resolves its services the same way: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else
what ``rmo up`` started, else an embedded Tansu; ``REDIS_URL`` if reachable, else ``rmo up``'s,
else an embedded Redis. Commands that start a worker create the topics first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
from streams.topics import create_topics, load_topics

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
        created = asyncio.run(create_topics(s.require_kafka(), _registry(s)))
        typer.echo(f"created {len(created)} topic(s)" + (f": {', '.join(created)}" if created else ""))


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
    running = embedded.read_up_state()
    state_dir = embedded.state_file().parent
    handles = list(running.values())
    if "kafka" not in running:
        handles.append(embedded.start_kafka(state_dir / "kafka.log"))
    if "redis" not in running:
        handles.append(embedded.start_redis(state_dir / "redis.log"))
    embedded.write_up_state(handles)
    for h in handles:
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
    await create_topics(s.require_kafka(), registry)
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
        e = decode(r.value)
        if as_json:
            typer.echo(orjson.dumps(e.model_dump(mode="json")).decode())
            continue
        p = e.payload
        typer.echo(f"[{p.window_end.isoformat(timespec='seconds')}] "
                   + " ".join(f"{k}={v}" for k, v in sorted(p.counters.items())))


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


def main() -> None:
    logging.basicConfig(level=logging.INFO if "-v" in sys.argv else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if "-v" in sys.argv:
        sys.argv.remove("-v")
    app()


if __name__ == "__main__":
    main()
