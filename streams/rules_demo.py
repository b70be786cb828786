"""`rmo rules demo`: an error pattern becomes a tested rule, end to end, and the failure rate
of the task type it is about is measured before and after.

The providers are the default sim profiles (agents/providers/defaults.yaml) with one
systematic defect: :data:`DEFECT_PROVIDER` answers every :data:`DEFECT_TASK_TYPE` task with a
syntax error (accuracy 0.0 there, every wrong answer a syntax error). In a fresh namespace
(so no earlier run is counted), one worker runs HumanEval twice, with the machinery of
`rmo demo` (streams/demo.py):

1. **First pass**, the 164 problems. The worker routes at random among the usable actions
   (``RMO_POLICY=random`` unless ``RMO_POLICY`` is set): a router that learns would also move
   away from the defective provider by itself (measured: ε-greedy gave it 2 of 40 string
   tasks, its tie-break favouring another provider), so the before/after difference would
   not be the rule's alone. At random the defective provider gets about a fifth of the
   string tasks (its ``{provider}:single`` action); their SYNTAX errors become a pattern
   (agents/patterns.py), which proposes ``avoid_provider`` string/gemini; the rule applies
   once the pattern's confidence reaches 0.8 and the recorded outcomes show the other
   providers failing string tasks less (agents/rules.py).
2. **Second pass**, the same problems under new task ids, submitted once the rule is in force.

Printed: the string tasks' failure rate among the first pass's tasks executed before the
rule was applied, and in the second pass (and how many of them the defective provider
answered), then the patterns and rules with their evidence (``rmo rules``). The second pass
routes the same way, so the drop is what the rule did: it removes every action that calls
the defective provider for string tasks (its single action, ``all:majority``, ``cascade``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import orjson
import yaml
from redis.asyncio import Redis
from rich.console import Console

from agents.providers.registry import DEFAULTS_RESOURCE, load_providers
from agents.sandbox import resolve_mode
from models.events import TaskSubmitted
from streams import locate
from streams.config import Settings
from streams.demo import (
    DemoError,
    WorkerWatch,
    humaneval_tasks,
    run_job,
    spawn_worker,
    stop_worker,
    submit_tasks,
    wait_completed,
)
from streams.keys import Keys
from streams.pipeline import prepare_log, wait_caught_up
from streams.service import RuleReport, RulesReport, rules_report
from streams.topics import load_topics

DEMO_POLICY = "random"
DEFECT_PROVIDER = "gemini"
DEFECT_TASK_TYPE = "string"
RULE_ID = f"avoid_provider:{DEFECT_TASK_TYPE}:{DEFECT_PROVIDER}"


def defective_providers(path: Path) -> Path:
    """Write the default sim profiles to ``path`` with :data:`DEFECT_PROVIDER` failing every
    :data:`DEFECT_TASK_TYPE` task by a syntax error; returns ``path``."""
    text = resources.files("agents.providers").joinpath(DEFAULTS_RESOURCE).read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    for entry in doc["providers"]:
        if entry["id"] == DEFECT_PROVIDER:
            entry["accuracy"] = {**entry["accuracy"], DEFECT_TASK_TYPE: 0.0}
            entry["wrong_answer_mix"] = {"mutation": 0.0, "syntax_error": 1.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass(frozen=True)
class Figures:
    """Tasks of :data:`DEFECT_TASK_TYPE` in one window: how many, how many failed, and how
    many of them the defective provider answered (and failed)."""

    tasks: int
    failed: int
    on_defective: int
    on_defective_failed: int

    @property
    def rate(self) -> float:
        """Failed / tasks (0.0 without tasks)."""
        return self.failed / self.tasks if self.tasks else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"failure_rate": round(self.rate, 4)}

    def line(self) -> str:
        return (f"{self.tasks} tasks, {self.failed} failed ({self.rate:.1%}); answered by "
                f"{DEFECT_PROVIDER}: {self.on_defective} ({self.on_defective_failed} failed)")


async def figures(redis: Redis, keys: Keys, ids: list[str], executed_before: datetime | None = None) -> Figures:
    """:class:`Figures` of the tasks ``ids`` of :data:`DEFECT_TASK_TYPE` (from their task
    hashes), only those executed before ``executed_before`` when given."""
    pipe = redis.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(keys.task(task_id), ["task_type", "chosen", "status", "executed_at"])
    rows = [r for r in await pipe.execute() if r[0] == DEFECT_TASK_TYPE]
    if executed_before is not None:
        rows = [r for r in rows if r[3] and datetime.fromisoformat(r[3]) < executed_before]
    failed = [r for r in rows if r[2] != "passed"]
    return Figures(len(rows), len(failed), sum(r[1] == DEFECT_PROVIDER for r in rows),
                   sum(r[1] == DEFECT_PROVIDER for r in failed))


def applied_at(report: RulesReport) -> tuple[RuleReport, datetime] | None:
    """The demo's rule and when it was applied, or None while it is not."""
    rule = next((r for r in report.rules if r.id == RULE_ID), None)
    stage = next((s for s in rule.stages if s.stage == "applied"), None) if rule else None
    return (rule, stage.at) if rule and stage else None


async def _pass(settings: Settings, tasks: list[TaskSubmitted], watch: WorkerWatch,
                timeout_s: float, redis: Redis) -> None:
    registry = load_topics(settings.namespace, settings.topics_file)
    start = await submit_tasks(settings, registry, tasks, "rules-demo")
    await wait_completed(settings, registry, {t.task_id for t in tasks}, start, timeout_s, watch)
    # the rule decisions that follow the last completions must be projected before reading
    if not await wait_caught_up(settings, registry, redis):
        raise DemoError("projections did not catch up within 60 s")


def _renamed(tasks: list[TaskSubmitted], prefix: str) -> list[TaskSubmitted]:
    return [t.model_copy(update={"task_id": f"{prefix}/{t.task_id}"}) for t in tasks]


async def _run(settings: Settings, timeout_s: float) -> dict:
    keys = Keys(settings.namespace)
    redis = Redis.from_url(settings.require_redis(), decode_responses=True)
    console = Console(stderr=True)
    proc = None
    try:
        await prepare_log(settings, load_topics(settings.namespace, settings.topics_file), redis)
        log_path = locate.state_dir() / f"worker-{settings.namespace}.log"
        proc = spawn_worker(settings, log_path)
        console.print(f"namespace {settings.namespace}: started a worker (pid {proc.pid}, log "
                      f"{log_path}); {DEFECT_PROVIDER} fails every {DEFECT_TASK_TYPE} task "
                      "with a syntax error")
        watch = WorkerWatch(redis, keys, f"rmo-{settings.namespace}", proc, log_path, 0)
        tasks = humaneval_tasks()
        first, second = _renamed(tasks, "first"), _renamed(tasks, "second")
        console.print(f"first pass: HumanEval (policy {settings.policy})")
        await _pass(settings, first, watch, timeout_s, redis)
        found = applied_at(await rules_report(settings))
        if found is None:
            lines = (await rules_report(settings)).render()
            raise DemoError(f"rule {RULE_ID} was not applied during the first pass; "
                            "patterns and rules so far:", detail=[f"  {x}" for x in lines])
        console.print(f"rule {RULE_ID} applied at {found[1]:%H:%M:%S}Z; second pass: HumanEval again")
        await _pass(settings, second, watch, timeout_s, redis)
        before = await figures(redis, keys, [t.task_id for t in first], executed_before=found[1])
        after = await figures(redis, keys, [t.task_id for t in second])
        report = await rules_report(settings)
    finally:
        if proc is not None:
            stop_worker(proc)
        await redis.aclose()
    return {"namespace": settings.namespace, "task_type": DEFECT_TASK_TYPE,
            "defective_provider": DEFECT_PROVIDER, "rule": RULE_ID,
            "before": before.to_dict(), "after": after.to_dict(),
            "before_line": before.line(), "after_line": after.line(), "rules": report}


def run_rules_demo(*, seed: int, as_json: bool, timeout_s: float) -> int:
    """Entry point of `rmo rules demo`; returns the exit code (0: the rule applied and both
    passes completed). Services are resolved like `rmo demo` (:func:`streams.locate.locate`,
    ``keep=True``); the namespace is ``{RMO_NAMESPACE}-rules-{UTC time}``.

    Raises:
        agents.sandbox.SandboxUnavailable: ``RMO_SANDBOX`` asks for a sandbox this machine lacks.
        streams.locate.ServiceUnreachable: a set address does not answer.
    """
    # the worker inherits this process's environment (streams.demo.spawn_worker)
    os.environ.setdefault("RMO_POLICY", DEMO_POLICY)
    base = Settings()
    namespace = f"{base.namespace}-rules-{datetime.now(UTC):%Y%m%d%H%M%S}"
    providers = defective_providers(locate.state_dir() / f"providers-{namespace}.yaml")
    load_providers(providers, seed=seed)  # the file we wrote must load before a worker tries
    resolve_mode(base.sandbox)
    found = locate.locate(base.kafka_bootstrap_servers, base.redis_url, keep=True)
    for h in found.kept:
        print(f"started {h.name} at {h.address} (kept running; `rmo down` stops it)", file=sys.stderr)
    settings = base.model_copy(update={"namespace": namespace, "seed": seed,
                                       "providers_file": providers,
                                       "kafka_bootstrap_servers": found.bootstrap,
                                       "redis_url": found.redis_url})
    ok, result = run_job(_run(settings, timeout_s), timeout_s)
    if not ok:
        return result
    report: RulesReport = result.pop("rules")
    lines = result.pop("before_line"), result.pop("after_line")
    if as_json:
        sys.stdout.write(orjson.dumps(result | {"rules": report.to_dict()}).decode() + "\n")
        return 0
    b, a = result["before"], result["after"]
    print(f"{DEFECT_TASK_TYPE} tasks before the rule applied: {lines[0]}")
    print(f"{DEFECT_TASK_TYPE} tasks after (second pass):    {lines[1]}")
    print(f"failure rate of {DEFECT_TASK_TYPE} tasks: {b['failure_rate']:.1%} before -> "
          f"{a['failure_rate']:.1%} after")
    print("\n".join(report.render(detected_only=True)))
    print(f"inspect: RMO_NAMESPACE={namespace} rmo rules   (and rmo replay --verify)")
    return 0
