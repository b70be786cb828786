"""Projections: Redis state derived from events, applied effectively once by the stage runner.

Each projection is applied by the consumer of the topic its events live on, in that topic's
order, atomically with the consumer's checkpoint (streams/stage.py). Replay applies the same
objects to the same topics, so a rebuilt namespace equals the live one key by key:
- task status and counters only set distinct fields or add integers (order-free);
- breakers read the calls topic, keyed by provider, so one provider's calls keep their order;
- the Q-table reads the single-partition rewards topic, one total order.
Floats are never summed across events: costs are counted in integer micro-USD.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import UTC, datetime

import orjson

from agents import qlearning
from agents.breaker import BreakerConfig, BreakerState, Transition, apply_command, apply_outcome
from agents.budget import CLEAR_LUA, PERIODS, micro_ceil, pending_index, spent_fields, spent_key
from models.codec import make_event
from models.events import BreakerTransitioned, Envelope, ProviderCall, RewardComputed, TaskCompleted
from streams.stage import Tx

MICRO = 1_000_000
ANSWER_MAX_CHARS = 20_000
"""Characters of the chosen answer kept in the task hash (``answer_chars`` has its full length)."""
MESSAGE_MAX_CHARS = 500
"""Characters kept of a failure message (validator failure, dead-letter reason)."""


def micro_usd(usd: float) -> int:
    return round(usd * MICRO)


def epoch_ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


class TaskStatusProjection:
    """``{ns}:task:{id}`` hash: one field group per lifecycle event (set once, order-free).

    Fields (all strings; costs in USD as float repr, times in ms, token counts as integers):
    - TaskSubmitted: ``submitted_at``, ``kind``, ``priority``;
    - TaskAnalyzed: ``analyzed_at``, ``task_type``, ``complexity``;
    - TaskExecuted: ``executed_at``, ``action``, ``strategy``, ``chosen`` (provider, "" when
      none answered), ``agreement``, ``answer`` (the chosen text, first
      :data:`ANSWER_MAX_CHARS` characters), ``answer_chars`` (its full length),
      ``executed_cost_usd``, ``executed_tokens`` (every call of the task, failed ones included);
    - TaskValidated: ``validated_at``, ``passed`` ("1"/"0"), ``tests_passed``, ``tests_total``,
      ``levels`` (JSON list of ``{"level", "passed"}`` in run order) and, when a level failed,
      ``failed_level``, ``failed_error_type`` and ``failed_message`` (its first failure, else
      its details; at most :data:`MESSAGE_MAX_CHARS` characters);
    - TaskCompleted: ``completed_at``, ``status``, ``cost_usd``, ``tokens``, ``latency_ms``,
      ``provider``, ``result`` (e.g. a dead letter's reason).

    :class:`BreakerProjection` adds one ``call:{provider}:{attempt}`` field per provider call.
    Status is derived at read time (:func:`task_status`). The hash expires
    ``Settings.task_retention_s`` after the latest of its events (:func:`write_tasks`)."""

    name = "task_status"

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        per_task: dict[str, dict[str, str]] = {}  # one HSET per task and batch
        latest: dict[str, int] = {}
        for e in events:
            fields = self._fields(e)
            if fields:
                per_task.setdefault(e.payload.task_id, {}).update(fields)
                latest[e.payload.task_id] = max(latest.get(e.payload.task_id, 0),
                                                epoch_ms(e.occurred_at))
        if per_task:
            tasks = {t: (fields, latest[t]) for t, fields in per_task.items()}
            tx.write(lambda pipe: write_tasks(pipe, tx, tasks))

    @staticmethod
    def _fields(e: Envelope) -> dict[str, str] | None:
        p = e.payload
        at = e.occurred_at.isoformat()
        match e.event_type:
            case "TaskSubmitted":
                return {"submitted_at": at, "kind": p.kind, "priority": str(p.priority)}
            case "TaskAnalyzed":
                return {"analyzed_at": at, "task_type": p.features.task_type,
                        "complexity": p.features.complexity}
            case "TaskExecuted":
                answer = p.chosen_text or ""
                return {"executed_at": at, "action": p.action, "strategy": p.consensus_strategy,
                        "chosen": p.chosen or "", "agreement": repr(p.agreement),
                        "answer": answer[:ANSWER_MAX_CHARS], "answer_chars": str(len(answer)),
                        "executed_cost_usd": repr(p.cost_usd), "executed_tokens": str(p.tokens)}
            case "TaskValidated":
                fields = {"validated_at": at, "passed": "1" if p.passed else "0",
                          "tests_passed": str(p.tests_passed), "tests_total": str(p.tests_total),
                          "levels": orjson.dumps([{"level": lv.level, "passed": lv.passed}
                                                  for lv in p.levels]).decode()}
                failed = next((lv for lv in p.levels if not lv.passed), None)
                if failed is not None:
                    fields |= {"failed_level": failed.level,
                               "failed_error_type": failed.error_type or "",
                               "failed_message": (failed.message or failed.details)[:MESSAGE_MAX_CHARS]}
                return fields
            case "TaskCompleted":
                return {"completed_at": at, "status": p.status, "cost_usd": repr(p.cost_usd),
                        "tokens": str(p.tokens), "latency_ms": repr(p.latency_ms),
                        "provider": p.provider or "", "result": (p.result or "")[:MESSAGE_MAX_CHARS]}
        return None


WRITE_TASKS_LUA = """
local retention = tonumber(ARGV[1])
for k = 1, #KEYS do
  local flat = {}
  for f, v in pairs(cjson.decode(ARGV[2 * k + 1])) do
    flat[#flat + 1] = f
    flat[#flat + 1] = v
  end
  redis.call('HSET', KEYS[k], unpack(flat))
  if retention > 0 then
    local expire_at = tonumber(ARGV[2 * k]) + retention
    redis.call('PEXPIREAT', KEYS[k], expire_at, 'NX')
    redis.call('PEXPIREAT', KEYS[k], expire_at, 'GT')
  end
end
return #KEYS
"""
"""KEYS: task hashes; ARGV: retention (ms, 0: none), then per key its latest event time (ms)
and its fields as one JSON object of strings."""


def write_tasks(pipe, tx: Tx, tasks: dict[str, tuple[dict[str, str], int]]) -> None:
    """Queue, as one script, each task's fields into its hash and its expiry: the latest
    event time written into it plus ``Settings.task_retention_s`` (0: kept forever).
    ``tasks``: task id -> (fields, latest event time of the fields, ms); a task without
    fields is skipped (an HSET of nothing would fail inside the batch's MULTI). Both
    PEXPIREATs (NX: the first, GT: a later one) make the expiry the maximum over the task's
    events whatever the order the consumers apply them in, so replay sets the same instant,
    and a task whose time is past expires at once in a rebuilt namespace as it did in the
    live one. Caveat: a task whose events span more than the retention can rebuild with
    fields the live hash lost. One EVAL with one JSON argument per task instead of three
    commands of every field: the client's cost per command and per argument (packing, one
    parsed reply per command) dominated replay (docs/performance.md)."""
    keys: list[str] = []
    args: list[str | int | bytes] = [int(tx.ctx.settings.task_retention_s * 1000)]
    for task_id, (fields, at_ms) in tasks.items():
        if fields:
            keys.append(tx.keys.task(task_id))
            args += [at_ms, orjson.dumps(fields)]
    if keys:
        pipe.eval(WRITE_TASKS_LUA, len(keys), *keys, *args)


def call_field(provider: str, attempt: int) -> str:
    """The task-hash field of one provider call: ``call:{provider}:{attempt}``."""
    return f"call:{provider}:{attempt}"


def call_value(event_type: str, p: ProviderCall) -> str:
    """The task-hash value of one provider call: compact JSON ``{"ok", "model", "error_type",
    "http_status", "latency_ms", "cost_usd", "tokens"}`` (ms, USD, input + output tokens),
    only from the event's payload so replay writes the same bytes."""
    failed = event_type == "ProviderCallFailed"
    return orjson.dumps({
        "ok": not failed, "model": p.model,
        "error_type": p.error_type if failed else None,
        "http_status": p.http_status if failed else None,
        "latency_ms": p.latency_ms, "cost_usd": p.cost_usd,
        "tokens": p.input_tokens + p.output_tokens,
    }).decode()


def task_status(h: dict[str, str]) -> str:
    """The status shown by ``rmo status``: the final status, else the furthest stage reached."""
    if not h:
        return "unknown"
    if "status" in h:
        return h["status"]
    for field, status in (("validated_at", "validated"), ("executed_at", "executed"),
                          ("analyzed_at", "analyzed"), ("submitted_at", "pending")):
        if field in h:
            return status
    return "unknown"


class CountersProjection:
    """``{ns}:counters`` hash: events per type, tasks per final status, costs in micro-USD."""

    name = "counters"

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        incr: dict[str, int] = {}
        provider_incr: dict[str, dict[str, int]] = {}
        for e in events:
            incr[f"events:{e.event_type}"] = incr.get(f"events:{e.event_type}", 0) + 1
            if e.event_type == "TaskCompleted":
                p = e.payload
                incr[f"tasks:{p.status}"] = incr.get(f"tasks:{p.status}", 0) + 1
                incr["cost_microusd"] = incr.get("cost_microusd", 0) + micro_usd(p.cost_usd)
                incr["tokens"] = incr.get("tokens", 0) + p.tokens
                if p.provider:
                    d = provider_incr.setdefault(p.provider, {})
                    d["tasks"] = d.get("tasks", 0) + 1
                    d["tasks_passed"] = d.get("tasks_passed", 0) + (p.status == "passed")
        if not incr:
            return

        def write(pipe, incr=incr, provider_incr=provider_incr) -> None:
            for f, n in incr.items():
                pipe.hincrby(tx.keys.counters, f, n)
            for prov, d in provider_incr.items():
                pipe.sadd(tx.keys.providers_index, prov)
                for f, n in d.items():
                    pipe.hincrby(tx.keys.provider_stats(prov), f, n)

        tx.write(write)


@dataclass
class BreakerProjection:
    """``{ns}:breaker:{provider}`` state and ``{ns}:provider:{id}`` call stats, from the calls
    topic: provider calls and operators' ``BreakerCommand`` events, in each provider's order
    (the topic is keyed by provider), by event time (agents/breaker.py, the protocol). Each
    transition is emitted as ``BreakerTransitioned`` on the system topic; the state is written
    in the stage runner's MULTI/EXEC with the checkpoint, which makes every transition atomic
    and applied once however many executor processes share the breaker.

    Each call is also recorded in its task's hash (:func:`call_field`, :func:`call_value`):
    the calls topic is the only place that tells which providers a task asked and how each
    call ended, and this is its consumer."""

    config: BreakerConfig
    name: str = "breakers"

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        events = [e for e in events if e.event_type in BREAKER_INPUTS]
        if not events:
            return
        providers = sorted({e.payload.provider for e in events})
        pipe = tx.redis.pipeline(transaction=False)
        for prov in providers:
            pipe.hgetall(tx.keys.breaker(prov))
        states = {prov: BreakerState.from_hash(h) for prov, h in zip(providers, await pipe.execute())}
        stats: dict[str, dict[str, int]] = {prov: {} for prov in providers}
        task_calls: dict[str, dict[str, str]] = {}
        task_at: dict[str, int] = {}
        for e in events:
            p = e.payload
            s = stats[p.provider]
            at = epoch_ms(e.occurred_at)
            if e.event_type == "BreakerCommand":
                new, transitions = apply_command(states[p.provider], p.command, at, p.reason, p.operator)
            else:
                new, transitions = self._call(e, at, s, task_calls, states[p.provider])
                task_at[p.task_id] = max(task_at.get(p.task_id, 0), at)
            states[p.provider] = new
            for i, t in enumerate(transitions):
                s["trips"] = s.get("trips", 0) + (t.to_state == "open" and t.from_state != "open")
                until = (datetime.fromtimestamp(t.open_until_ms / 1000, UTC)
                         if t.open_until_ms is not None else None)
                payload = BreakerTransitioned(provider=p.provider, from_state=t.from_state,
                                              to_state=t.to_state, reason=t.reason,
                                              failures=t.failures, successes=t.successes,
                                              trigger=t.trigger, open_until=until)
                tx.emit("system", make_event(payload, producer="executor.breaker", cause=e,
                                             correlation_id=p.provider, attempt=i,
                                             occurred_at=e.occurred_at), key=p.provider)

        def write(pipe) -> None:
            for prov in providers:
                pipe.hset(tx.keys.breaker(prov), mapping=states[prov].to_hash())
                pipe.sadd(tx.keys.providers_index, prov)
                for f, n in stats[prov].items():
                    pipe.hincrby(tx.keys.provider_stats(prov), f, n)
            write_tasks(pipe, tx, {t: (fields, task_at[t]) for t, fields in task_calls.items()})

        tx.write(write)

    def _call(self, e: Envelope, at_ms: int, s: dict[str, int], task_calls: dict[str, dict[str, str]],
              state: BreakerState) -> tuple[BreakerState, list[Transition]]:
        """One provider call: its task-hash field, its stats in ``s``, its breaker outcome."""
        p = e.payload
        ok = e.event_type == "ProviderCallCompleted"
        task_calls.setdefault(p.task_id, {})[call_field(p.provider, p.attempt)] = call_value(e.event_type, p)
        for f, n in (("calls", 1), ("failures", 0 if ok else 1),
                     ("cost_microusd", micro_usd(p.cost_usd)),
                     ("input_tokens", p.input_tokens), ("output_tokens", p.output_tokens),
                     (f"latency_ms:{min(int(p.latency_ms), 600_000)}", 1)):
            s[f] = s.get(f, 0) + n
        if not ok:
            s[f"errors:{p.error_type}"] = s.get(f"errors:{p.error_type}", 0) + 1
        return apply_outcome(state, ok, at_ms, self.config, latency_ms=p.latency_ms,
                             error_type=None if ok else p.error_type,
                             http_status=None if ok else p.http_status,
                             retry_after_s=None if ok else p.retry_after_s,
                             fingerprint=p.config_fingerprint)


BREAKER_INPUTS = frozenset({"ProviderCallCompleted", "ProviderCallFailed", "BreakerCommand"})
"""The calls topic's event types the breaker projection applies."""


class BudgetProjection:
    """Spent amounts for budgets (agents/budget.py step 4), from the calls topic: each
    ``ProviderCallCompleted``/``Failed`` adds its cost (micro-USD, rounded up by
    :func:`agents.budget.micro_ceil`), tokens and one call to every ``{scope}/{part}`` it pays
    into (:func:`agents.budget.spent_fields`) in each period bucket of the event's time. The
    state does not depend on the configured budget lines, so replay rebuilds it exactly with
    or without a budgets file. In the same MULTI/EXEC it clears the event's pending member
    (:data:`agents.budget.CLEAR_LUA`): the amount moves from pending to spent atomically (a
    no-op in replay's fresh namespace, which holds no ephemeral keys)."""

    name = "budgets"

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        calls = [e for e in events if e.event_type in ("ProviderCallCompleted", "ProviderCallFailed")]
        if not calls:
            return
        incr: dict[str, dict[str, int]] = {}
        for e in calls:
            p = e.payload
            amounts = (("microusd", micro_ceil(p.cost_usd)),
                       ("tokens", p.input_tokens + p.output_tokens), ("calls", 1))
            fields = spent_fields(p.provider, p.task_type, p.worker)
            for period in PERIODS:
                d = incr.setdefault(spent_key(tx.keys, period, e.occurred_at), {})
                for prefix in fields:
                    for f, n in amounts:
                        d[f"{prefix}:{f}"] = d.get(f"{prefix}:{f}", 0) + n
        clears = [(pending_index(tx.keys, e.event_id), f"p:{e.event_id}") for e in calls]

        def write(pipe) -> None:
            for key, d in incr.items():
                for f, n in d.items():
                    pipe.hincrby(key, f, n)
            for index, member in clears:
                pipe.eval(CLEAR_LUA, 1, index, member)

        tx.write(write)


@dataclass
class QTableProjection:
    """The Q-table, experience buffer and update count, from the single-partition rewards
    topic. After applying a reward it emits the task's ``TaskCompleted`` (live only).

    Per reward: one Q-learning update, the experience appended (latest ``experience_size``
    kept), then ``minibatch`` experiences drawn by :func:`qlearning.minibatch` (seeded by the
    reward's event id) are replayed. The table and buffer stay cached between batches while
    the stored update count matches the cache, i.e. while no other writer committed.
    """

    config: qlearning.QConfig
    name: str = "qtable"
    _cache: tuple[int, qlearning.QTable, deque] | None = dc_field(default=None, repr=False)

    async def _load(self, tx: Tx, rewards: Sequence[Envelope]) -> tuple[int, qlearning.QTable, deque, list]:
        k = tx.keys
        pipe = tx.redis.pipeline(transaction=False)
        pipe.hget(k.qmeta, "updates")
        live = tx.ctx.mode == "live"  # submit times only feed TaskCompleted, which replay drops
        for e in rewards if live else ():
            pipe.hget(k.task(e.payload.task_id), "submitted_at")
        updates_raw, *submitted = await pipe.execute()
        submitted = submitted or [None] * len(rewards)
        updates = int(updates_raw or 0)
        if self._cache is not None and self._cache[0] == updates:
            _, q, experience = self._cache
            return updates, q, experience, submitted
        pipe = tx.redis.pipeline(transaction=False)
        pipe.hgetall(k.qtable)
        pipe.lrange(k.experience, 0, -1)
        table_h, exp_raw = await pipe.execute()
        experience = deque((orjson.loads(x) for x in exp_raw), maxlen=self.config.experience_size)
        return updates, qlearning.from_fields(table_h), experience, submitted

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        rewards = [e for e in events if e.event_type == "RewardComputed"]
        if not rewards:
            return
        k = tx.keys
        cfg = self.config
        updates, q, experience, submitted = await self._load(tx, rewards)
        touched: set[tuple[str, str]] = set()
        new_exp: list[str] = []
        for e, sub in zip(rewards, submitted):
            r: RewardComputed = e.payload
            if r.budget_scope is not None:
                # the budget, not the action, left the task unanswered: no Q update
                self._complete(e, r, sub, tx)
                continue
            qlearning.update(q, r.state, r.action, r.reward, r.next_state, cfg)
            touched.add((r.state, r.action))
            row = [r.state, r.action, r.reward, r.next_state]
            experience.append(row)
            new_exp.append(orjson.dumps(row).decode())
            for idx in qlearning.minibatch(e.event_id, len(experience), cfg.minibatch):
                s, a, rew, s2 = experience[idx]
                qlearning.update(q, s, a, rew, s2, cfg)
                touched.add((s, a))
            updates += 1
            self._complete(e, r, sub, tx)
        self._cache = (updates, q, experience)
        if not touched:
            return
        fields = qlearning.to_fields(q, touched)

        def write(pipe) -> None:
            pipe.hset(k.qtable, mapping=fields)
            pipe.hset(k.qmeta, "updates", str(updates))
            pipe.rpush(k.experience, *new_exp)
            pipe.ltrim(k.experience, -cfg.experience_size, -1)

        tx.write(write)

    @staticmethod
    def _complete(e: Envelope, r: RewardComputed, submitted_at: str | None, tx: Tx) -> None:
        """Emit the task's ``TaskCompleted`` (latency in ms from its submission); a
        ``budget_exceeded`` one names the refusing budget line in ``result``."""
        latency = ((e.occurred_at - datetime.fromisoformat(submitted_at)).total_seconds() * 1000
                   if submitted_at else 0.0)
        done = TaskCompleted(task_id=r.task_id, status=r.completion_status, result=r.budget_scope,
                             provider=r.provider, action=r.action, cost_usd=r.cost_usd,
                             tokens=r.tokens, latency_ms=max(latency, 0.0))
        tx.emit("tasks", make_event(done, producer="learning.qtable", cause=e))
