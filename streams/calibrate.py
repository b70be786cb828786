"""`rmo calibrate`: how close each sim profile's realised HumanEval pass rate comes to its
configured accuracy (issue 9; SPEC §4 "Providers").

For every sim profile of a providers file (plus two extreme profiles at accuracy 0.0 and
1.0) and every seed, the sim answers HumanEval's 164 problems as the executor would ask on a
task's first call (attempt 0, ``task_type`` from the analyzer swarm), and the project's own
validator (:func:`agents.validation.validate_batch`, configured as the validator stage
configures it: ``RMO_VALIDATOR_LEVELS``, ``RMO_SANDBOX``, ``RMO_VALIDATOR_CONCURRENCY``,
each task's ``time_limit_ms`` from the performance analyzer) judges the answers. Faults and
latency are switched off: the sim draws its answer independently of them (one random stream
per concern), so they cannot move the pass rate of the answers it does give.

The **configured accuracy** of a profile on HumanEval is the mean over the problems of
``accuracy_for(task_type)``: a scalar accuracy is itself, a per-task_type mapping is
weighted by how many problems the analyzer puts in each task type. The **realised pass
rate** of a seed is the fraction of problems whose answer the validator passed; the report
gives its mean, min and max over the seeds and the bias (mean minus configured) in
percentage points.

Identical answers to the same problem are validated once per run: most answers are the
reference solution, the same for every seed and profile.

This is a study tool, not a pipeline stage: it compares answers with the sim's answer book
to count wrong answers that passed and reference answers that failed, something no stage
may do.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

from agents.analyzers import analyze_batch
from agents.providers.answers import answer_prefix, human_eval_book, load_reference_file
from agents.providers.base import ProviderRequest
from agents.providers.registry import load_providers
from agents.providers.sim import LatencySpec, SimProvider, SimProviderConfig
from agents.validation import (
    ValidationOutcome,
    ValidationRequest,
    ValidatorConfig,
    validate_batch,
)
from models.events import TaskAnalyzed, TaskSubmitted
from streams.config import Settings
from streams.demo import humaneval_tasks

#: The issue's tolerance: realised mean within this many percentage points of configured.
TOLERANCE_POINTS = 3.0
#: The extreme profiles always measured: no right answer, and only right answers.
EXTREME_ACCURACIES: tuple[float, ...] = (0.0, 1.0)
#: Attempt number of a task's first provider call (ProviderRequest counts retries from 0).
FIRST_ATTEMPT = 0
#: Requests per validate_batch call. validate_batch instruments every test of its batch on
#: the event loop (~1.5 ms each) while the first sandboxes already run, and a run's wall
#: time lasts until the loop reaps it: in one batch of ~1,800 answers the first runs read
#: 2.4 s wall for 34 ms CPU and failed the 2 s performance level. Chunks of a demo-sized
#: batch keep that stall under 0.2 s.
VALIDATION_CHUNK = 128
_SEEDS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class CalibrationError(ValueError):
    """The run cannot measure anything meaningful (bad seeds, tests not run, no profile)."""


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-9"`` (inclusive range), ``"3"``, or a comma list of both
    (``"0-4,7"``); duplicates dropped, order kept. Raises :class:`CalibrationError`."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEEDS.match(part)
        if match is None:
            raise CalibrationError(f"--seeds {text!r}: expected e.g. 0-9, 3 or 0-4,7")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise CalibrationError(f"--seeds {text!r}: range {low}-{high} is empty")
        seeds.extend(s for s in range(low, high + 1) if s not in seeds)
    return seeds


def sim_profiles(path: Path | None,
                 extremes: bool = True) -> tuple[list[SimProviderConfig], list[str]]:
    """The sim profiles of the providers file at ``path`` (None: the shipped defaults), then
    the extreme profiles ``accuracy-0`` and ``accuracy-1`` when ``extremes``; and the ids of
    the file's providers that are not sims (not measured: they would make real calls).

    Raises :class:`agents.providers.registry.ProviderConfigError` for a bad file and
    :class:`CalibrationError` when nothing is left to measure.
    """
    configs: list[SimProviderConfig] = []
    skipped: list[str] = []
    for provider in load_providers(path).values():
        if isinstance(provider, SimProvider):
            configs.append(provider.config)
        else:
            skipped.append(provider.id)
    if extremes:
        taken = {c.id for c in configs}
        for accuracy in EXTREME_ACCURACIES:
            profile_id = f"accuracy-{accuracy:g}"
            if profile_id not in taken:
                configs.append(SimProviderConfig(id=profile_id, model="grok-4", accuracy=accuracy))
    if not configs:
        raise CalibrationError(f"{path}: no sim provider to calibrate ({', '.join(skipped)} "
                               "are not sims); drop --no-extremes or pass a file with sims")
    return configs, skipped


@dataclass(frozen=True)
class ProfileCalibration:
    """One profile's figures. Rates are fractions of the problems (0-1), one per seed in
    ``CalibrationReport.seeds`` order; ``bias_points`` is (mean - expected) x 100.
    ``wrong_passed``: answers other than the reference solution that the validator passed,
    over all seeds; ``right_failed``: reference answers it failed, and ``right_failures``
    why (one line per distinct problem: task id, failed level, its message).
    ``expected_by_type``: task_type -> (problems, accuracy)."""

    provider: str
    expected: float
    rates: list[float]
    mean: float
    min: float
    max: float
    bias_points: float
    within_tolerance: bool
    wrong_passed: int
    right_failed: int
    right_failures: list[str] = field(default_factory=list)
    expected_by_type: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Within tolerance, no wrong answer passed and no reference answer failed."""
        return self.within_tolerance and self.wrong_passed == 0 and self.right_failed == 0


@dataclass(frozen=True)
class CalibrationReport:
    """A whole run: ``problems`` HumanEval problems x ``seeds`` per profile; ``validated``
    distinct (problem, answer) pairs went through the validator; ``duration_s`` wall time
    of the run in s; ``skipped``: providers of the file that are not sims."""

    problems: int
    seeds: list[int]
    attempt: int
    tolerance_points: float
    sandbox: str
    levels: list[str]
    validated: int
    duration_s: float
    profiles: list[ProfileCalibration]
    skipped: list[str]

    @property
    def ok(self) -> bool:
        """Every profile :attr:`ProfileCalibration.ok`."""
        return all(p.ok for p in self.profiles)

    def to_dict(self) -> dict:
        """JSON-ready form (every field, plus ``ok`` per profile and overall)."""
        out = asdict(self)
        for profile, data in zip(self.profiles, out["profiles"]):
            data["ok"] = profile.ok
        out["ok"] = self.ok
        return out


def expected_accuracy(config: SimProviderConfig, task_types: Sequence[str]) -> float:
    """The configured accuracy of ``config`` on problems of these task types: the mean of
    ``accuracy_for(task_type)`` over them (one entry per problem)."""
    return fmean(config.accuracy_for(t) for t in task_types)


def _time_limit_ms(analysis: TaskAnalyzed) -> float:
    # As the executor puts it on TaskExecuted (agents.executor._time_limit): the first
    # analyzer feature that sets it, else the validator's default.
    for result in analysis.analyses:
        if "time_limit_ms" in result.features:
            return float(result.features["time_limit_ms"])
    return ValidationRequest.time_limit_ms


def _why(task_id: str, outcome: ValidationOutcome) -> str:
    failed = next((level for level in outcome.levels if not level.passed), None)
    if failed is None:
        return f"{task_id}: passed"
    why = failed.message or failed.details
    return f"{task_id}: {failed.level} {failed.error_type or ''}: {why}"


def _fault_free(config: SimProviderConfig, seed: int) -> SimProviderConfig:
    return config.model_copy(update={"seed": seed, "error_rate": 0.0, "timeout_rate": 0.0,
                                     "latency_ms": LatencySpec(mean=0, p95=0)})


async def calibrate(
    configs: Sequence[SimProviderConfig],
    seeds: Sequence[int],
    validator: ValidatorConfig,
    *,
    tasks: Sequence[TaskSubmitted] | None = None,
    tolerance_points: float = TOLERANCE_POINTS,
    skipped: Sequence[str] = (),
) -> CalibrationReport:
    """Measure every profile in ``configs`` over ``seeds`` on ``tasks`` (None: all of
    HumanEval). Raises :class:`CalibrationError` when ``validator`` would not run the tests
    (level ``tests`` off, or sandbox ``off``), and what :func:`validate_batch` raises
    (``SandboxUnavailable``, ``ValidatorToolError``)."""
    _check_runs_tests(validator)
    if not seeds:
        raise CalibrationError("no seeds to run")
    started = time.perf_counter()
    tasks = list(humaneval_tasks() if tasks is None else tasks)
    analyses = await analyze_batch(tasks)
    task_types = [a.features.task_type for a in analyses]

    # answers[profile][seed][problem]: the index of a distinct (problem, text) pair
    distinct: dict[tuple[int, str], int] = {}
    answers: list[list[list[int]]] = []
    references: list[list[str | None]] = []  # per profile: its right answer per problem
    for config in configs:
        book = human_eval_book()
        if config.reference_file is not None:  # as SimProvider builds its book
            book = book.merged(load_reference_file(config.reference_file))
        solutions = [book.solution(t.prompt) for t in tasks]
        references.append([None if s is None else answer_prefix(t.prompt) + s
                           for t, s in zip(tasks, solutions)])
        per_seed = []
        for seed in seeds:
            provider = SimProvider(_fault_free(config, seed))
            row = []
            for index, (task, task_type) in enumerate(zip(tasks, task_types)):
                response = await provider.complete(ProviderRequest(
                    task_id=task.task_id, prompt=task.prompt, kind="code",
                    entry_point=task.entry_point, task_type=task_type, attempt=FIRST_ATTEMPT))
                row.append(distinct.setdefault((index, response.text), len(distinct)))
            per_seed.append(row)
        answers.append(per_seed)

    requests = [ValidationRequest(key=str(n), code=text, entry_point=tasks[i].entry_point,
                                  test=tasks[i].test, time_limit_ms=_time_limit_ms(analyses[i]))
                for (i, text), n in distinct.items()]
    outcomes = []
    for start in range(0, len(requests), VALIDATION_CHUNK):
        outcomes += await validate_batch(requests[start:start + VALIDATION_CHUNK], validator)
    passed = [o.passed for o in outcomes]
    why = [_why(tasks[i].task_id, o) for (i, _), o in zip(distinct, outcomes)]
    pairs = list(distinct)

    profiles = []
    for config, per_seed, right in zip(configs, answers, references):
        is_reference = {n: pairs[n][1] == right[pairs[n][0]] for row in per_seed for n in row}
        expected = expected_accuracy(config, task_types)
        rates = [sum(passed[n] for n in row) / len(tasks) for row in per_seed]
        flat = [n for row in per_seed for n in row]
        mean = fmean(rates)
        by_type: dict[str, tuple[int, float]] = {}
        for task_type in sorted(set(task_types)):
            by_type[task_type] = (task_types.count(task_type), config.accuracy_for(task_type))
        profiles.append(ProfileCalibration(
            provider=config.id, expected=expected, rates=rates, mean=mean, min=min(rates),
            max=max(rates), bias_points=(mean - expected) * 100,
            within_tolerance=abs(mean - expected) * 100 <= tolerance_points,
            wrong_passed=sum(1 for n in flat if passed[n] and not is_reference[n]),
            right_failed=sum(1 for n in flat if is_reference[n] and not passed[n]),
            right_failures=[why[n] for n in sorted({n for n in flat
                                                     if is_reference[n] and not passed[n]})],
            expected_by_type=by_type,
        ))
    return CalibrationReport(
        problems=len(tasks), seeds=list(seeds), attempt=FIRST_ATTEMPT,
        tolerance_points=tolerance_points, sandbox=validator.sandbox,
        levels=list(validator.levels), validated=len(requests),
        duration_s=time.perf_counter() - started, profiles=profiles, skipped=list(skipped))


def validator_config(settings: Settings) -> ValidatorConfig:
    """The validator configuration of ``settings``, as the validator stage builds it
    (:class:`agents.validator.ValidatorStage`). Raises :class:`CalibrationError` for
    settings the validator would refuse."""
    try:
        config = ValidatorConfig(levels=tuple(settings.validator_levels),
                                 sandbox=settings.sandbox,
                                 max_concurrency=settings.validator_concurrency)
    except ValueError as exc:
        raise CalibrationError(f"validator settings: {exc}") from None
    _check_runs_tests(config)
    return config


def _check_runs_tests(config: ValidatorConfig) -> None:
    if "tests" not in config.levels or config.sandbox == "off":
        raise CalibrationError(
            "calibration needs the validator's tests level in a sandbox: set "
            "RMO_VALIDATOR_LEVELS to include tests and RMO_SANDBOX to bwrap or subprocess")


def run_calibration(providers: Path | None, seeds: Sequence[int], extremes: bool,
                    validator: ValidatorConfig) -> CalibrationReport:
    """Load the profiles (:func:`sim_profiles`) and :func:`calibrate` them on all of
    HumanEval. Raises what those raise."""
    configs, skipped = sim_profiles(providers, extremes)
    return asyncio.run(calibrate(configs, seeds, validator, skipped=skipped))


def render(report: CalibrationReport) -> list[str]:
    """The report as text lines: one row per profile, then a summary line."""
    tol = f"±{report.tolerance_points:g}"
    lines = [(f"{'profile':14} {'configured':>10} {'realised':>9} {'min':>7} {'max':>7} "
              f"{'bias':>9}  {'within ' + tol:10} {'wrong passed':>12} {'right failed':>12}")]
    for p in report.profiles:
        lines.append(
            f"{p.provider:14} {p.expected:10.2%} {p.mean:9.2%} {p.min:7.1%} {p.max:7.1%} "
            f"{p.bias_points:+7.2f} pt  {'yes' if p.within_tolerance else 'NO':10} "
            f"{p.wrong_passed:12d} {p.right_failed:12d}")
    seeds = report.seeds
    seed_text = (f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
                 else ",".join(map(str, seeds)))
    lines.append(f"{report.problems} HumanEval problems x seeds {seed_text}, attempt "
                 f"{report.attempt}; validator levels {','.join(report.levels)}, sandbox "
                 f"{report.sandbox}; {report.validated} distinct answers validated in "
                 f"{report.duration_s:.1f} s")
    if report.skipped:
        lines.append(f"not sims, not measured: {', '.join(report.skipped)}")
    return lines
