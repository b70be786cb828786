"""`rmo study`: routing policies compared on one workload (issue 9; RouterBench's method).

Each (policy, seed) runs in its own namespace with its own worker: HumanEval's 164 problems
× ``epochs``, one epoch after the other (an epoch is submitted at once and completes before the
next starts, so a learning policy starts each epoch from what the previous ones taught it).
Task ids carry the epoch (``HumanEval/0#e2``), so every epoch draws fresh simulated answers.

Per policy (median over seeds) the table gives, over the last epoch and over all of them:
pass rate, cost per epoch (USD), passes per dollar, that as a share of the hindsight oracle's,
and regret (the oracle's passes minus the policy's, cumulated over the stream). The **oracle**
is computed, not run: for each task, the cheapest single provider whose answer passed (from the
``provider:ID`` runs of the same seed, whose answers are the same draws), else the cheapest
provider's cost with no pass (RouterBench's "Oracle"). It needs every ``provider:ID`` policy in
the study.

Plots (matplotlib, Agg): ``cost_quality.png``, each policy's point in the cost–quality plane
with the upper convex hull of the fixed policies (what mixing them can reach: RouterBench's
non-decreasing convex hull), and ``learning_curve.png``, the rolling pass rate and cost per task
of every policy over the stream.

Floors (issue 9 item 4), checked against the best single provider by pass rate over the last
epoch (claude with the default profiles): the default policy's last epoch passes at least as
many tasks at ≤ 50 % of its cost and reaches ≥ 50 % of the oracle's passes per dollar; over
all epochs it beats ``random`` on pass rate and on cost.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from agents.policy import LEARNED, policy_names
from agents.providers.registry import load_providers
from models.events import TaskSubmitted
from streams.config import Settings
from streams.demo import (
    check_exited,
    completions,
    guarded,
    humaneval_tasks,
    spawn_worker,
    stop_worker,
    submit_tasks,
)
from streams.pipeline import wait_caught_up
from streams.topics import create_topics, load_topics

EPOCH_TIMEOUT_S = 900.0
ROLLING = 50
"""Tasks per point of the learning curve's rolling means."""


@dataclass(frozen=True)
class Outcome:
    """One task of a run: its epoch (1-based), position in the stream, pass and cost (USD)."""

    epoch: int
    index: int
    task_id: str
    passed: bool
    cost_usd: float


@dataclass
class Run:
    """One (policy, seed) run: its namespace (kept, for `rmo evaluate-policy`) and outcomes in
    stream order."""

    policy: str
    seed: int
    namespace: str
    outcomes: list[Outcome] = field(default_factory=list)


def epoch_tasks(base: Sequence[TaskSubmitted], epoch: int) -> list[TaskSubmitted]:
    """HumanEval's tasks for ``epoch`` (ids ``{task_id}#e{epoch}``)."""
    return [t.model_copy(update={"task_id": f"{t.task_id}#e{epoch}"}) for t in base]


async def run_policy(settings: Settings, policy: str, seed: int, epochs: int,
                     log: Path) -> Run:
    """Run ``policy`` with ``seed`` for ``epochs`` epochs in a fresh namespace.

    Raises:
        DemoError: the run's worker exited (the end of ``log`` is in the error).
        TimeoutError: an epoch did not complete within :data:`EPOCH_TIMEOUT_S`.
    """
    ns = f"{settings.namespace}-{policy.replace(':', '-')}-s{seed}"
    s = settings.model_copy(update={"namespace": ns, "seed": seed})
    registry = load_topics(ns)
    await create_topics(s.require_kafka(), registry)
    run = Run(policy, seed, ns)
    base = humaneval_tasks()
    proc = spawn_worker(s, log, {"RMO_POLICY": policy})
    redis = Redis.from_url(s.require_redis(), decode_responses=True)

    async def check() -> None:
        check_exited(proc, log)

    try:
        for epoch in range(1, epochs + 1):
            tasks = epoch_tasks(base, epoch)
            order = {t.task_id: i for i, t in enumerate(tasks)}
            done: dict[str, dict] = {}
            await guarded(_follow(s, registry, tasks, done), check, EPOCH_TIMEOUT_S)
            # the next epoch must see every reward of this one
            await wait_caught_up(s, registry, redis)
            offset = (epoch - 1) * len(base)
            run.outcomes += [Outcome(epoch, offset + order[t], t, done[t]["status"] == "passed",
                                     float(done[t]["cost_usd"])) for t in sorted(done, key=order.get)]
    finally:
        stop_worker(proc)
        await redis.aclose()
    return run


async def _follow(s: Settings, registry, tasks: list[TaskSubmitted], done: dict[str, dict]) -> None:
    """Submit ``tasks`` and put each one's TaskCompleted payload into ``done`` by task id."""
    start = await submit_tasks(s, registry, tasks, "study")
    async for payload in completions(s, registry, {t.task_id for t in tasks}, start):
        done[payload["task_id"]] = payload


def oracle(runs: Sequence[Run]) -> Run | None:
    """The hindsight oracle of one seed's ``provider:ID`` runs (module docstring), or None when
    there are none."""
    singles = [r for r in runs if r.policy.startswith("provider:")]
    if not singles:
        return None
    out = Run("oracle", singles[0].seed, "")
    for rows in zip(*(r.outcomes for r in singles)):
        passing = [o for o in rows if o.passed]
        best = min(passing or rows, key=lambda o: o.cost_usd)
        out.outcomes.append(Outcome(best.epoch, best.index, best.task_id, bool(passing), best.cost_usd))
    return out


def figures(outcomes: Sequence[Outcome], epochs: int) -> dict[str, float]:
    """pass rate, cost per epoch (USD), passes per dollar of ``outcomes`` (over ``epochs``)."""
    passes = sum(o.passed for o in outcomes)
    cost = sum(o.cost_usd for o in outcomes)
    return {"pass_rate": passes / len(outcomes) if outcomes else 0.0,
            "cost_usd": cost / epochs, "passes": passes / epochs,
            "pass_per_usd": passes / cost if cost else 0.0}


def regret(run: Run, best: Run | None) -> list[float]:
    """Cumulative regret in passes against the oracle ``best``, per task of the stream."""
    if best is None:
        return []
    total, out = 0.0, []
    for o, b in zip(run.outcomes, best.outcomes):
        total += b.passed - o.passed
        out.append(total)
    return out


def table(runs: Sequence[Run], epochs: int) -> dict[str, dict]:
    """Policy -> figures (median over seeds) for the last epoch (``last_*``) and all epochs
    (``all_*``), with the oracle share and the regret at each epoch's end."""
    by_seed: dict[int, list[Run]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    oracles = {seed: oracle(rs) for seed, rs in by_seed.items()}
    rows: dict[str, dict[str, list[float]]] = {}
    per_epoch = len(runs[0].outcomes) // epochs if runs else 0
    for seed, rs in by_seed.items():
        best = oracles[seed]
        for r in [*rs, *([best] if best else [])]:
            row = rows.setdefault(r.policy, {})
            last = [o for o in r.outcomes if o.epoch == epochs]
            for prefix, part, n in (("last", last, 1), ("all", r.outcomes, epochs)):
                f = figures(part, n)
                if best is not None:
                    bf = figures([o for o in best.outcomes if prefix == "all" or o.epoch == epochs], n)
                    f["oracle_share"] = f["pass_per_usd"] / bf["pass_per_usd"] if bf["pass_per_usd"] else 0.0
                for k, v in f.items():
                    row.setdefault(f"{prefix}_{k}", []).append(v)
            reg = regret(r, best)
            for e in range(1, epochs + 1):
                if reg:
                    row.setdefault(f"regret_e{e}", []).append(reg[e * per_epoch - 1])
    return {p: {k: statistics.median(v) for k, v in row.items()} for p, row in rows.items()}


def floors(t: dict[str, dict], default: str) -> dict[str, dict]:
    """The issue's floors for ``default`` (module docstring): name -> {ok, value, bound}."""
    singles = {p: r for p, r in t.items() if p.startswith("provider:")}
    if default not in t or not singles:
        return {}
    d = t[default]
    best_name = max(singles, key=lambda p: singles[p]["last_pass_rate"])
    best = singles[best_name]
    out = {
        f"last epoch passes >= {best_name}": (d["last_passes"], best["last_passes"], d["last_passes"] >= best["last_passes"]),
        f"last epoch cost <= 50% of {best_name}": (d["last_cost_usd"], 0.5 * best["last_cost_usd"],
                                                   d["last_cost_usd"] <= 0.5 * best["last_cost_usd"]),
    }
    if "last_oracle_share" in d:
        out["last epoch oracle share of passes per $ >= 50%"] = (d["last_oracle_share"], 0.5,
                                                                 d["last_oracle_share"] >= 0.5)
    if "random" in t:
        r = t["random"]
        out["all epochs pass rate > random"] = (d["all_pass_rate"], r["all_pass_rate"],
                                                d["all_pass_rate"] > r["all_pass_rate"])
        out["all epochs cost < random"] = (d["all_cost_usd"], r["all_cost_usd"], d["all_cost_usd"] < r["all_cost_usd"])
    return {k: {"value": round(v, 4), "bound": round(b, 4), "ok": ok} for k, (v, b, ok) in out.items()}


def upper_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left convex hull of (cost, quality) points, cost ascending, quality
    non-decreasing (RouterBench, Hu et al. 2024, arXiv:2403.12031 §3: what mixing fixed
    routers can reach). Andrew's monotone chain on the upper side."""
    hull: list[tuple[float, float]] = []
    for p in sorted(set(points)):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
            hull.pop()
        hull.append(p)
    best = [hull[0]] if hull else []
    for p in hull[1:]:  # a costlier point below a cheaper one is never worth mixing in
        if p[1] > best[-1][1]:
            best.append(p)
    return best


def plot(runs: Sequence[Run], t: dict[str, dict], learned: Sequence[str], out_dir: Path) -> list[Path]:
    """Write ``cost_quality.png`` and ``learning_curve.png`` into ``out_dir``; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5))
    fixed = [(r["all_cost_usd"], r["all_pass_rate"]) for p, r in t.items()
             if p not in learned and p != "oracle"]
    hull = upper_hull(fixed)
    ax.plot([x for x, _ in hull], [y for _, y in hull], "--", color="grey", label="hull of fixed policies")
    for p, r in t.items():
        ax.scatter(r["all_cost_usd"], r["all_pass_rate"], marker="*" if p in learned else "o", s=80)
        ax.annotate(p, (r["all_cost_usd"], r["all_pass_rate"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("cost per epoch of 164 tasks (USD)")
    ax.set_ylabel("pass rate (all epochs)")
    ax.set_title("Cost-quality plane (median over seeds)")
    ax.legend(loc="lower right")
    paths = [out_dir / "cost_quality.png"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for p in sorted({r.policy for r in runs}):
        streams = [r.outcomes for r in runs if r.policy == p]
        n = min(len(s) for s in streams)
        passed = [statistics.mean(s[i].passed for s in streams) for i in range(n)]
        cost = [statistics.mean(s[i].cost_usd for s in streams) for i in range(n)]
        xs = list(range(ROLLING, n + 1))
        top.plot(xs, [statistics.mean(passed[i - ROLLING:i]) for i in xs], label=p,
                 linewidth=2 if p in learned else 1)
        bottom.plot(xs, [statistics.mean(cost[i - ROLLING:i]) for i in xs], label=p,
                    linewidth=2 if p in learned else 1)
    top.set_ylabel(f"pass rate (rolling {ROLLING})")
    bottom.set_ylabel(f"cost per task USD (rolling {ROLLING})")
    bottom.set_xlabel("task in stream (epochs back to back)")
    top.legend(fontsize=7, ncol=2)
    top.set_title("Learning curve (mean over seeds)")
    paths.append(out_dir / "learning_curve.png")
    fig.savefig(paths[1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


async def run_study(settings: Settings, policies: Sequence[str], seeds: Sequence[int],
                    epochs: int, parallel: int, log_dir: Path) -> list[Run]:
    """Every (policy, seed) run, ``parallel`` at a time, on ``settings``' broker and Redis,
    in namespaces ``{settings.namespace}-{policy}-s{seed}``.

    Raises:
        DemoError, TimeoutError: as :func:`run_policy`.
    """
    gate = asyncio.Semaphore(parallel)

    async def one(policy: str, seed: int) -> Run:
        async with gate:
            log = log_dir / f"{policy.replace(':', '-')}-s{seed}.log"
            return await run_policy(settings, policy, seed, epochs, log)

    return list(await asyncio.gather(*(one(p, s) for s in seeds for p in policies)))


def check_policies(policies: Sequence[str], providers_file: Path | None) -> None:
    """Raises ValueError naming ``--policies`` entries that are not policies for these
    providers (:func:`agents.policy.policy_names`)."""
    known = policy_names(list(load_providers(providers_file)))
    unknown = [p for p in policies if p not in known]
    if unknown:
        raise ValueError(f"--policies: {', '.join(unknown)} is not a policy; choose from "
                         f"{', '.join(known)}")


def default_policies(providers_file: Path | None) -> list[str]:
    """Every policy :func:`agents.policy.policy_names` knows for these providers."""
    return policy_names(list(load_providers(providers_file)))


OPE_LOGS = ("random", "epsilon-greedy", "thompson")
"""The runs whose decision logs offline evaluation is checked on. ``random`` logs every single
provider with propensity 1/3 (the check of the issue: within :data:`OPE_TOLERANCE`); the
learned policies' logs exploit, so the estimates carry weights up to 1/propensity floor and a
small effective sample: they are reported with it, for what they are."""
OPE_TOLERANCE = 0.05


async def validate_ope(settings: Settings, runs: Sequence[Run]) -> dict:
    """Offline policy evaluation checked against the truth (issue 9 item 5): for each seed,
    estimate every ``provider:ID`` policy from the logs of the :data:`OPE_LOGS` runs with
    `rmo evaluate-policy`'s estimators, and compare with that provider's own run, which answered
    the same tasks with the same draws. Returns log policy -> provider policy -> {"measured",
    "ips", "snips", "dr", "ess", "error_points" (the larger of SNIPS's and DR's), "ok"}, medians
    over seeds; {} without single-provider runs."""
    from streams.service import evaluate_policy

    singles = sorted({r.policy for r in runs if r.policy.startswith("provider:")})
    out: dict[str, dict] = {}
    for log_policy in (p for p in OPE_LOGS if singles and any(r.policy == p for r in runs)):
        rows: dict[str, dict[str, list[float]]] = {}
        for log_run in (r for r in runs if r.policy == log_policy):
            s = settings.model_copy(update={"namespace": log_run.namespace})
            for name in singles:
                truth = next(r for r in runs if r.policy == name and r.seed == log_run.seed)
                est = await evaluate_policy(s, name, n_bootstrap=200, seed=log_run.seed)
                row = rows.setdefault(name, {})
                for k, v in (("measured", figures(truth.outcomes, 1)["pass_rate"]),
                             ("ips", est.pass_rate.ips.value), ("snips", est.pass_rate.snips.value),
                             ("dr", est.pass_rate.dr.value), ("ess", est.ess)):
                    row.setdefault(k, []).append(v)
        out[log_policy] = {}
        for name, row in rows.items():
            m = {k: statistics.median(v) for k, v in row.items()}
            m["error_points"] = 100 * max(abs(m["snips"] - m["measured"]), abs(m["dr"] - m["measured"]))
            m["ok"] = m["error_points"] <= 100 * OPE_TOLERANCE
            out[log_policy][name] = m
    return out


def study(settings: Settings, policies: Sequence[str], seeds: Sequence[int], epochs: int,
          parallel: int, out_dir: Path, log_dir: Path) -> dict:
    """The whole study (module docstring) on ``settings``' services: runs, table, floors and
    plots. Returns ``{"table": policy -> figures, "floors": ..., "plots": [paths],
    "namespaces": policy -> [namespace per seed], "default_policy": name}``.

    ``"ope"`` is :func:`validate_ope`'s check of offline policy evaluation.

    Raises:
        ValueError: a policy is unknown (:func:`check_policies`).
        DemoError, TimeoutError: a run's worker exited, an epoch did not complete.
    """
    check_policies(policies, settings.providers_file)
    runs = asyncio.run(run_study(settings, policies, seeds, epochs, parallel, log_dir))
    t = table(runs, epochs)
    ope = asyncio.run(validate_ope(settings, runs))
    default = Settings.model_fields["policy"].default
    learned = [p for p in t if p in LEARNED]
    paths = plot(runs, t, learned, out_dir)
    namespaces: dict[str, list[str]] = {}
    for r in runs:
        namespaces.setdefault(r.policy, []).append(r.namespace)
    return {"table": t, "floors": floors(t, default), "ope": ope, "plots": [str(p) for p in paths],
            "namespaces": namespaces, "default_policy": default, "epochs": epochs,
            "seeds": list(seeds)}
