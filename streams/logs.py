"""Structured logs for every `rmo` process: structlog over the standard library's logging.

:func:`configure` runs once per process, from each entry point (``streams.cli.main``, and so
every ``rmo`` command and worker, which also runs as ``python -m streams.cli worker``). It
puts one handler on the root logger whose formatter is structlog's ``ProcessorFormatter``, so
records of the standard library's loggers (ours, ``logging.getLogger("rmo.…")``, and Faust's,
mode's, aiokafka's) and of structlog loggers (:func:`get_logger`) come out the same way:

- ``json`` (``RMO_LOG_FORMAT=json``, the default when stderr is not a terminal): one JSON
  object per line, with ``timestamp`` (RFC 3339, UTC), ``level``, ``logger``, ``event`` (the
  message), ``pid``, the context bound where the line was logged (``stage``, ``task_id``,
  ``correlation_id``, ``event_id``, ``event_type``: :func:`event_fields`), the fields a
  structlog call passed, and ``exception`` (the formatted traceback) when there is one;
- ``console`` (``RMO_LOG_FORMAT=console``, the default on a terminal): structlog's
  human-readable lines, the same fields as ``key=value``.

Context travels in ``contextvars`` (structlog's ``merge_contextvars``): the stage runner binds
``stage`` for a batch, and ``streams.stage.in_event_context`` an event's fields while a stage
works on that event (the default ``process`` and the executor's per-event calls use it), and
every line logged meanwhile, by any module, carries them. asyncio copies the context into each
task it creates, so concurrent events do not mix. Work done for a whole batch at once (the
analyzer's classification, the validator's batch runs of ruff, bandit and the sandbox) logs
with ``stage`` only.

No secret reaches a line: every rendered line has the values of :func:`secrets_from_environment`
and of :func:`register_secrets` (every process registers a provider's key as it reads it,
whatever variable ``api_key_env`` names: agents/providers/remote.py) replaced by :data:`MASK`
before it is written.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

Format = Literal["json", "console"]
FORMAT_VARIABLE = "RMO_LOG_FORMAT"

MASK = "[REDACTED]"
MIN_SECRET_CHARS = 8
"""Shorter values are not treated as secrets: masking a 3-character value would mangle every
line that happens to contain those characters, and no API key is that short."""

SECRET_VARIABLE = re.compile(r"(^|_)(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)
"""Names of environment variables whose values are masked in every line: ``RMO_API_TOKEN``,
the providers' conventional ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ``XAI_API_KEY``,
``GEMINI_API_KEY``, and any other ``…_API_KEY``, ``…_TOKEN``, ``…_SECRET``, ``…_PASSWORD``. A
provider's ``api_key_env`` may name any variable: its value is registered when it is read."""

CONTEXT_FIELDS = ("stage", "task_id", "correlation_id", "event_id", "event_type")
"""Fields a standard-library call may also pass as ``extra={...}`` (others are ignored, so
a library's own extras never reach the line)."""

_FIRST = ("timestamp", "level", "logger", "event")
_secrets: set[str] = set()
_handler: logging.Handler | None = None


class LogConfigError(ValueError):
    """``RMO_LOG_FORMAT`` holds something other than ``json`` or ``console``, or a level
    name is unknown."""


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values (API keys, tokens) in every line logged from now on; empty values
    and values shorter than :data:`MIN_SECRET_CHARS` are ignored."""
    for v in values:
        if v and len(v.strip()) >= MIN_SECRET_CHARS:
            _secrets.add(v.strip())


def secrets_from_environment(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The values of the variables :data:`SECRET_VARIABLE` names."""
    return [v for k, v in environ.items() if SECRET_VARIABLE.search(k) and v]


def redact(text: str) -> str:
    """``text`` with every registered secret, raw or JSON-escaped, replaced by :data:`MASK`."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
        escaped = orjson.dumps(secret).decode()[1:-1]
        if escaped != secret and escaped in text:
            text = text.replace(escaped, MASK)
    return text


def event_fields(event: Any) -> dict[str, str]:
    """The log context of one envelope (models.events.Envelope): ``event_id``,
    ``event_type``, ``correlation_id`` and, when its payload names one, ``task_id``."""
    fields = {"event_id": event.event_id, "event_type": event.event_type,
              "correlation_id": event.correlation_id}
    task_id = getattr(event.payload, "task_id", None)
    if task_id is not None:
        fields["task_id"] = task_id
    return fields


def resolve_format(value: str | None, stream: TextIO) -> Format:
    """``value`` (``RMO_LOG_FORMAT``) when set, else ``console`` on a terminal and ``json``
    otherwise.

    Raises:
        LogConfigError: ``value`` is set to something else than ``json`` or ``console``.
    """
    value = (value or "").strip().lower()
    if value in ("json", "console"):
        return value  # type: ignore[return-value]
    if value:
        raise LogConfigError(f"{FORMAT_VARIABLE}={value!r}: expected json or console "
                             "(unset: console on a terminal, json otherwise)")
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or fake stream
        return "json"


def _add_pid(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict["pid"] = os.getpid()
    return event_dict


def _order(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # the fixed fields first, so a reader's eye finds time, level and message where it expects
    first = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    return {**first, **event_dict}


def _redact(_: WrappedLogger, __: str, line: str) -> str:
    return redact(line)


def _dumps(obj: Any, **_: Any) -> str:
    # default=str: a field holding an object orjson cannot encode is logged as its str()
    return orjson.dumps(obj, default=str).decode()


def _formatter(fmt: Format, colors: bool) -> tuple[structlog.stdlib.ProcessorFormatter,
                                                   list[Processor]]:
    """The root handler's formatter, and the processors structlog's own loggers share
    with it (run before the formatter sees their records)."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
    ]
    foreign = [*shared, structlog.stdlib.ExtraAdder(allow=CONTEXT_FIELDS)]
    if fmt == "json":
        render: list[Processor] = [structlog.processors.format_exc_info, _order,
                                   structlog.processors.JSONRenderer(serializer=_dumps)]
    else:
        # plain tracebacks: rich's boxes wrap long values (a secret split over two lines
        # would escape the mask) and show local variables
        render = [structlog.dev.ConsoleRenderer(colors=colors,
                                                exception_formatter=structlog.dev.plain_traceback)]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render, _redact],
    ), shared


def configure(level: int = logging.WARNING, fmt: str | None = None,
              stream: TextIO | None = None) -> Format:
    """Route every log record of this process through one formatter (module docstring) on
    ``stream`` (default: stderr) at ``level`` (a ``logging`` level); ``fmt`` overrides
    ``RMO_LOG_FORMAT``. Calling it again replaces the previous configuration. Also registers
    :func:`secrets_from_environment`. Returns the format used.

    Raises:
        LogConfigError: the format is neither ``json`` nor ``console``.
    """
    global _handler
    stream = stream or sys.stderr
    chosen = resolve_format(fmt if fmt is not None else os.environ.get(FORMAT_VARIABLE), stream)
    register_secrets(secrets_from_environment())
    formatter, shared = _formatter(chosen, colors=chosen == "console" and _isatty(stream))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for h in list(root.handlers):  # basicConfig's or an earlier configure's: one handler only
        root.removeHandler(h)
    _handler = logging.StreamHandler(stream)
    _handler.setFormatter(formatter)
    root.addHandler(_handler)
    root.setLevel(level)
    return chosen


LEVELS = {"crit": logging.CRITICAL, "critical": logging.CRITICAL, "error": logging.ERROR,
          "warn": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG}
"""Level names a command line may use (`rmo worker --loglevel`, Faust's names included)."""


def level_of(name: str) -> int:
    """The ``logging`` level named ``name`` (:data:`LEVELS`, any case).

    Raises:
        LogConfigError: an unknown name.
    """
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise LogConfigError(f"log level {name!r}: expected one of crit, error, warn, info, "
                             "debug") from None


def set_level(level: int) -> None:
    """Change the root logger's level (what :func:`configure` set)."""
    logging.getLogger().setLevel(level)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name``: ``log.warning("what", field=value)``."""
    return structlog.stdlib.get_logger(name)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
