"""`rmo evaluate-policy` on a real run (streams/policy_eval.py): a worker routes HumanEval tasks
uniformly at random between a sim provider that is usually right and one that is usually
wrong; each single provider's estimate from that log lies near the pass rate the provider
measured on the tasks routed to it, the two are told apart, and the logged policy's estimate
is the on-policy mean."""

from __future__ import annotations

import orjson
import pytest

from streams.demo import humaneval_tasks
from streams.policy_eval import read_log
from tests.integration.helpers import (
    cli_env,
    providers_file,
    rmo,
    sim,
    submit,
    wait_completed,
    worker,
)

pytestmark = pytest.mark.integration

UNIFORM = {"RMO_POLICY": "epsilon-greedy", "RMO_EPSILON_START": "1.0", "RMO_EPSILON_MIN": "1.0"}
"""Every decision uniform over the admissible actions (ε = 1 never decays below 1)."""


def evaluate(env: dict[str, str], *args: str) -> dict:
    out = rmo("evaluate-policy", *args, "--json", env=env)
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)


async def test_single_provider_estimates_match_their_measured_pass_rates(
        settings, topics, tmp_path, monkeypatch):
    for k, v in UNIFORM.items():
        monkeypatch.setenv(k, v)  # the worker inherits them
    path = providers_file(tmp_path, "providers:\n" + sim("good", accuracy=0.9)
                          + sim("poor", accuracy=0.2, model="claude-opus-4"))
    s = settings.model_copy(update={"providers_file": path})
    env = cli_env(s, RMO_PROVIDERS_FILE=str(path))

    empty = rmo("evaluate-policy", "--policy", "random", env=env)
    assert empty.returncode == 1 and empty.stderr.count("\n") == 1
    assert f"namespace {s.namespace}: no routing decision" in empty.stderr

    tasks = humaneval_tasks(164)  # every problem: about 40 rounds per action
    with worker(s, tmp_path) as log:
        await submit(s, topics, tasks)
        await wait_completed(s, topics, {t.task_id for t in tasks}, log=log)

    log_ = await read_log(s, topics)
    estimates = {p: evaluate(env, "--policy", f"provider:{p}") for p in ("good", "poor")}
    for p, est in estimates.items():
        measured = {a["action"]: a for a in est["per_action"]}[f"{p}:single"]
        assert est["rounds"] + est["excluded"]["target_unavailable"] == len(tasks), est
        assert measured["rounds"] >= 8, est
        # uniform over the usable actions: SNIPS is the measured rate weighted by 1/propensity,
        # the measured rate itself while the usable set stays the same. It changes when the
        # learning subsystem routes poor away from a task type mid-run (agents/rules.py):
        # good's later rounds then have propensity 1, and rounds without poor:single usable
        # are left out of provider:poor's estimate.
        weights = [(1 / r.behaviour[f"{p}:single"], r.passed) for r in log_.rounds
                   if r.action == f"{p}:single"]
        total = sum(w for w, _ in weights)
        assert est["pass_rate"]["snips"]["value"] == pytest.approx(
            sum(w * y for w, y in weights) / total)
        # IPS and DR are other noisy estimates of the same rate: their difference from it
        # spreads wider than either alone, so the tolerance is the interval's full width (about
        # 4 standard errors)
        for k in ("ips", "dr"):
            iv = est["pass_rate"][k]
            assert abs(iv["value"] - measured["pass_rate"]) <= iv["high"] - iv["low"], \
                (p, k, iv, measured)
        # Kish's effective sample size of the weights
        assert est["ess"] == pytest.approx(total ** 2 / sum(w * w for w, _ in weights), rel=0.01)
    good, poor = (estimates[p]["pass_rate"]["dr"] for p in ("good", "poor"))
    assert good["low"] > poor["high"], (good, poor)
    # the providers' prices differ (grok-4 vs claude-opus-4) and so do the cost estimates
    assert estimates["good"]["cost_usd"]["dr"]["high"] < estimates["poor"]["cost_usd"]["dr"]["low"]

    logged = evaluate(env, "--policy", "logged")
    for outcome in ("pass_rate", "cost_usd"):
        o = logged[outcome]
        assert o["ips"]["value"] == pytest.approx(o["on_policy"], abs=1e-12)
        assert o["snips"]["value"] == pytest.approx(o["on_policy"], abs=1e-12)
    assert logged["ess"] == pytest.approx(len(tasks))
    assert not [w for w in logged["warnings"] if "propensity" in w or "effective" in w]

    route = tmp_path / "route.yaml"
    route.write_text("default: good:single\n")  # every task type to good: provider:good's twin
    by_file = evaluate(env, "--policy-file", str(route))
    assert by_file["policy"] == "file:route.yaml"
    assert by_file["pass_rate"] == estimates["good"]["pass_rate"]

    later = rmo("evaluate-policy", "--policy", "random", "--from-time", "2999-01-01T00:00:00Z",
                env=env)
    assert later.returncode == 1 and later.stderr.count("\n") == 1
    assert "no routing decision" in later.stderr and "since 2999" in later.stderr
    text = rmo("evaluate-policy", "--policy", "provider:good", env=env)
    assert text.returncode == 0
    assert f"policy provider:good on namespace {s.namespace}" in text.stdout
    unknown = rmo("evaluate-policy", "--policy", "best", env=env)
    assert unknown.returncode == 2 and "unknown policy 'best'" in unknown.stderr
