"""streams/logs.py: JSON lines (or console lines) from every logger, context bound by the
stage runner, and no secret in any line."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import orjson
import pytest
import structlog
from redis.asyncio import Redis

from agents.providers.registry import load_providers
from models.codec import encode, make_event
from models.events import Envelope, TaskSubmitted
from streams import logs
from streams.config import Settings
from streams.keys import Keys
from streams.stage import BatchRunner, Consumer, Context, Record, Tx, in_event_context
from streams.topics import load_topics

KEY = "sk-h6-unit-0123456789abcdef"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def json_log(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    assert logs.configure(logging.DEBUG, fmt="json", stream=stream) == "json"
    return stream


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_stdlib_and_structlog_records_are_json_lines_with_the_bound_context(json_log) -> None:
    with structlog.contextvars.bound_contextvars(stage="executor", task_id="t1"):
        logging.getLogger("rmo.test").warning("called %s %d times", "gpt", 3)
        logging.getLogger("faust.something").info("a library's line")
        logs.get_logger("rmo.test").error("native", lag=4)
    logging.getLogger("rmo.test").info("outside", extra={"event_id": "e9", "junk": object()})
    first, library, native, outside = lines(json_log)
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["event"] == "called gpt 3 times" and first["level"] == "warning"
    assert first["stage"] == "executor" and first["task_id"] == "t1"
    assert first["timestamp"].endswith("Z") and isinstance(first["pid"], int)
    assert library["logger"] == "faust.something" and library["stage"] == "executor"
    assert native["lag"] == 4 and native["level"] == "error" and native["task_id"] == "t1"
    # the context ends with its block; extra passes our fields only
    assert "task_id" not in outside and outside["event_id"] == "e9" and "junk" not in outside


def test_an_exception_is_one_line_with_its_traceback(json_log) -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("rmo.test").exception("it failed")
    (line,) = json_log.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["level"] == "error" and "ValueError: bad thing" in record["exception"]
    assert "Traceback" in record["exception"]


def test_format_is_console_on_a_terminal_json_otherwise_and_refuses_others(
        restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.FORMAT_VARIABLE, raising=False)
    assert logs.resolve_format(None, Tty()) == "console"
    assert logs.resolve_format("", io.StringIO()) == "json"
    assert logs.resolve_format("JSON", Tty()) == "json"
    assert logs.resolve_format("console", io.StringIO()) == "console"
    with pytest.raises(logs.LogConfigError, match="RMO_LOG_FORMAT='xml'"):
        logs.resolve_format("xml", io.StringIO())
    tty = Tty()
    assert logs.configure(logging.INFO, stream=tty) == "console"
    logging.getLogger("rmo.test").info("hello console")
    text = tty.getvalue()
    assert "hello console" in text and "rmo.test" in text and not text.startswith("{")


def test_level_names_of_the_command_line() -> None:
    assert logs.level_of("warn") == logging.WARNING and logs.level_of("CRIT") == logging.CRITICAL
    with pytest.raises(logs.LogConfigError, match="'loud'"):
        logs.level_of("loud")


def test_no_line_carries_a_secret(restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # a conventional name: masked from the start
    monkeypatch.setenv("RMO_API_TOKEN", "tok-h6-0123456789")
    monkeypatch.setenv("UNRELATED", "x")
    stream = io.StringIO()
    logs.configure(logging.DEBUG, fmt="json", stream=stream)
    log = logging.getLogger("rmo.test")
    log.warning("auth header Bearer %s", KEY)
    log.info("token tok-h6-0123456789 in a message")
    logs.get_logger("rmo.test").warning("a field", headers={"authorization": f"Bearer {KEY}"})
    try:
        raise RuntimeError(f"server said: invalid key {KEY}")
    except RuntimeError:
        log.exception("call failed")
    console = io.StringIO()
    logs.configure(logging.DEBUG, fmt="console", stream=console)
    log.error("again %s", KEY)
    text = stream.getvalue() + console.getvalue()
    assert KEY not in text and "tok-h6-0123456789" not in text
    assert text.count(logs.MASK) == 5
    assert len(lines(stream)) == 4  # masking kept every line valid JSON


def test_a_providers_key_under_any_variable_name_is_masked_once_loaded(
        restore_logging, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MY_LLM_CREDENTIAL", KEY)  # a name the environment scan does not know
    monkeypatch.setattr(logs, "_secrets", set())
    path = tmp_path / "providers.yaml"
    path.write_text("providers:\n  - id: gpt\n    kind: openai\n    model: gpt-4o-mini\n"
                    "    base_url: http://127.0.0.1:9/v1\n    api_key_env: MY_LLM_CREDENTIAL\n"
                    "  - id: s\n    kind: sim\n    model: grok-4\n    accuracy: 1.0\n")
    stream = io.StringIO()
    logs.configure(logging.INFO, fmt="json", stream=stream)
    logging.getLogger("rmo.test").warning("before %s", KEY)
    load_providers(path, seed=0)  # any process that loads the providers: CLI, API, worker
    logging.getLogger("rmo.test").warning("after %s", KEY)
    before, after = lines(stream)
    assert KEY in before["event"]  # the test can fail: unregistered, the key would show
    assert after["event"] == f"after {logs.MASK}"


def test_short_values_are_not_treated_as_secrets(restore_logging) -> None:
    logs.register_secrets(["abc", "", None, "  "])
    assert logs.redact("abc def") == "abc def"


class Logging(Consumer):
    """Logs one line per handled event; raises for the prompt 'boom' (a dead letter)."""

    name = "logging"
    source = "tasks"
    handles = frozenset({"TaskSubmitted"})

    async def handle(self, event: Envelope, tx: Tx) -> None:
        if event.payload.prompt == "boom":
            raise RuntimeError("boom")
        logging.getLogger("rmo.test").warning("handled %s", event.payload.task_id)


class Acks:
    """A producer whose every send is acked at once."""

    async def send(self, topic: str, key: bytes | None, value: bytes):
        async def ack() -> None:
            return None

        return ack()


async def run_batch(consumer: Consumer, events: list[Envelope], redis_url: str,
                    namespace: str) -> None:
    """Run ``events`` as one batch of the tasks topic (partition 0) through ``consumer``."""
    registry = load_topics(namespace)
    redis = Redis.from_url(redis_url, decode_responses=True)
    ctx = Context(settings=Settings(namespace=namespace, redis_url=redis_url),
                  keys=Keys(namespace), topics=registry, redis=redis, producer=Acks())
    batch = [Record(registry.name("tasks"), 0, i, e.correlation_id.encode(), encode(e))
             for i, e in enumerate(events)]
    try:
        await BatchRunner(consumer, ctx).run(batch)
    finally:
        await redis.aclose()


async def test_the_stage_runner_binds_stage_and_each_events_ids(json_log, redis_url: str,
                                                                namespace: str) -> None:
    events = [make_event(TaskSubmitted(task_id=f"t{i}", kind="code", prompt=p), producer="test")
              for i, p in enumerate(["def f(): pass", "def g(): pass", "boom"])]
    await run_batch(Logging(), events, redis_url, namespace)
    got = lines(json_log)
    handled = {line["task_id"]: line for line in got if line["event"].startswith("handled")}
    assert set(handled) == {"t0", "t1"}
    for e in events[:2]:
        line = handled[e.payload.task_id]
        assert line["stage"] == "logging" and line["event_id"] == e.event_id
        assert line["correlation_id"] == e.correlation_id and line["event_type"] == "TaskSubmitted"
    (dead,) = [line for line in got if line["event"].startswith("dead-letter")]
    assert dead["task_id"] == "t2" and dead["event_id"] == events[2].event_id
    assert dead["stage"] == "logging"
    logging.getLogger("rmo.test").warning("after the batch")
    assert "stage" not in lines(json_log)[-1]  # the batch's context did not leak out


class Gathering(Consumer):
    """Overrides ``process`` like the executor: one gathered coroutine per event, each
    yielding to the others mid-way, wrapped in ``in_event_context``."""

    name = "gathering"
    source = "tasks"
    handles = frozenset({"TaskSubmitted"})

    async def process(self, events, tx: Tx) -> None:
        async def one(event: Envelope) -> None:
            await asyncio.sleep(0)  # interleave the events: their contexts must not mix
            logging.getLogger("rmo.test").warning("executed %s", event.payload.task_id)

        await asyncio.gather(*(in_event_context(e, one(e)) for e in events))
        logging.getLogger("rmo.test").warning("batch done")


async def test_a_stage_overriding_process_logs_each_events_ids(json_log, redis_url: str,
                                                               namespace: str) -> None:
    events = [make_event(TaskSubmitted(task_id=f"t{i}", kind="code", prompt="def f(): pass"),
                         producer="test") for i in range(3)]
    await run_batch(Gathering(), events, redis_url, namespace)
    got = lines(json_log)
    executed = [line for line in got if line["event"].startswith("executed")]
    assert len(executed) == 3
    for line in executed:  # each line names the event it was logged for, not a neighbour's
        e = next(e for e in events if e.payload.task_id == line["event"].split()[1])
        assert line["task_id"] == e.payload.task_id and line["event_id"] == e.event_id
        assert line["stage"] == "gathering"
    (done,) = [line for line in got if line["event"] == "batch done"]
    assert "task_id" not in done and done["stage"] == "gathering"
