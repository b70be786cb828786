"""The validator's levels (SPEC §4 "Validator"; Fractal-RMO seed levels 1-5), per task kind.

A ``code`` task's candidate program goes through, in this fixed order and stopping at the
first failure:

1. ``syntax`` -- ``compile()`` in-process (parsing never executes the code).
2. ``static`` -- ruff with rules for real errors only (:data:`RUFF_SELECT`: undefined names,
   redefinitions, invalid comparisons, statements outside their context), never style.
3. ``security`` -- bandit; findings at or above ``bandit_severity`` (HIGH, per SPEC) fail.
4. ``tests`` -- the task's HumanEval-style ``check(candidate)`` run in the sandbox
   (:mod:`agents.sandbox`), each assert counted separately.
5. ``performance`` -- the wall and CPU time of that same test run against the request's
   ``time_limit_ms``.

A ``json`` task's answer (SPEC §4 "external validation") goes through :data:`JSON_LEVELS`:

1. ``json`` -- the answer is one JSON document: bare, or the first ```` ```json ```` (or
   bare ```` ``` ````) fenced block of a longer answer; NaN and Infinity are not JSON.
2. ``schema`` -- Draft 2020-12 validation against the task's JSON Schema, ``format``
   keywords asserted (jsonschema's format checker); each error names its path (``$.age``).
   ``$ref`` resolves only inside the schema: nothing is fetched.
3. ``expected`` -- each of the task's expected fields equals the answer's, as JSON values
   (``true`` is not ``1``; ``1`` equals ``1.0``). A key is a field name, else a dotted path
   (``address.city``, ``items.0.id``: list indices as numbers).

A ``text`` task's answer goes through one level, ``text``, running every check the task
gives: ``expected`` (equal once whitespace runs are collapsed to one space and the ends
trimmed; case matters), ``must_match`` (``re.search`` on the answer as it is) and
``must_contain`` (each substring, whitespace-normalised on both sides). A text task with
none of them runs no level: its outcome is *unverified* (``verified`` and ``passed``
False), neither a pass nor a failure.

The json and text levels always run (``ValidatorConfig.levels`` selects among the code
levels): without them a json or text answer would pass unchecked. A request whose checks
run a regular expression -- ``must_match``, or a schema with ``pattern`` /
``patternProperties`` -- runs them in a child process, each request limited to
``check_timeout_s``: Python's ``re`` backtracks, so a producer's pattern on a provider's
answer can take practically forever, and it must not stall the stage. The others run
in-process.

Work is batched for speed: ruff and bandit each run once per :func:`validate_batch` call
over a temp dir holding one file per request, the test runs share a semaphore of
``max_concurrency`` sandboxes, and one child process runs a batch's regex-bearing checks.

Failure categories (``models.events.ErrorCategory``): SyntaxError -> SYNTAX; ruff finding
-> LOGIC; bandit finding -> SECURITY; failed assert -> LOGIC; exception -> RUNTIME; wall
timeout or CPU limit -> TIMEOUT; over the time limit -> PERFORMANCE; json, schema and
expected failures -> SCHEMA; text check failures -> LOGIC; checks over
``check_timeout_s`` -> TIMEOUT.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import signal
import string
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from jsonschema import Draft202012Validator

from agents.sandbox import SandboxResult, SandboxSetting, arun_python, resolve_mode
from models.events import ErrorCategory, TaskKind, ValidationLevel

#: The code levels in the order they run (SPEC §4).
LEVELS: tuple[str, ...] = ("syntax", "static", "security", "tests", "performance")
#: The json levels in the order they run.
JSON_LEVELS: tuple[str, ...] = ("json", "schema", "expected")
#: The one level of text tasks.
TEXT_LEVEL = "text"
#: ruff rules that flag code that is wrong, not merely unidiomatic: syntax errors (E9),
#: invalid comparisons such as ``is`` with a literal (F63), statements outside their
#: context (F7), undefined/redefined names (F82x, F811).
RUFF_SELECT: tuple[str, ...] = ("F821", "F811", "F823", "E9", "F63", "F7", "F82")
#: bandit tests skipped by default. B324 (md5/sha1 "for security") is about cryptographic
#: misuse, not about what the program does to the host, and a task may ask for MD5
#: (HumanEval/162's canonical solution is flagged HIGH otherwise).
BANDIT_SKIP: tuple[str, ...] = ("B324",)
#: At most this many findings of one level are reported as failures (the first ones).
MAX_FAILURES_PER_LEVEL = 5
#: Wall-clock limit for one ruff or bandit run over a whole batch, in seconds.
_TOOL_TIMEOUT_S = 300.0
_SEVERITY_RANK = {"LOW": 1, "MEDIUM": 2, "HIGH": 3}
#: Name under which the instrumented test reports each assert's outcome (see _HARNESS).
_RECORDER = "__rmo_record"
_MESSAGE_CAP = 500

Severity = Literal["LOW", "MEDIUM", "HIGH"]


class ValidatorToolError(RuntimeError):
    """ruff or bandit could not check the batch (crashed, timed out, unreadable output)."""


@dataclass(frozen=True)
class ValidationRequest:
    """One candidate to validate.

    ``key``: the caller's id (task id), echoed in the outcome. ``code``: the full candidate
    module (for HumanEval, prompt + completion, defining ``entry_point``). ``test``:
    HumanEval-style source defining ``check(candidate)``; ``None`` means no tests.
    ``time_limit_ms``: the performance level's budget for the test run's wall and CPU time.
    ``kind``: ``"code"`` (the fields above), ``"json"`` or ``"text"``: then ``code`` is the
    answer and the kind's fields (as in ``models.events.TaskSubmitted``) say what to check:
    ``json_schema`` (a JSON Schema; a json request without one fails the schema level) and
    ``expected`` (json: field values; text: the answer), ``must_match`` and ``must_contain``.
    """

    key: str
    code: str
    entry_point: str | None
    test: str | None
    time_limit_ms: float = 5000.0
    kind: TaskKind = "code"
    json_schema: dict[str, Any] | None = None
    expected: Any = None
    must_match: str | None = None
    must_contain: Sequence[str] | None = None


@dataclass(frozen=True)
class ValidationFailure:
    """Why a level failed: ``category`` for ``ErrorLogged``, ``error_type`` such as
    ``"SyntaxError"``, ``"AssertionError"``, ``"ruff:F821"``, ``"bandit:B602"``, ``"Timeout"``,
    and a human-readable ``message`` (with the line, where one is known)."""

    category: ErrorCategory
    error_type: str
    message: str


@dataclass(frozen=True)
class ValidationOutcome:
    """The validator's verdict on one request.

    ``levels``: only the levels that ran, in order; the last failed unless all passed.
    ``tests_passed``/``tests_total``: counted asserts of ``check`` (0/0 without tests, and
    for json and text tasks).
    ``duration_ms``: wall time from the start of the batch until this request's verdict,
    in ms (batched work is shared, so per-request cost is not separable).
    ``failures``: the failing level's failures (at most :data:`MAX_FAILURES_PER_LEVEL`).
    ``verified``: False when nothing could check the answer (a text task without checks):
    then ``passed`` is False, ``levels`` and ``failures`` are empty.
    """

    key: str
    levels: list[ValidationLevel]
    passed: bool
    tests_passed: int
    tests_total: int
    duration_ms: float
    failures: list[ValidationFailure]
    verified: bool = True


@dataclass(frozen=True)
class ValidatorConfig:
    """Which levels run and how the tests are sandboxed.

    ``levels``: names from :data:`LEVELS` to run (they always run in :data:`LEVELS` order).
    ``sandbox``: ``"bwrap"`` or ``"auto"`` (the bwrap sandbox; :func:`validate_batch`
    raises where it cannot run, never falling back) | ``"subprocess"`` (opted-in reduced
    isolation, warned) | ``"off"`` (runs no candidate code: tests and performance are
    skipped, for benchmarks), see :func:`agents.sandbox.resolve_mode`. ``timeout_s``: wall
    timeout per test run in s; ``cpu_s``: RLIMIT_CPU in s; ``memory_mb``: RLIMIT_AS in MiB;
    ``max_concurrency``: sandboxes in flight. ``ruff_select``: the static level's ruff rules.
    ``bandit_severity``: the lowest bandit severity that fails the security level (SPEC:
    HIGH); ``bandit_skip``: bandit test ids not run (:data:`BANDIT_SKIP`).
    ``check_timeout_s``: wall limit in s of one json or text request's checks when they
    run a regular expression (in the checker child process). Raises ``ValueError`` on an
    unknown level, sandbox or severity, or a limit that is not positive.
    """

    levels: tuple[str, ...] = LEVELS
    sandbox: SandboxSetting = "bwrap"
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    max_concurrency: int = 4
    ruff_select: tuple[str, ...] = RUFF_SELECT
    bandit_severity: Severity = "HIGH"
    bandit_skip: tuple[str, ...] = BANDIT_SKIP
    check_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        unknown = set(self.levels) - set(LEVELS)
        if unknown:
            raise ValueError(f"unknown validation levels {sorted(unknown)}; known: {LEVELS}")
        if self.sandbox not in get_args(SandboxSetting):
            raise ValueError(f"unknown sandbox {self.sandbox!r}")
        if self.bandit_severity not in _SEVERITY_RANK:
            raise ValueError(f"unknown bandit severity {self.bandit_severity!r}")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not self.check_timeout_s > 0:
            raise ValueError("check_timeout_s must be > 0")


@dataclass
class _Progress:
    """Mutable per-request state while the batch moves through the levels."""

    request: ValidationRequest
    levels: list[ValidationLevel] = field(default_factory=list)
    failures: list[ValidationFailure] = field(default_factory=list)
    tests_passed: int = 0
    tests_total: int = 0
    done_at: float | None = None
    verified: bool = True

    @property
    def alive(self) -> bool:
        return self.done_at is None

    def passed_level(self, level: str, details: str = "") -> None:
        self.levels.append(ValidationLevel(level=level, passed=True, details=details))

    def failed_level(self, level: str, details: str, failures: list[ValidationFailure]) -> None:
        first = failures[0] if failures else None
        self.levels.append(ValidationLevel(level=level, passed=False, details=details,
                                           error_type=first.error_type if first else None,
                                           message=first.message if first else ""))
        self.failures = failures[:MAX_FAILURES_PER_LEVEL]
        self.done_at = time.perf_counter()


async def validate_batch(
    requests: list[ValidationRequest], config: ValidatorConfig
) -> list[ValidationOutcome]:
    """Validate every request through the configured levels; outcomes in request order.

    Raises :class:`ValidatorToolError` if ruff, bandit or the checker child process cannot
    check the batch and :class:`agents.sandbox.SandboxUnavailable` if the configured sandbox
    cannot run. A candidate that fails, crashes or hangs is never an error: it is a failed
    outcome.
    """
    started = time.perf_counter()
    progress = [_Progress(r) for r in requests]
    enabled = set(config.levels)
    code_tasks = [p for p in progress if p.request.kind == "code"]

    if "syntax" in enabled:
        for p in code_tasks:
            _check_syntax(p)
    await _check_static_and_security([p for p in code_tasks if p.alive], enabled, config)
    await asyncio.gather(
        _check_tests_and_performance([p for p in code_tasks if p.alive], enabled, config),
        _check_kinds([p for p in progress if p.request.kind != "code"], config),
    )

    finished = time.perf_counter()
    return [
        ValidationOutcome(
            key=p.request.key,
            levels=p.levels,
            passed=p.verified and not p.failures,
            tests_passed=p.tests_passed,
            tests_total=p.tests_total,
            duration_ms=((p.done_at or finished) - started) * 1000.0,
            failures=p.failures,
            verified=p.verified,
        )
        for p in progress
    ]


# --------------------------------------------------------------------------- syntax


def _check_syntax(p: _Progress) -> None:
    try:
        compile(p.request.code, "<candidate>", "exec", dont_inherit=True)
    except SyntaxError as exc:  # includes IndentationError and TabError
        message = f"line {exc.lineno}: {exc.msg}" if exc.lineno else exc.msg
        p.failed_level("syntax", message, [_failure("SYNTAX", type(exc).__name__, message)])
    except (ValueError, RecursionError, MemoryError) as exc:
        # Null bytes (ValueError) or nesting too deep for the parser: not a valid program.
        message = str(exc) or type(exc).__name__
        p.failed_level("syntax", message, [_failure("SYNTAX", type(exc).__name__, message)])
    else:
        p.passed_level("syntax")


# --------------------------------------------------------------------------- static, security


async def _check_static_and_security(
    tasks: list[_Progress], enabled: set[str], config: ValidatorConfig
) -> None:
    """One ruff and one bandit run over a temp dir holding ``<index>.py`` per task."""
    run_static = "static" in enabled
    run_security = "security" in enabled
    if not tasks or not (run_static or run_security):
        return
    with tempfile.TemporaryDirectory(prefix="rmo-validate-") as tmp:
        root = Path(tmp)
        for index, p in enumerate(tasks):
            (root / f"{index}.py").write_text(p.request.code, encoding="utf-8")
        # Both tools only parse the code, so they run concurrently; bandit's verdict on a
        # task that fails static is simply never recorded (stop at first failure).
        static_findings, security_findings = await asyncio.gather(
            _ruff(root, config.ruff_select) if run_static else _no_findings(),
            _bandit(root, config.bandit_severity, config.bandit_skip)
            if run_security else _no_findings(),
        )
    for index, p in enumerate(tasks):
        if run_static:
            found = static_findings.get(index, [])
            if found:
                p.failed_level("static", f"{len(found)} ruff finding(s)", found)
                continue
            p.passed_level("static", f"ruff {','.join(config.ruff_select)}")
        if run_security:
            found = security_findings.get(index, [])
            if found:
                p.failed_level("security", f"{len(found)} bandit finding(s)", found)
                continue
            p.passed_level("security", f"bandit: nothing at or above {config.bandit_severity}")


async def _no_findings() -> dict[int, list[ValidationFailure]]:
    return {}


async def _ruff(root: Path, select: tuple[str, ...]) -> dict[int, list[ValidationFailure]]:
    """ruff findings by file index. ``--isolated`` ignores any project config and
    ``--ignore-noqa`` stops a candidate from silencing a finding with a comment."""
    stdout = await _run_tool(
        "ruff",
        ["check", "--isolated", "--no-cache", "--ignore-noqa", "--output-format", "json",
         # The sandbox's Python: syntax newer than ruff's default target is not an error.
         "--target-version", f"py{sys.version_info.major}{sys.version_info.minor}",
         "--select", ",".join(select), str(root)],
    )
    findings: dict[int, list[ValidationFailure]] = {}
    for item in _load_json(stdout, "ruff"):
        row = item.get("location", {}).get("row")
        message = f"line {row}: {item['message']}"
        code = item.get("code") or "invalid-syntax"  # parse errors carry no rule code
        findings.setdefault(int(Path(item["filename"]).stem), []).append(
            _failure("LOGIC", f"ruff:{code}", message)
        )
    return findings


async def _bandit(
    root: Path, severity: Severity, skip: tuple[str, ...]
) -> dict[int, list[ValidationFailure]]:
    """bandit findings at or above ``severity`` by file index, tests in ``skip`` not run.
    ``--ignore-nosec`` stops a candidate from silencing a finding with a ``# nosec``."""
    args = ["-r", "-q", "-f", "json", "--ignore-nosec", str(root)]
    if skip:
        args += ["--skip", ",".join(skip)]
    stdout = await _run_tool("bandit", args)
    report = _load_json(stdout, "bandit")
    floor = _SEVERITY_RANK[severity]
    findings: dict[int, list[ValidationFailure]] = {}
    for item in report.get("results", []):
        if _SEVERITY_RANK.get(item["issue_severity"], 0) < floor:
            continue
        message = (f"line {item['line_number']}: {item['issue_text']} "
                   f"(severity {item['issue_severity']}, confidence {item['issue_confidence']})")
        findings.setdefault(int(Path(item["filename"]).stem), []).append(
            _failure("SECURITY", f"bandit:{item['test_id']}", message)
        )
    for item in report.get("errors", []):
        # A file bandit could not scan fails closed rather than passing unchecked.
        findings.setdefault(int(Path(item["filename"]).stem), []).append(
            _failure("SECURITY", "bandit:ScanError", str(item.get("reason", "")))
        )
    return findings


async def _run_tool(module: str, args: list[str]) -> str:
    """Run ``python -m <module> <args>`` and return its stdout.

    Exit status 0 and 1 both mean "checked" (1: findings). Raises
    :class:`ValidatorToolError` on any other status or after :data:`_TOOL_TIMEOUT_S` s.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), _TOOL_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ValidatorToolError(f"{module} timed out after {_TOOL_TIMEOUT_S} s") from None
    if proc.returncode not in (0, 1):
        raise ValidatorToolError(
            f"{module} exited with status {proc.returncode}: {stderr.decode()[-_MESSAGE_CAP:]}"
        )
    return stdout.decode("utf-8", errors="replace")


def _load_json(text: str, tool: str) -> dict | list:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidatorToolError(f"{tool} printed unreadable JSON: {exc}") from exc


# --------------------------------------------------------------------------- tests, performance


@dataclass(frozen=True)
class _Unit:
    """One counted test: a top-level statement of ``check`` that contains an assert."""

    lineno: int
    source: str


@dataclass(frozen=True)
class _InstrumentedTest:
    source: str
    units: list[_Unit]


class _InvalidTestError(ValueError):
    """The task's test cannot be instrumented: unparsable or without ``check``."""


def _instrument_test(test: str) -> _InstrumentedTest:
    """Rewrite a HumanEval test so each assert in ``check`` is guarded and reported.

    Every top-level statement of ``check`` that contains an ``assert`` (a bare assert, or a
    loop or block of asserts) becomes one counted unit, wrapped in ``try`` so a failure is
    recorded and the next unit still runs. ``assert True`` placeholders (constant tests,
    48 of them in HumanEval) are not tests of the candidate and are not counted. A ``check``
    without any counted assert is one unit as a whole. Other statements (imports, setup)
    run unguarded: an exception there ends the run as a RUNTIME error.

    Raises :class:`_InvalidTestError` if the test does not parse or defines no ``check``.
    """
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError) as exc:
        raise _InvalidTestError(f"test does not parse: {exc}") from exc
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        raise _InvalidTestError("test defines no check(candidate) function")
    check = checks[-1]  # the last definition is the one Python binds
    units: list[_Unit] = []
    for position, stmt in enumerate(check.body):
        if _is_test_statement(stmt):
            units.append(_Unit(stmt.lineno, (ast.get_source_segment(test, stmt) or "")[:200]))
            check.body[position] = _guard([stmt], len(units) - 1)
    if not units:
        units.append(_Unit(check.lineno, "check(candidate) as a whole"))
        check.body = [_guard(check.body, 0)]
    return _InstrumentedTest(ast.unparse(ast.fix_missing_locations(tree)), units)


def _is_test_statement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return False
    if isinstance(stmt, ast.Assert):
        return not isinstance(stmt.test, ast.Constant)
    return any(isinstance(node, ast.Assert) for node in ast.walk(stmt))


def _guard(body: list[ast.stmt], unit: int) -> ast.Try:
    """``try: <body> except BaseException as e: record(unit, e) else: record(unit, None)``."""

    def record(outcome: ast.expr) -> ast.stmt:
        call = ast.Call(ast.Name(_RECORDER, ast.Load()), [ast.Constant(unit), outcome], [])
        return ast.Expr(call)

    handler = ast.ExceptHandler(
        type=ast.Name("BaseException", ast.Load()),
        name="__rmo_exc",
        body=[record(ast.Name("__rmo_exc", ast.Load()))],
    )
    return ast.Try(body=body, handlers=[handler], orelse=[record(ast.Constant(None))],
                   finalbody=[])


# The script run in the sandbox. Result lines (JSON) go to a private duplicate of stdout;
# fd 1 is then pointed at stderr, so whatever the candidate prints cannot be mistaken for a
# result. The candidate and the test share one namespace, as in HumanEval's own harness
# (tests may call helpers defined by the prompt). ``__name__`` is not "__main__", so a
# candidate's ``if __name__ == "__main__":`` block (often reading input()) does not run.
_HARNESS = string.Template("""\
import json as _json, os as _os

_results = _os.fdopen(_os.dup(1), "w", buffering=1)
_os.dup2(2, 1)


def _emit(**fields):
    _results.write(_json.dumps(fields) + "\\n")


def _describe(exc):
    return [type(exc).__name__, str(exc)[:$cap]]


def _record(unit, exc):
    _emit(unit=unit, ok=exc is None, error=None if exc is None else _describe(exc))


_ns = {"__name__": "__candidate__", $recorder: _record}
_stage = "candidate"
try:
    exec(compile($code, "<candidate>", "exec"), _ns)
    _stage = "test"
    exec(compile($test, "<test>", "exec"), _ns)
    _stage = "entry_point"
    if $entry_point not in _ns:
        raise NameError("entry point %r is not defined" % $entry_point)
    _stage = "check"
    _ns["check"](_ns[$entry_point])
except BaseException as _exc:
    _emit(fatal=_describe(_exc), stage=_stage)
else:
    _emit(done=True)
""")


async def _check_tests_and_performance(
    tasks: list[_Progress], enabled: set[str], config: ValidatorConfig
) -> None:
    run_tests = "tests" in enabled
    run_performance = "performance" in enabled
    with_tests = []
    for p in tasks:
        if p.request.test:
            with_tests.append(p)
        elif run_tests:
            p.passed_level("tests", "no tests")
    if not with_tests or not (run_tests or run_performance):
        return
    mode = resolve_mode(config.sandbox)
    if mode is None:  # "off": nothing runs candidate code
        return
    semaphore = asyncio.Semaphore(config.max_concurrency)
    # every harness is built before any sandbox starts: building one takes ~1.5 ms of the event
    # loop, and a loop busy building would notice finished runs late, inflating their wall time
    # past the performance limit (seen with batches of ~1,800 answers)
    prepared: list[tuple[_Progress, _InstrumentedTest, str]] = []
    for p in with_tests:
        assert p.request.test is not None  # only requests with tests reach here
        try:
            instrumented = _instrument_test(p.request.test)
        except _InvalidTestError as exc:
            p.failed_level("tests", str(exc), [_failure("RUNTIME", "InvalidTest", str(exc))])
            continue
        prepared.append((p, instrumented, _HARNESS.substitute(
            code=repr(p.request.code),
            test=repr(instrumented.source),
            entry_point=repr(p.request.entry_point or ""),
            recorder=repr(_RECORDER),
            cap=_MESSAGE_CAP,
        )))

    async def one(p: _Progress, instrumented: _InstrumentedTest, script: str) -> None:
        async with semaphore:
            result = await arun_python(script, timeout_s=config.timeout_s, cpu_s=config.cpu_s,
                                       memory_mb=config.memory_mb, mode=mode)
        p.tests_total = len(instrumented.units)
        if run_tests:
            _judge_tests(p, instrumented.units, result)
        if run_performance and p.alive:
            _judge_performance(p, result)

    await asyncio.gather(*(one(*x) for x in prepared))


def _judge_tests(p: _Progress, units: list[_Unit], result: SandboxResult) -> None:
    """Record the tests level from the harness's result lines and the run's fate."""
    outcomes: dict[int, list[str] | None] = {}
    terminal: dict | None = None
    for line in result.stdout.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. the truncation marker of a huge output
        if not isinstance(event, dict):
            continue
        if "unit" in event and isinstance(event["unit"], int) and 0 <= event["unit"] < len(units):
            outcomes[event["unit"]] = None if event.get("ok") else event.get("error")
        elif "done" in event or "fatal" in event:
            terminal = event
    p.tests_passed = sum(1 for error in outcomes.values() if error is None)
    details = f"{p.tests_passed}/{len(units)} asserts passed"

    failure: ValidationFailure | None = None
    if result.timed_out:
        what = "wall timeout" if result.returncode is None else "CPU time limit"
        failure = _failure("TIMEOUT", "Timeout",
                           f"killed by the {what} after {result.wall_ms:.0f} ms wall, "
                           f"{result.cpu_ms:.0f} ms CPU; {details}")
    elif terminal is None:
        # No final line: the process died outright (os._exit, signal, interpreter crash).
        error_type = "MemoryError" if result.memory_exceeded else (
            f"Signal{result.signal}" if result.signal else "NoResult")
        failure = _failure("RUNTIME", error_type,
                           f"test run ended without a result (status {result.returncode}): "
                           f"{result.stderr.strip()[-_MESSAGE_CAP:]}")
    elif "fatal" in terminal:
        error_type, message = _pair(terminal.get("fatal"))
        where = {"candidate": "while loading the candidate", "test": "while loading the test",
                 "entry_point": "looking up the entry point",
                 "check": "in check() outside the asserts"}.get(terminal.get("stage"), "")
        failure = _failure("RUNTIME", error_type, f"{where}: {message}")
    else:
        for index, unit in enumerate(units):
            if index not in outcomes:
                failure = _failure("RUNTIME", "NotRun", f"assert at test line {unit.lineno} "
                                   "did not report")
                break
            error = outcomes[index]
            if error is not None:
                error_type, message = _pair(error)
                category: ErrorCategory = "LOGIC" if error_type == "AssertionError" else "RUNTIME"
                failure = _failure(category, error_type,
                                   f"test line {unit.lineno}: {unit.source}"
                                   + (f" -> {message}" if message else ""))
                break
    if failure is None:
        p.passed_level("tests", details)
    else:
        p.failed_level("tests", details, [failure])


def _judge_performance(p: _Progress, result: SandboxResult) -> None:
    """Wall and CPU time of the test run (sandbox start-up included) against the limit."""
    limit = p.request.time_limit_ms
    details = f"wall {result.wall_ms:.1f} ms, cpu {result.cpu_ms:.1f} ms, limit {limit:.0f} ms"
    if result.timed_out:
        # Only reached when the tests level is off: the run never finished.
        p.failed_level("performance", details,
                       [_failure("TIMEOUT", "Timeout", f"killed after {details}")])
    elif result.wall_ms > limit or result.cpu_ms > limit:
        p.failed_level("performance", details,
                       [_failure("PERFORMANCE", "TimeLimitExceeded", details)])
    else:
        p.passed_level("performance", details)


# --------------------------------------------------------------------------- json, text


@dataclass(frozen=True)
class _LevelVerdict:
    """One json or text level's verdict: passed when ``failures`` is empty."""

    level: str
    details: str
    failures: list[ValidationFailure]


#: The first fenced block of an answer: ```json (any case) or a bare ``` fence.
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
#: Schema keywords whose value is a regular expression applied to the answer.
_REGEX_KEYWORDS = frozenset({"pattern", "patternProperties"})
#: Where the checker child looks for this package (the checkout this module is in).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
#: Wall allowance in s for the checker child to start (it imports this module: ~0.4 s).
_CHECKER_STARTUP_S = 30.0
_CHECKER = ("import sys; sys.path.insert(0, {root!r}); "
            "from agents.validation import _serve_kind_checks; _serve_kind_checks()")


async def _check_kinds(tasks: list[_Progress], config: ValidatorConfig) -> None:
    """Record the json or text levels of ``tasks``: regex-bearing ones in one checker child
    process (:func:`_run_checker`), the others in-process."""
    isolated = []
    for p in tasks:
        r = p.request
        if r.kind == "text" and r.expected is None and r.must_match is None and not r.must_contain:
            p.verified = False  # nothing to check the answer against: no level runs
            p.done_at = time.perf_counter()
        elif r.must_match is not None or _has_regex_keyword(r.json_schema):
            isolated.append(p)
        else:
            _record(p, _kind_levels(**_job(r)), timed_out=False, config=config)
    if isolated:
        results = await _run_checker([_job(p.request) for p in isolated], config.check_timeout_s)
        for p, (verdicts, timed_out) in zip(isolated, results):
            _record(p, iter(verdicts), timed_out, config)


def _job(r: ValidationRequest) -> dict[str, Any]:
    """The arguments of :func:`_kind_levels` for ``r`` (JSON, so the child can take them)."""
    return {"kind": r.kind, "answer": r.code, "json_schema": r.json_schema,
            "expected": r.expected, "must_match": r.must_match,
            "must_contain": list(r.must_contain) if r.must_contain is not None else None}


def _record(p: _Progress, verdicts: Iterator[_LevelVerdict], timed_out: bool,
            config: ValidatorConfig) -> None:
    """Record ``verdicts`` (stopping at the first failure); a request whose checks ran out of
    time fails the level after the last one it finished."""
    order = JSON_LEVELS if p.request.kind == "json" else (TEXT_LEVEL,)
    done = 0
    for v in verdicts:
        done += 1
        if v.failures:
            p.failed_level(v.level, v.details, v.failures)
            return
        p.passed_level(v.level, v.details)
    if timed_out:
        level = order[min(done, len(order) - 1)]
        message = (f"the {level} checks did not finish within {config.check_timeout_s:g} s "
                   "(a regular expression that backtracks without end?)")
        p.failed_level(level, "timed out", [_failure("TIMEOUT", "Timeout", message)])
    else:
        p.done_at = time.perf_counter()


def _has_regex_keyword(schema: object) -> bool:
    """Whether a JSON Schema holds a regex keyword anywhere (a property merely named
    ``pattern`` counts too: isolating a request needlessly only costs time). Iterative, so
    no nesting depth can make it raise."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if _REGEX_KEYWORDS & node.keys():
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _kind_levels(kind: str, answer: str, json_schema: dict[str, Any] | None, expected: Any,
                 must_match: str | None, must_contain: list[str] | None) -> Iterator[_LevelVerdict]:
    """The json or text levels of one answer, in order, each yielded as soon as it is
    decided; the caller stops after the first failure. Pure: the same arguments always
    give the same verdicts (what lets the child process and the stage agree)."""
    if kind == "text":
        yield _text_level(answer, expected, must_match, must_contain)
        return
    document, parsed = _json_level(answer)
    yield parsed
    if parsed.failures:
        return
    schema_verdict = _schema_level(document, json_schema)
    yield schema_verdict
    if schema_verdict.failures or expected is None:
        return
    yield _expected_level(document, expected)


def _json_level(answer: str) -> tuple[Any, _LevelVerdict]:
    """``(document, verdict)``: the answer parsed, bare or from its first fenced block."""
    try:
        document = _strict_json(answer.strip())
        return document, _LevelVerdict("json", f"a JSON {_json_type(document)}", [])
    except ValueError as bare:
        fence = _FENCE.search(answer)
        problem = f"the answer is not a JSON document: {_decode_error(bare)}"
    if fence is not None:
        try:
            document = _strict_json(fence.group(1).strip())
            return document, _LevelVerdict(
                "json", f"a JSON {_json_type(document)} in a fenced block", [])
        except ValueError as exc:
            problem = f"the answer's fenced block is not a JSON document: {_decode_error(exc)}"
    return None, _LevelVerdict("json", "not JSON", [_failure("SCHEMA", "JSONDecodeError", problem)])


def _strict_json(text: str) -> Any:
    """``json.loads`` without NaN/Infinity (not JSON). Raises ValueError, also for nesting
    too deep to parse."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _decode_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    return str(exc)


def _json_type(value: Any) -> str:
    """The JSON Schema type name of a parsed value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}
    return names.get(type(value), type(value).__name__)


def _schema_level(document: Any, schema: dict[str, Any] | None) -> _LevelVerdict:
    """Draft 2020-12 validation, formats asserted; every error at its path (``$.a[0]``),
    the first :data:`MAX_FAILURES_PER_LEVEL` in path order."""
    if schema is None:
        # only a task event written without the schema gets here (TaskSubmitted requires it)
        return _LevelVerdict("schema", "no schema", [_failure(
            "SCHEMA", "MissingSchema", "field 'schema': the task carries no JSON Schema")])
    try:
        validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        errors = sorted(validator.iter_errors(document), key=lambda e: _json_path(e.absolute_path))
    except RecursionError:
        return _LevelVerdict("schema", "not checked", [_failure(
            "SCHEMA", "SchemaError", "the answer or the schema is nested too deeply to check")])
    except TimeoutError:  # the checker child's alarm: the job's time is up
        raise
    except Exception as exc:  # noqa: BLE001 - a producer's schema fails its task, never the stage
        # e.g. a $ref that does not resolve inside the schema (nothing is fetched)
        return _LevelVerdict("schema", "not checked", [_failure(
            "SCHEMA", "SchemaError", f"the schema cannot be applied: {exc or type(exc).__name__}")])
    if not errors:
        return _LevelVerdict("schema", "valid (Draft 2020-12)", [])
    failures = [_failure("SCHEMA", f"schema:{e.validator}",
                         f"at {_json_path(e.absolute_path)}: {e.message}")
                for e in errors[:MAX_FAILURES_PER_LEVEL]]
    return _LevelVerdict("schema", f"{len(errors)} schema error(s)", failures)


def _expected_level(document: Any, expected: Any) -> _LevelVerdict:
    """Each expected field (name, else dotted path) equal to the answer's, as JSON values."""
    if not isinstance(expected, dict):
        message = f"field 'expected': for kind json an object, got {_json_type(expected)}"
        return _LevelVerdict("expected", "not checked",
                             [_failure("SCHEMA", "InvalidExpected", message)])
    failures = []
    for key, want in expected.items():
        found, got, path = _lookup(document, str(key))
        if not found:
            failures.append(_failure("SCHEMA", "MissingField",
                                     f"at {path}: missing (expected {_shown(want)})"))
            continue
        try:
            equal = _json_equal(got, want)
        except RecursionError:
            equal = False  # nested deeper than Python recurses: not provably equal
        if not equal:
            failures.append(_failure("SCHEMA", "UnexpectedValue",
                                     f"at {path}: expected {_shown(want)}, got {_shown(got)}"))
    equal = len(expected) - len(failures)
    return _LevelVerdict("expected", f"{equal}/{len(expected)} expected fields equal",
                         failures[:MAX_FAILURES_PER_LEVEL])


def _lookup(document: Any, key: str) -> tuple[bool, Any, str]:
    """``(found, value, path)`` of an expected key: a field of the answer object named
    ``key``, else the dotted path ``key`` (object fields, list indices as decimal numbers).
    ``path`` is where the lookup ended, as a JSON path."""
    if isinstance(document, dict) and key in document:
        return True, document[key], _json_path([key])
    node, parts = document, []
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
            parts.append(part)
        elif isinstance(node, list) and part.isdecimal() and int(part) < len(node):
            node = node[int(part)]
            parts.append(int(part))
        else:
            return False, None, _json_path([*parts, part])
    return True, node, _json_path(parts)


def _json_path(parts: Sequence[str | int]) -> str:
    """``$`` followed by ``.field`` and ``[index]`` parts (jsonschema's ``json_path`` form)."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: booleans equal only booleans (Python's ``True == 1``
    is not JSON's), numbers compare by value (``1`` equals ``1.0``), containers deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _shown(value: Any) -> str:
    """A value as compact JSON, cut to 120 characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
    return text if len(text) <= 120 else text[:117] + "..."


def _normalised(text: str) -> str:
    """Whitespace runs collapsed to one space, the ends trimmed."""
    return " ".join(text.split())


def _text_level(answer: str, expected: Any, must_match: str | None,
                must_contain: list[str] | None) -> _LevelVerdict:
    """Every configured text check on the answer (at least one is given)."""
    checks = 0
    failures = []
    normalised_answer = _normalised(answer)
    if expected is not None:
        checks += 1
        if not isinstance(expected, str):
            failures.append(_failure("LOGIC", "InvalidExpected", "field 'expected': for kind "
                                     f"text a string, got {_json_type(expected)}"))
        elif normalised_answer != _normalised(expected):
            failures.append(_failure("LOGIC", "ExpectedMismatch",
                                     f"the answer is not the expected one (whitespace normalised): "
                                     f"expected {_shown(_normalised(expected))}, "
                                     f"got {_shown(normalised_answer)}"))
    if must_match is not None:
        checks += 1
        try:
            found = re.search(must_match, answer) is not None
        except (re.error, RecursionError, OverflowError) as exc:
            failures.append(_failure("LOGIC", "InvalidPattern",
                                     f"field 'must_match': not a valid regular expression: {exc}"))
        else:
            if not found:
                failures.append(_failure("LOGIC", "NoMatch", f"must_match {_shown(must_match)}: "
                                         "no match in the answer"))
    for needle in must_contain or ():
        checks += 1
        if _normalised(needle) not in normalised_answer:
            failures.append(_failure("LOGIC", "MissingText",
                                     f"must_contain {_shown(needle)}: not in the answer"))
    details = f"{checks - len(failures)}/{checks} checks passed"
    return _LevelVerdict(TEXT_LEVEL, details, failures[:MAX_FAILURES_PER_LEVEL])


async def _run_checker(jobs: list[dict[str, Any]], timeout_s: float
                       ) -> list[tuple[list[_LevelVerdict], bool]]:
    """Run :func:`_kind_levels` on each job in one child Python process, each job limited
    to ``timeout_s`` of wall time; per job ``(verdicts, timed_out)``.

    The child (:func:`_serve_kind_checks`) reads the jobs as JSON on stdin and writes one
    JSON line per job. A child that outlives every job's allowance plus start-up is killed
    and its unreported jobs count as timed out. Raises :class:`ValidatorToolError` if the
    child ends without reporting every job for any other reason (it could not start).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", _CHECKER.format(root=_PACKAGE_ROOT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    results: dict[int, tuple[list[_LevelVerdict], bool]] = {}
    killed = False
    try:
        async with asyncio.timeout(timeout_s * len(jobs) + _CHECKER_STARTUP_S):
            # the child reads all of stdin before it writes: no pipe deadlock
            proc.stdin.write(json.dumps({"timeout_s": timeout_s, "jobs": jobs}).encode())
            await proc.stdin.drain()
            proc.stdin.close()
            while line := await proc.stdout.readline():
                try:
                    report = json.loads(line)
                    verdicts = [_LevelVerdict(v["level"], v["details"],
                                              [ValidationFailure(**f) for f in v["failures"]])
                                for v in report["levels"]]
                    results[report["job"]] = (verdicts, report["timed_out"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a dying child: its job counts as unreported
            stderr = await proc.stderr.read()
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        killed, stderr = True, b""
    if not killed and len(results) < len(jobs):
        raise ValidatorToolError(f"the json/text checker exited with status {proc.returncode} "
                                 f"after {len(results)}/{len(jobs)} jobs: "
                                 f"{stderr.decode(errors='replace')[-_MESSAGE_CAP:]}")
    return [results.get(i, ([], True)) for i in range(len(jobs))]


def _serve_kind_checks() -> None:
    """The checker child's main: jobs from stdin, one line per job to stdout
    (``{"job", "levels", "timed_out"}``). SIGALRM bounds each job: ``re`` and jsonschema
    check for signals as they run, so the alarm's exception stops a runaway match."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError

    request = json.load(sys.stdin)
    signal.signal(signal.SIGALRM, alarm)
    for index, job in enumerate(request["jobs"]):
        verdicts: list[_LevelVerdict] = []
        timed_out = False
        try:
            # disarmed inside the try: an alarm that fires as it is disarmed is still caught
            signal.setitimer(signal.ITIMER_REAL, request["timeout_s"])
            for verdict in _kind_levels(**job):
                verdicts.append(verdict)
                if verdict.failures:
                    break
            signal.setitimer(signal.ITIMER_REAL, 0)
        except TimeoutError:
            timed_out = True
        report = {"job": index, "levels": [asdict(v) for v in verdicts], "timed_out": timed_out}
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()


def _pair(value: object) -> tuple[str, str]:
    """The harness's ``[type name, message]`` pair, tolerating anything malformed."""
    if isinstance(value, list) and len(value) == 2:
        return str(value[0]), str(value[1])
    return "UnknownError", str(value)[:_MESSAGE_CAP]


def _failure(category: ErrorCategory, error_type: str, message: str) -> ValidationFailure:
    return ValidationFailure(category, error_type, message[:_MESSAGE_CAP])
