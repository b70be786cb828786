"""Run untrusted Python in a sandbox (SPEC §2 "sandbox", §4 "Validator" level 4).

Two modes:

``"bwrap"``
    Debian's bubblewrap. The child gets fresh user (uid/gid 65534, every capability dropped),
    network, pid, ipc and uts namespaces, so it has no network at all (not even loopback to
    the host) and dies with its parent. Its root is an empty tmpfs remounted read-only, into
    which only ``/usr`` (with the ``/bin``, ``/lib*``, ``/sbin`` links or directories), the
    Python prefix, a minimal ``/dev`` and ``/proc`` are bound read-only; the one writable
    place is a small tmpfs work dir ``/sandbox`` (the cwd), which vanishes with the run.
    Nothing of the host's files beyond the OS and the interpreter is visible (no repo, no
    home directory, no ``/etc``). The script runs as the namespace's pid 1, so signals it
    sends to itself are ignored, and everything it started dies with it.
``"subprocess"``
    The same interpreter in a throwaway temp dir with the same rlimits, minimal environment
    and wall timeout, but no namespaces: the code can read and write the host's files and
    use the network. A loud warning is emitted once per process when this mode is used.

The setting (``RMO_SANDBOX``, :data:`SandboxSetting`) is turned into a mode by
:func:`resolve_mode`, once per process, at worker start-up: ``bwrap`` and ``auto`` run bwrap
and refuse (:class:`SandboxUnavailable`) where it is missing or cannot create its namespaces,
never falling back; ``subprocess`` is the explicit opt-in to the reduced isolation above;
``off`` runs no untrusted code at all.

Both modes set RLIMIT_CPU (``cpu_s``; the kernel SIGKILLs the child there), RLIMIT_AS
(``memory_mb`` MiB of address space), RLIMIT_FSIZE and RLIMIT_CORE=0 through util-linux
``prlimit`` (rather than a ``preexec_fn``, which is unsafe in a threaded parent), run the
script with ``python -I -S`` (isolated: no user site, no ``PYTHON*`` variables, no
site-packages, so only the standard library is importable), give it an empty stdin, and kill
its whole process group when the wall timeout expires. stdout and stderr are each capped
(:data:`OUTPUT_CAP_BYTES`; the head and the tail are kept, since tracebacks come last).

Linux only: the exit is awaited through a pidfd (kernel >= 5.3) so that ``wait4`` yields
the child's own CPU time even with many runs in flight.

Known limit: when the host runs as root, RLIMIT_NPROC is not enforced on the child (the
kernel exempts the initial namespace's root), so a fork bomb is bounded only by the wall
timeout and, under bwrap, by the pid namespace being torn down with the sandbox.

Measured on the development machine (2 vCPU, kernel 6.18, bubblewrap 0.8.0, Python 3.11):
``print(1)`` takes a median 11 ms wall under bwrap against 8 ms as a plain rlimited
subprocess, so the sandbox costs about 3-4 ms per run (``test_bwrap_overhead`` prints the
figures on the machine it runs on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

log = logging.getLogger("rmo.sandbox")

SandboxMode = Literal["bwrap", "subprocess"]
#: What ``RMO_SANDBOX`` may say; :func:`resolve_mode` turns it into a :data:`SandboxMode`.
SandboxSetting = Literal["bwrap", "subprocess", "auto", "off"]

#: Cap on each of stdout and stderr kept per run, in bytes (head 3/4, tail 1/4).
OUTPUT_CAP_BYTES = 64 * 1024
#: The work dir inside the bwrap sandbox (its cwd, HOME and TMPDIR).
WORKDIR = "/sandbox"
#: Size of the work-dir tmpfs and the per-file size limit (RLIMIT_FSIZE), in bytes. tmpfs
#: pages are host memory that RLIMIT_AS does not count, hence a separate small cap.
_TMPFS_BYTES = 64 * 1024 * 1024
#: After the child exits, how long to keep reading pipes that a leftover grandchild may
#: still hold open (possible in subprocess mode only), in seconds.
_DRAIN_S = 1.0
#: Unprivileged uid/gid the code runs as inside the bwrap user namespace ("nobody").
_NOBODY = 65534


class SandboxUnavailable(ValueError):
    """The requested sandbox cannot run on this machine (no ``bwrap``, a bwrap that cannot
    create its namespaces, no ``prlimit``): a configuration error, whose message is one line
    naming the setting and the fix when :func:`resolve_mode` raises it."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``returncode`` is the script's exit status, negative ``-N`` when it was killed by signal
    N, and ``None`` when the wall timeout killed it. Under bwrap a child killed by signal N
    is reported by bwrap as status 128+N and normalised here to ``-N``, so a script that
    itself exits with a status above 128 reads as a signal too. ``signal`` repeats N.
    ``timed_out`` is true when the wall timeout or the CPU limit (RLIMIT_CPU, which kills
    with SIGKILL) ended the run.
    ``wall_ms`` is spawn-to-exit wall time in ms (sandbox start-up included); ``cpu_ms`` is
    the user+system CPU time in ms of the child and every descendant it reaped (from
    ``wait4``). ``memory_exceeded`` is best effort: a ``MemoryError`` in stderr, which is
    how CPython reports hitting RLIMIT_AS. ``mode`` is the mode that actually ran.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    signal: int | None
    wall_ms: float
    cpu_ms: float
    mode: str
    memory_exceeded: bool


class _CappedBuffer:
    """Keeps at most ``cap`` bytes of a stream: the head and the tail, dropping the middle."""

    def __init__(self, cap: int) -> None:
        self._head_cap = cap - cap // 4
        self._tail_cap = cap // 4
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> None:
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            excess = len(self._tail) - self._tail_cap
            if excess > 0:
                del self._tail[:excess]
                self._dropped += excess

    def text(self) -> str:
        head = self._head.decode("utf-8", errors="replace")
        tail = self._tail.decode("utf-8", errors="replace")
        if not self._dropped:
            return head + tail
        return f"{head}\n[... {self._dropped} bytes dropped ...]\n{tail}"


class _PipeReader(asyncio.Protocol):
    """Collects one pipe into a :class:`_CappedBuffer`; ``eof`` resolves when it closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.buffer = _CappedBuffer(OUTPUT_CAP_BYTES)
        self.eof: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)


def _python() -> str:
    """The interpreter to run: this one, with venv symlinks resolved (the venv is not bound)."""
    return os.path.realpath(sys.executable)


def _prlimit_argv(cpu_s: int, memory_mb: int) -> list[str]:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise SandboxUnavailable("util-linux `prlimit` not found: rlimits cannot be applied")
    address_space = memory_mb * 1024 * 1024
    return [
        prlimit,
        # soft == hard: SIGKILL at the limit. SIGXCPU would be ignored by the sandbox's pid 1.
        f"--cpu={cpu_s}:{cpu_s}",
        f"--as={address_space}:{address_space}",
        f"--fsize={_TMPFS_BYTES}:{_TMPFS_BYTES}",
        "--core=0:0",
        "--",
    ]


def _system_binds() -> list[str]:
    """bwrap arguments exposing /usr, the merged-/usr links (or real dirs) and the Python."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    prefixes = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(_python()))}
    for prefix in sorted(prefixes):
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    return args


def _bwrap_argv(script_fd: int) -> list[str]:
    """The bwrap command line (without rlimits) running the script read from ``script_fd``."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("`bwrap` (Debian package bubblewrap) not found")
    return [
        bwrap,
        "--unshare-user", "--uid", str(_NOBODY), "--gid", str(_NOBODY),
        "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        # Python itself is pid 1 (no bwrap init in between), so the outer bwrap reaps it and
        # wait4 on bwrap reports the script's CPU time; with bwrap's init the outer process
        # exits without reaping it and the CPU time is lost.
        "--as-pid-1",
        "--hostname", "sandbox",
        "--cap-drop", "ALL",
        "--die-with-parent", "--new-session",
        *_system_binds(),
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(_TMPFS_BYTES), "--tmpfs", WORKDIR,
        "--perms", "0444", "--ro-bind-data", str(script_fd), f"{WORKDIR}/main.py",
        # Last, so the binds above could still create their mount points in the root tmpfs.
        "--remount-ro", "/",
        "--chdir", WORKDIR,
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "HOME", WORKDIR,
        "--setenv", "TMPDIR", WORKDIR,
        _python(), "-I", "-S", f"{WORKDIR}/main.py",
    ]  # fmt: skip


@functools.cache
def _warn_reduced_isolation() -> None:
    """Warn once per process (functools.cache makes the second call a no-op)."""
    message = (
        "SANDBOX ISOLATION REDUCED: running untrusted code as a plain rlimited subprocess "
        "(no namespaces: it can read and write host files and use the network). "
        "Install bubblewrap (`apt-get install bubblewrap`) for the real sandbox."
    )
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


#: The fix offered wherever bwrap cannot run: the opt-in, with what it gives away.
_OPT_IN = ("or set RMO_SANDBOX=subprocess to accept reduced isolation (test code then runs as "
           "a plain rlimited subprocess that can write host files and reach the network)")


@functools.cache
def bwrap_problem() -> str | None:
    """Why a bwrap sandbox cannot run here, in one line; ``None`` when it can.

    The probe runs the full sandbox command line (namespaces, binds, rlimits) on ``pass``
    once per process and caches the answer. It blocks for one run (about 20 ms), so it may be
    called from a coroutine too.
    """
    try:
        with _staged_script("pass", "bwrap") as (argv, _, _, pass_fds):
            probe = subprocess.run(
                _prlimit_argv(10, 512) + argv, stdin=subprocess.DEVNULL, capture_output=True,
                pass_fds=pass_fds, timeout=10, check=False,
            )
    except SandboxUnavailable as exc:
        return str(exc)
    except subprocess.TimeoutExpired:
        return "the bwrap probe did not finish within 10 s"
    if probe.returncode == 0:
        return None
    stderr = " ".join(probe.stderr.decode(errors="replace").split())[-300:]
    return f"bwrap cannot create a sandbox here (status {probe.returncode}: {stderr})"


@functools.cache
def resolve_mode(setting: str) -> SandboxMode | None:
    """The mode untrusted code runs in under a sandbox setting (``RMO_SANDBOX``), or ``None``
    for ``off``: run no candidate code at all (the validator skips its tests and performance
    levels, the executor does not run candidates on the prompt's visible examples).

    ``bwrap`` and ``auto`` (synonyms: neither falls back): ``"bwrap"`` when
    the sandbox starts here (:func:`bwrap_problem`), else :class:`SandboxUnavailable`.
    ``subprocess``: the explicit opt-in to reduced isolation, warned loudly (once per
    process). Both running modes also need util-linux ``prlimit``.

    Call it once at start-up, so that a machine that cannot honour the setting refuses to
    start instead of failing task after task; the answer (not an error) is cached per
    process and setting, so later calls from the stages return the start-up decision.
    Raises :class:`SandboxUnavailable` (one-line message naming the setting and the fix) and
    ``ValueError`` for an unknown setting.
    """
    if setting not in get_args(SandboxSetting):
        raise ValueError(f"unknown sandbox setting {setting!r}; known: {get_args(SandboxSetting)}")
    if setting == "off":
        return None
    if shutil.which("prlimit") is None:
        raise SandboxUnavailable(
            f"RMO_SANDBOX={setting}: util-linux `prlimit` is not installed, so test code cannot "
            "be rlimited; install util-linux, or set RMO_SANDBOX=off to run no candidate code"
        )
    if setting == "subprocess":
        _warn_reduced_isolation()
        return "subprocess"
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable(
            f"RMO_SANDBOX={setting}: bwrap is not installed, so untrusted test code cannot be "
            "sandboxed; install it (`apt-get install bubblewrap`, or `bash scripts/setup.sh` "
            f"as root), {_OPT_IN}"
        )
    problem = bwrap_problem()
    if problem is not None:
        raise SandboxUnavailable(
            f"RMO_SANDBOX={setting}: {problem}; allow unprivileged user namespaces "
            f"(docker-compose.yml shows how for a container), {_OPT_IN}"
        )
    return "bwrap"


async def arun_python(
    script: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: int = 10,
    memory_mb: int = 512,
    mode: SandboxMode = "bwrap",
) -> SandboxResult:
    """Run ``script`` (Python source) in the sandbox and return its :class:`SandboxResult`.

    ``timeout_s``: wall-clock limit in seconds, after which the process group is SIGKILLed.
    ``cpu_s``: RLIMIT_CPU in seconds. ``memory_mb``: RLIMIT_AS in MiB. Safe to run many at
    once from one event loop; cancelling the call kills and reaps the child.

    Raises :class:`SandboxUnavailable` if ``bwrap`` (bwrap mode) or ``prlimit`` is missing,
    and ``ValueError`` for an unknown mode. A script that fails, crashes or is killed is
    not an error: it is reported in the result.
    """
    if mode not in ("bwrap", "subprocess"):
        raise ValueError(f"unknown sandbox mode {mode!r}")
    if mode == "subprocess":
        _warn_reduced_isolation()
    limits = _prlimit_argv(cpu_s, memory_mb)
    with _staged_script(script, mode) as (argv, cwd, env, pass_fds):
        started = time.perf_counter()
        # Popen, not asyncio's subprocess: the exit must be reaped with wait4 for the child's
        # own rusage. fork/exec blocks the loop only briefly.
        proc = subprocess.Popen(  # noqa: ASYNC220
            limits + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=cwd, env=env, pass_fds=pass_fds,
            start_new_session=True,  # own process group: the timeout kills all of it
        )
        outcome = await _supervise(proc, timeout_s)
    returncode, killed, usage = outcome.returncode, outcome.killed, outcome.usage
    if mode == "bwrap" and returncode > 128:
        returncode = 128 - returncode  # bwrap reports a child killed by signal N as 128+N
    sig = -returncode if returncode < 0 else None
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000.0
    # RLIMIT_CPU kills with SIGKILL; only a child that used (about) its CPU allowance was
    # killed by it (the kernel checks the limit on the scheduler tick, hence the margin).
    cpu_killed = sig == signal.SIGKILL and cpu_ms >= cpu_s * 1000.0 * 0.9
    return SandboxResult(
        returncode=None if killed else returncode,
        stdout=outcome.stdout,
        stderr=outcome.stderr,
        timed_out=killed or cpu_killed,
        signal=sig,
        wall_ms=(outcome.exited_at - started) * 1000.0,
        cpu_ms=cpu_ms,
        mode=mode,
        memory_exceeded="MemoryError" in outcome.stderr,
    )


class _Exit(NamedTuple):
    returncode: int  # as os.waitstatus_to_exitcode gives it: -N for signal N
    killed: bool  # by the wall timeout
    usage: resource.struct_rusage
    exited_at: float  # time.perf_counter() when the exit was seen
    stdout: str
    stderr: str


async def _supervise(proc: subprocess.Popen[bytes], timeout_s: float) -> _Exit:
    """Collect the child's output and exit; kill its group after ``timeout_s`` seconds.

    The exit is awaited on a pidfd and reaped with ``wait4``: that is what yields this
    child's own CPU time (asyncio's child watchers discard rusage).
    """
    assert proc.stdout is not None and proc.stderr is not None  # both are PIPEs
    loop = asyncio.get_running_loop()
    readers: list[_PipeReader] = []
    transports: list[asyncio.BaseTransport] = []
    pidfd = os.pidfd_open(proc.pid)
    reaped = False
    try:
        for pipe in (proc.stdout, proc.stderr):
            reader = _PipeReader(loop)
            transport, _ = await loop.connect_read_pipe(lambda r=reader: r, pipe)
            readers.append(reader)
            transports.append(transport)
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        killed = False
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout_s)
        except TimeoutError:
            killed = True
            _kill_group(proc.pid)
            await exited
        finally:
            loop.remove_reader(pidfd)
        exited_at = time.perf_counter()
        # The child is a zombie now, so its pid (= its group id) cannot be reused yet: kill
        # whatever it left running in its group (subprocess mode; under bwrap the pid
        # namespace is already gone), then reap it. wait4 returns at once.
        _kill_group(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # noqa: ASYNC222
        reaped = True
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never reaps it again
        await asyncio.wait([r.eof for r in readers], timeout=_DRAIN_S)
    finally:
        if not reaped:  # cancelled or failed mid-run: never leave a sandbox running
            _kill_group(proc.pid)
            os.waitpid(proc.pid, 0)  # noqa: ASYNC222 - brief: the child was just SIGKILLed
            proc.returncode = -signal.SIGKILL
        for transport in transports:
            transport.close()
        os.close(pidfd)
    return _Exit(proc.returncode, killed, usage, exited_at, readers[0].buffer.text(),
                 readers[1].buffer.text())


def run_python(
    script: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: int = 10,
    memory_mb: int = 512,
    mode: SandboxMode = "bwrap",
) -> SandboxResult:
    """Blocking :func:`arun_python` (same arguments, result and errors).

    It runs its own event loop, so it raises ``RuntimeError`` when called from a coroutine
    or callback of a running loop: await :func:`arun_python` there instead.
    """
    return asyncio.run(
        arun_python(script, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, mode=mode)
    )


@contextlib.contextmanager
def _staged_script(
    script: str, mode: SandboxMode
) -> Iterator[tuple[list[str], str | None, dict[str, str], tuple[int, ...]]]:
    """Put the script where the child will read it; yield (argv, cwd, env, pass_fds).

    bwrap: a memfd that bwrap copies into the sandbox read-only (nothing touches the host's
    disk). subprocess: a host temp dir that is also the child's cwd. Either is released on
    exit, so the run must be over by then.
    """
    source = script.encode("utf-8")
    if mode == "bwrap":
        fd = os.memfd_create("rmo-sandbox-script")
        try:
            with open(fd, "wb", closefd=False) as fh:  # buffered write: never partial
                fh.write(source)
            os.lseek(fd, 0, os.SEEK_SET)
            yield _bwrap_argv(fd), None, {}, (fd,)
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="rmo-sandbox-") as workdir:
        with open(os.path.join(workdir, "main.py"), "wb") as fh:
            fh.write(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        yield [_python(), "-I", "-S", "main.py"], workdir, env, ()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
