"""Executor stage: TaskAnalyzed -> routing decision -> provider calls, retries and fallbacks ->
consensus -> TaskExecuted.

The protocol, per batch (SPEC §4). Steps 3-5 run for every task of the batch concurrently, so
one process keeps many provider calls in flight; the batch ends when every task has its
``TaskExecuted``, and only then are offsets committed (streams/stage.py).

1. **Admit.** Read the policy's learned state (agents/policy), the count of tasks decided so
   far and every provider's breaker once. An open breaker rejects its
   provider (fail fast). A half-open one admits trial calls: the batch takes what is left of
   the ``breaker_half_open_max_calls`` permits that every executor process shares (one atomic
   Lua script on the sorted set ``{ns}:eph:halfopen:{provider}:{opened_at_ms}``; each permit
   expires ``breaker_permit_ttl_s`` after it was taken, agents/breaker.py step 4). A breaker
   held open by an auth error admits a worker whose provider configuration differs (step 6
   there). Each task that calls a
   half-open provider spends one permit, routing action and fallback alike, and a trial call
   is a single attempt: any failure reopens the breaker.
2. **Decide**, task by task in batch order: the routing policy (``RMO_POLICY``, default
   Thompson sampling) picks among the actions whose providers are all admitted, given the
   task's features and its decision index (so ε and round-robin turns are per task, whatever
   the batch size), and the choice with its propensities is a ``ProviderSelected`` on the
   decisions topic. The fallback order is fixed here too: the providers outside the action, by
   the policy's score of their ``{provider}:single`` action, descending, ties in registry order.
3. **Call** the action's providers concurrently (a ``cascade`` action: one at a time,
   cheapest first, until an answer passes the prompt's visible examples, :meth:`_cascade`),
   each call bounded by ``provider_timeout_s`` (30 s). A failed call is retried while its ``ProviderError.retryable`` says a repeat may
   succeed (429, 408, 409, 5xx, Anthropic's 529, timeouts, lost connections, malformed
   bodies), up to ``max_attempts`` (3) attempts in all, waiting the longer of the provider's
   Retry-After and an exponential backoff with jitter (tenacity's ``wait_exponential_jitter``:
   ``retry_backoff_s * 2**(n-1) + U(0, retry_backoff_s)`` s before retry n, at most
   ``retry_backoff_max_s``). A Retry-After longer than ``retry_after_cap_s`` ends that
   provider's attempts instead: calling sooner would be refused again, and a fallback may
   answer now. Errors that a repeat cannot fix (auth, bad request, context length exceeded)
   are not retried. Every attempt is a ``ProviderCallCompleted`` or ``ProviderCallFailed`` on
   the calls topic keyed by provider (the breakers' input, streams/projections.py), and every
   failure also an ``ErrorLogged`` of category PROVIDER on the errors topic.
4. **Fall back.** While no provider asked has answered, ask the next provider of the fallback
   order, one at a time and with the retries of step 3, at most ``max_fallbacks`` (2) of them;
   each is recorded first as a ``FallbackSelected`` on the decisions topic. A provider its
   breaker does not admit (step 1: open, or half-open with its permits spent) is passed over
   and not counted.
   **Budgets** (agents/budget.py): each attempt first reserves its worst case on the task's
   own cap and on every budget line that pays for it (one Lua script shared by all executor
   processes), waiting while only in-flight reservations keep it out; after the attempt the
   reservation is settled to the call event's actual cost. An attempt no budget admits is not
   made: a ``BudgetExceeded`` (and ``ErrorLogged`` BUDGET) records it and the provider counts
   as asked, so the task falls back. The first provider of an action pays as the task's own
   ("personal") call, the others of a multi-provider action as ``workers`` calls.
5. **Combine** the answers by the action's consensus strategy into one ``TaskExecuted``:
   ``candidates`` name the providers that answered, ``chosen`` the winner; cost (USD) and
   tokens count every call of the task, failed and fallback ones included. A task is left
   without an answer only when no provider asked could give one; when a budget refused one of
   its calls, ``budget_scope`` names the line and the task completes ``budget_exceeded``.
6. **Release** the trial permits the batch took and did not spend.

Learning. ``TaskExecuted.action`` stays the policy's action when a fallback answered, so the
reward (the fallback answer's validation, minus the cost of every call) updates what the policy
learns of the action it chose (its Q-value, its bandit statistics), with its logged propensity:
the value learned
is that of "ask these providers, falling back as above if none answers", which is what the
policy controls. Crediting the fallback provider's own ``{provider}:single`` action instead
would update an action that was not chosen, with no propensity for offline evaluation to weight
it by. A provider that keeps failing is kept out by its breaker, the cost of its failed calls
is in the reward, and ``FallbackSelected`` lets offline evaluation tell fallback answers apart.
With the seed's state (``RMO_POLICY_STATE=seed``) the reward's ``next_state`` names the
provider that answered (the validator's ``provider``); the next decision's state in this process
names the policy's provider (chosen before any call).

Event ids are derived from (input event, producer, attempt, provider), so a re-run after a
crash re-produces the same ids; the waits between attempts are not part of the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from agents import qlearning
from agents.breaker import RETURN_PERMITS, TAKE_PERMITS, BreakerConfig, BreakerState, admission
from agents.budget import (
    BUSY_POLL_S,
    RESERVATION_GRACE_MS,
    TASK_LINE,
    BudgetRefused,
    Budgets,
    Grant,
    Refusal,
    TaskAllowance,
    WorstCase,
    load_budgets,
    micro_ceil,
    request_text,
    worst_case,
)
from agents.consensus import CandidateView, ConsensusResult, decide
from agents.examples import behaviour_script, extract_examples
from agents.policy import LEARNED, Snapshot, make_policy
from agents.policy.base import Context
from agents.providers.base import (
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResponse,
    ProviderTimeout,
)
from agents.providers.registry import fingerprint
from agents.rules import ActiveRules
from agents.sandbox import arun_python, resolve_mode
from models.codec import make_event
from models.events import (
    BudgetExceeded,
    Candidate,
    Envelope,
    ErrorLogged,
    FallbackSelected,
    ProviderCallCompleted,
    ProviderCallFailed,
    ProviderSelected,
    ReserveGranted,
    TaskAnalyzed,
    TaskExecuted,
)
from streams.config import Settings
from streams.projections import CountersProjection, TaskStatusProjection
from streams.stage import REDIS_DOWN, Consumer, Tx, in_event_context

log = logging.getLogger("rmo.executor")

BUDGET_SCRIPTS_IN_FLIGHT = 16
"""Budget Lua scripts one executor runs at once (they take microseconds; the gate only keeps
a batch of waiting tasks from taking every Redis connection)."""

Sleep = Callable[[float], Awaitable[None]]
"""How the executor waits between attempts (seconds); tests inject one that records."""


@dataclass(frozen=True)
class Action:
    """A routing action: which providers to ask and how to combine their answers."""

    name: str
    providers: tuple[str, ...]
    strategy: str


def build_actions(provider_ids: Sequence[str], strategies: Sequence[str],
                  prices: dict[str, float] | None = None) -> list[Action]:
    """``{provider}:single`` for each provider, plus ``all:{strategy}`` for every multi-provider
    consensus strategy when there are at least two providers (the Grokputer action space), plus
    ``cascade`` (FrugalGPT): the providers by ``prices`` (USD per million tokens, a blend of
    input and output; unpriced ones first), cheapest first, ties in registry order."""
    actions = [Action(f"{p}:single", (p,), "single") for p in provider_ids] if "single" in strategies else []
    if len(provider_ids) > 1:
        actions += [Action(f"all:{s}", tuple(provider_ids), s) for s in strategies
                    if s not in ("single", "cascade")]
        if "cascade" in strategies:
            order = sorted(provider_ids, key=lambda p: (prices or {}).get(p, 0.0))  # stable
            actions.append(Action("cascade", tuple(order), "cascade"))
    return actions


def action_prices(actions: Sequence[Action], providers: dict[str, Provider]) -> dict[str, tuple[float, float]]:
    """action -> (input, output) USD per million tokens summed over the providers it calls at
    once (a cascade's first provider only); unpriced models count 0."""
    out = {}
    for a in actions:
        first = a.providers[:1] if a.strategy == "cascade" else a.providers
        prices = [providers[p].price_per_mtok() or (0.0, 0.0) for p in first]
        out[a.name] = (sum(x for x, _ in prices), sum(y for _, y in prices))
    return out


def blended_price(provider: Provider) -> float:
    """USD per million tokens of a typical code answer: input and output at 1:1 (the ratio of
    HumanEval prompts to their solutions is near 1), 0.0 when the model is unpriced."""
    price = provider.price_per_mtok()
    return 0.0 if price is None else (price[0] + price[1]) / 2


@dataclass
class _TaskBudget:
    """What budgets need of one task (agents/budget.py): its priority (the reserve's test), its
    task_type (the ``task_type:T`` scope) and its own cap."""

    priority: int
    task_type: str
    allowance: TaskAllowance


@dataclass
class _Outcome:
    """One provider's answer (None when every attempt failed), what all its attempts cost
    (USD, tokens) and the ``error_type`` of each failed attempt, in order. ``budget`` and
    ``worker`` (an extra call of multi-provider consensus) say which budgets pay for its
    calls; ``refused`` names the budget line that refused one (its call was not made)."""

    provider: str
    response: ProviderResponse | None
    cost_usd: float = 0.0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    budget: _TaskBudget | None = None
    worker: bool = False
    refused: str | None = None


@dataclass
class _Admission:
    """Which providers a batch may call (step 1).

    ``rejected``: providers whose breaker is open. ``permits``: half-open provider -> trial
    calls the batch may still make; ``permit_keys``: the shared permit set each came from;
    ``tokens``: the permits the batch holds there (the unspent ones are given back)."""

    rejected: frozenset[str]
    permits: dict[str, int]
    permit_keys: dict[str, str]
    tokens: dict[str, list[str]] = field(default_factory=dict)

    def admits(self, provider: str) -> bool:
        return provider not in self.rejected and self.permits.get(provider, 1) > 0

    def is_trial(self, provider: str) -> bool:
        return provider in self.permits

    def take(self, provider: str) -> bool:
        """Admit one task's call of ``provider``, spending a permit if it is half-open."""
        if not self.admits(provider):
            return False
        if provider in self.permits:
            self.permits[provider] -= 1
        return True


@dataclass(frozen=True)
class _Plan:
    """One task's decision (step 2). ``trial``: the action's providers called on a half-open
    permit; ``fallbacks``: the fallback order of step 4; ``skipped_open``: providers not
    admitted when the task was decided."""

    state: str
    action: Action | None
    choice: qlearning.Choice | None
    skipped_open: tuple[str, ...]
    fallbacks: tuple[str, ...]
    trial: frozenset[str] = frozenset()
    policy: str = "thompson"


class ExecutorStage(Consumer):
    """The executor (module docstring: the protocol)."""

    name = "executor"
    source = "analyses"
    handles = frozenset({"TaskAnalyzed"})
    projections = (TaskStatusProjection(), CountersProjection())

    def __init__(self, providers: dict[str, Provider], settings: Settings,
                 forced_actions: dict[str, str] | None = None, sleep: Sleep = asyncio.sleep) -> None:
        """``providers`` in registry order (the fallback tie-break). ``forced_actions`` (task
        id -> action name) replaces the policy for those tasks: re-execution replays the
        recorded decision instead of deciding again. ``sleep`` waits between attempts.
        ``settings.budgets_file`` is read here (OSError or pydantic.ValidationError when it is
        unreadable or invalid).

        Building the stage does not check ``settings.sandbox``: replay builds stages it never
        runs. Whoever runs it checks first (:func:`agents.sandbox.resolve_mode` at worker
        start-up)."""
        self.forced_actions = forced_actions or {}
        self.providers = providers
        self.settings = settings
        self.batch_max = settings.executor_batch_max  # the calls in flight per batch
        self.sleep = sleep
        self.actions = build_actions(list(providers), settings.strategies,
                                     {p: blended_price(prov) for p, prov in providers.items()})
        self.policy = make_policy(settings.policy, list(providers), settings, action_prices(self.actions, providers))
        self.bcfg = breaker_config(settings)
        # per provider, so one provider's new key re-admits it alone (agents/breaker.py step 6)
        self.fingerprints = {p: fingerprint({p: prov}) for p, prov in providers.items()}
        self.budget_lines = load_budgets(settings.budgets_file).budgets
        # every task of a batch may be reserving at once: more scripts in flight than Redis
        # connections in the pool (redis-py's default 100) would fail with MaxConnectionsError
        self._budget_gate = asyncio.Semaphore(BUDGET_SCRIPTS_IN_FLIGHT)
        self.previous: str | None = None
        self._rules = ActiveRules()  # rules (agents/rules.py): those in force, read per batch
        self._backoff = wait_exponential_jitter(multiplier=settings.retry_backoff_s,
                                                max=settings.retry_backoff_max_s,
                                                jitter=settings.retry_backoff_s)

    async def admit(self, pending: int, ctx) -> int:
        """Bounded staleness for learning policies: run at most ``max(feedback_window,
        completed) - (decided - completed)`` of the ``pending`` tasks now, where ``decided``
        counts the tasks this stage has decided and ``completed`` the tasks whose
        ``TaskCompleted`` is projected (their rewards have reached the policy's state).
        So at most max(window, completed) decisions are ever waiting for their feedback: the
        first tasks of a cold burst teach the later ones, and the window grows with what the
        policy has seen, until it no longer binds. Waits (polling every 50 ms) while nothing
        is allowed, at most ``feedback_wait_s``, then runs the window anyway: feedback that
        never comes (a stage down) slows the executor, never stops it. Regret under delayed
        feedback grows with the delay (Joulani, György & Szepesvári, "Online Learning under
        Delayed Feedback", ICML 2013); this bounds it. Fixed policies are never held back."""
        window = self.settings.feedback_window
        if not window or self.policy.name not in LEARNED:
            return pending
        deadline = time.monotonic() + self.settings.feedback_wait_s
        while True:
            try:
                decided, completed = await ctx.redis.hmget(
                    ctx.keys.counters, "events:TaskAnalyzed", "events:TaskCompleted")
            except REDIS_DOWN:
                return pending  # the batch itself will pause on the outage
            done = int(completed or 0)
            allowed = max(window, done) - (int(decided or 0) - done)
            if allowed > 0 or time.monotonic() >= deadline:
                return max(1, min(pending, allowed if allowed > 0 else window))
            await asyncio.sleep(0.05)

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        k = tx.keys
        pipe = tx.redis.pipeline(transaction=False)
        # tasks decided before this batch: the counter this stage projects with its checkpoint
        pipe.hget(k.counters, "events:TaskAnalyzed")
        pipe.hgetall(k.active_rules)  # rules (agents/rules.py)
        for p in self.providers:
            pipe.hgetall(k.breaker(p))
        decided, rules_h, *breakers = await pipe.execute()
        self._rules = ActiveRules.from_hash(rules_h)  # rules (agents/rules.py)
        snap = Snapshot(int(decided or 0), await self.policy.load(tx.redis, k))
        now_ms = int(time.time() * 1000)
        states = {p: BreakerState.from_hash(h) for p, h in zip(self.providers, breakers)}
        adm = await self._admission(states, now_ms, tx)
        plans: list[tuple[Envelope, _Plan]] = []
        for i, e in enumerate(events):
            try:
                plans.append((e, self._decide(e, snap, snap.decided + i, adm)))
            except (ValueError, KeyError, AttributeError) as exc:  # one bad event must not sink the batch
                tx.fail(e, exc)
        results = await asyncio.gather(*(in_event_context(e, self._execute(e, plan, adm, tx))
                                         for e, plan in plans), return_exceptions=True)
        await self._release(adm, tx)
        for (e, _), r in zip(plans, results):
            if isinstance(r, Exception):
                tx.fail(e, r)
            elif isinstance(r, BaseException):
                raise r

    async def _admission(self, states: dict[str, BreakerState], now_ms: int, tx: Tx) -> _Admission:
        """Step 1: open breakers reject; half-open ones get the permits left to this batch."""
        rejected: set[str] = set()
        permits: dict[str, int] = {}
        keys: dict[str, str] = {}
        tokens: dict[str, list[str]] = {}
        for p, s in states.items():
            verdict = admission(s, now_ms, self.bcfg, self.fingerprints[p])
            if verdict == "reject":
                rejected.add(p)
            elif verdict == "trial":
                # one permit set per half-open period; each permit expires permit_ttl_ms after
                # it was taken, so a crashed or hung trial frees its own
                keys[p] = tx.keys.ephemeral("halfopen", p, s.opened_at_ms)
                wanted = [f"{uuid.uuid4().hex}:{i}" for i in range(self.bcfg.half_open_max_calls)]
                tokens[p] = list(await tx.redis.eval(TAKE_PERMITS, 1, keys[p],
                                                     self.bcfg.half_open_max_calls, now_ms,
                                                     self.bcfg.permit_ttl_ms, *wanted))
                permits[p] = len(tokens[p])
        return _Admission(frozenset(rejected), permits, keys, tokens)

    async def _release(self, adm: _Admission, tx: Tx) -> None:
        """Step 6: give back the permits no task spent, so other batches may trial."""
        try:
            for p, left in adm.permits.items():
                if left:
                    await tx.redis.eval(RETURN_PERMITS, 1, adm.permit_keys[p], *adm.tokens[p][-left:])
        except REDIS_DOWN:
            # the counter's expiry frees them; raising would make the runner re-run the batch,
            # calling every provider again
            pass

    def _decide(self, e: Envelope, snap: Snapshot, index: int, adm: _Admission) -> _Plan:
        """Step 2 for one task (``index``: its decision index, agents/policy/base.py): its
        action, propensities, trial permits and fallback order.

        Raises:
            ValueError: a forced (recorded) action is not among this stage's actions.
        """
        a: TaskAnalyzed = e.payload
        f = a.features
        job = a.task.job if a.task else None
        # a job's domain master routes by its own rows of the policy's state (Cortex: each
        # master learns its own routing): the task type qualified by the master's domain
        task_type = f"{job.domain}/{f.task_type}" if job is not None else f.task_type
        state = (qlearning.make_state(self.previous, task_type, f.complexity)
                 if self.settings.policy_state == "seed" else qlearning.feature_state(task_type, f.complexity))
        skipped = tuple(sorted(p for p in self.providers if not adm.admits(p)))
        forced = self.forced_actions.get(a.task_id)
        if forced is not None:
            action = next((x for x in self.actions if x.name == forced), None)
            if action is None:
                raise ValueError(f"recorded action {forced!r} is not available; actions: "
                                 f"{[x.name for x in self.actions]}")
            return _Plan(state, action, qlearning.Choice(forced, False, {forced: 1.0}, {}),
                         skipped, self._fallback_order(action, {}), policy="replay")
        # a breaker that does not admit its provider removes every action calling it
        usable = [x for x in self.actions if all(adm.admits(p) for p in x.providers)]
        # rules (agents/rules.py): no action calling a provider a rule routes this task type
        # away from, unless that would leave no action at all
        avoided = self._rules.avoided(f.task_type)
        usable = [x for x in usable if avoided.isdisjoint(x.providers)] or usable
        # a re-asked job plan must come from another provider than the failed one's
        if job is not None and job.avoid_providers:
            usable = [x for x in usable if not set(job.avoid_providers) & set(x.providers)] or usable
        if not usable:
            return _Plan(state, None, None, skipped, self._fallback_order(None, {}),
                         policy=self.policy.name)
        rng = qlearning.seeded_rng(e.event_id, self.settings.seed)
        prompt_tokens = len(a.task.prompt) // 4 if a.task else 0  # ~4 characters per token
        choice = self.policy.choose(Context(task_type, f.complexity, state, index, prompt_tokens),
                                    [x.name for x in usable], snap, rng)
        action = next(x for x in usable if x.name == choice.action)
        trial = frozenset(p for p in action.providers if adm.is_trial(p))
        for p in action.providers:
            adm.take(p)
        self.previous = action.providers[0] if len(action.providers) == 1 else "all"
        return _Plan(state, action, choice, skipped, self._fallback_order(action, choice.q_values),
                     trial, policy=self.policy.name)

    def _fallback_order(self, action: Action | None, scores: dict[str, float]) -> tuple[str, ...]:
        """Providers outside ``action`` by the policy's score of their ``{provider}:single``
        action descending (0.0 when unscored), ties in registry order; step 4 admits each when
        its turn comes."""
        rest = [p for p in self.providers if action is None or p not in action.providers]
        return tuple(sorted(rest, key=lambda p: -scores.get(f"{p}:single", 0.0)))  # stable sort

    async def _execute(self, e: Envelope, plan: _Plan, adm: _Admission, tx: Tx) -> None:
        """Steps 3-5 for one task.

        Raises:
            ValueError: the TaskAnalyzed carries no task.
        """
        a: TaskAnalyzed = e.payload
        task = a.task
        if task is None:
            raise ValueError("TaskAnalyzed without its task: cannot execute")
        action = plan.action

        def request(attempt: int) -> ProviderRequest:
            return ProviderRequest(task_id=a.task_id, prompt=task.prompt, kind=task.kind,
                                   entry_point=task.entry_point, task_type=a.features.task_type,
                                   attempt=attempt, json_schema=task.json_schema)

        budget = _TaskBudget(task.priority, a.features.task_type, TaskAllowance(
            None if task.max_cost_usd is None else micro_ceil(task.max_cost_usd), task.budget_tokens))
        outcomes: list[_Outcome] = []
        accepted: _Outcome | None = None
        if action is not None and plan.choice is not None:
            tx.emit("decisions", make_event(ProviderSelected(
                task_id=a.task_id, state=plan.state, action=action.name,
                providers=list(action.providers), strategy=action.strategy, policy=plan.policy,
                epsilon=plan.choice.epsilon, explored=plan.choice.explored,
                action_probabilities=plan.choice.probabilities, q_values=plan.choice.q_values,
                skipped_open=list(plan.skipped_open),
                features={"task_type": a.features.task_type, "complexity": a.features.complexity},
            ), producer="executor.policy", cause=e))
            if action.strategy == "cascade":
                outcomes, accepted = await self._cascade(plan, request, e, tx, budget, task)
            else:
                # the first provider of an action is the task's own call, the others are the
                # extra calls of multi-provider consensus ("workers" budget parts pay for them)
                outcomes = list(await asyncio.gather(*(
                    self._call(p, request, e, tx, p in plan.trial, budget, worker=i > 0)
                    for i, p in enumerate(action.providers))))
        outcomes = await self._fall_back(plan, outcomes, request, e, adm, tx, budget)
        answered = [o for o in outcomes if o.response is not None]
        if action is not None and action.strategy == "cascade":
            # the accepted answer, else the last (most expensive) one; none when nobody answered
            pick = accepted if accepted is not None else (answered[-1] if answered else None)
            result = ConsensusResult(
                CandidateView(pick.provider, pick.response.text, True, None, None) if pick else None,
                1.0 if pick else 0.0, "cascade")
        else:
            result = await self._consensus(action.strategy if action else "single", answered, task)
        executed = TaskExecuted(
            task_id=a.task_id, state=plan.state, action=action.name if action else "none",
            candidates=[Candidate(provider=o.provider, text=o.response.text) for o in answered],
            consensus_strategy=result.strategy, chosen=result.chosen.provider if result.chosen else None,
            chosen_text=result.chosen.text if result.chosen else None, agreement=result.agreement,
            cost_usd=sum(o.cost_usd for o in outcomes), tokens=sum(o.tokens for o in outcomes),
            kind=task.kind, json_schema=task.json_schema, expected=task.expected,
            must_match=task.must_match, must_contain=task.must_contain,
            entry_point=task.entry_point, test=task.test, prompt=task.prompt,
            time_limit_ms=float(_time_limit(a)), job=task.job,
            budget_scope=None if answered else next((o.refused for o in outcomes if o.refused), None),
        )
        tx.emit("executions", make_event(executed, producer="executor", cause=e))

    async def _cascade(self, plan: _Plan, request: Callable[[int], ProviderRequest], cause: Envelope,
                       tx: Tx, budget: _TaskBudget, task) -> tuple[list[_Outcome], _Outcome | None]:
        """Step 3 for a ``cascade`` action (FrugalGPT, Chen, Zaharia & Zou 2023,
        arXiv:2305.05176): ask its providers one at a time, cheapest first, and stop at the
        first answer that passes the prompt's visible examples in the sandbox, or that cannot
        be checked (no examples, sandbox off, not a code task). Every provider's calls are the
        task's own (personal budget). Returns every outcome and the accepted one (None when no
        answer passed: step 5 then takes the last answer, the most expensive provider's)."""
        assert plan.action is not None
        outcomes: list[_Outcome] = []
        for p in plan.action.providers:
            out = await self._call(p, request, cause, tx, p in plan.trial, budget)
            outcomes.append(out)
            if out.response is None:
                continue
            view = CandidateView(p, out.response.text, _parses(out.response.text), None, None)
            checked = (await self._with_behaviour([view], task))[0] if view.parses else view
            if checked.parses and checked.passes_examples is not False:
                return outcomes, out
        return outcomes, None

    async def _fall_back(self, plan: _Plan, outcomes: list[_Outcome],
                         request: Callable[[int], ProviderRequest], cause: Envelope,
                         adm: _Admission, tx: Tx, budget: _TaskBudget | None = None) -> list[_Outcome]:
        """Step 4: while nobody answered, ask the next admitted provider of the fallback order
        (at most ``max_fallbacks``), each announced by a ``FallbackSelected``. Returns
        ``outcomes`` followed by the fallbacks' outcomes. A provider the budgets refused counts
        as asked: its refusal is the reason the next one is tried."""
        outcomes = list(outcomes)
        asked = 0
        for p in plan.fallbacks:
            if asked >= self.settings.max_fallbacks or any(o.response is not None for o in outcomes):
                break
            trial = adm.is_trial(p)
            if not adm.take(p):
                continue  # its breaker is open, or half-open with its permits spent
            asked += 1
            tx.emit("decisions", make_event(FallbackSelected(
                task_id=cause.payload.task_id, action=plan.action.name if plan.action else "none",
                from_providers=[o.provider for o in outcomes], to_provider=p,
                reason=_no_answer_reason(outcomes), attempt=asked,
            ), producer="executor.fallback", cause=cause, attempt=asked))
            outcomes.append(await self._call(p, request, cause, tx, trial, budget))
        return outcomes

    async def _call(self, provider_id: str, request: Callable[[int], ProviderRequest],
                    cause: Envelope, tx: Tx, trial: bool = False,
                    budget: _TaskBudget | None = None, worker: bool = False) -> _Outcome:
        """Step 3 for one provider: up to ``max_attempts`` attempts (one on a trial permit)
        while the error is retryable, tenacity waiting :meth:`_wait` between them. Returns the
        outcome; a call that never answered has ``response`` None. An attempt the budgets
        refuse (``budget``: the task's; ``worker``: an extra consensus call) ends the attempts
        with ``refused`` set."""
        provider = self.providers[provider_id]
        out = _Outcome(provider.id, None, budget=budget, worker=worker)
        attempts = 1 if trial else self.settings.max_attempts
        try:
            await self._attempt(provider, request, 0, cause, tx, out)
            return out
        except ProviderError as exc:
            first = exc
        except BudgetRefused as exc:
            out.refused = exc.line
            return out
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts),
                                               retry=retry_if_exception(self._retryable),
                                               wait=self._wait, sleep=self.sleep, reraise=True):
                with attempt:
                    n = attempt.retry_state.attempt_number - 1
                    if n == 0:
                        # attempt 0 ran above, outside tenacity: most calls succeed, and a
                        # retrying controller costs ~30 µs, as much as an instant provider's
                        # answer. Handing its failure to tenacity as its first attempt lets
                        # tenacity count, wait and stop over all attempts.
                        raise first
                    await self._attempt(provider, request, n, cause, tx, out)
        except ProviderError:
            pass  # every attempt failed; each failure is already an event
        except BudgetRefused as exc:
            out.refused = exc.line  # a retry no budget admits is not made
        return out

    def _retryable(self, exc: BaseException) -> bool:
        """A repeat may succeed (the error's ``retryable``), and not later than we wait: a
        Retry-After over ``retry_after_cap_s`` (s) gives the provider up for this task."""
        return (isinstance(exc, ProviderError) and exc.retryable
                and (exc.retry_after_s is None or exc.retry_after_s <= self.settings.retry_after_cap_s))

    def _wait(self, retry_state: RetryCallState) -> float:
        """Seconds before the next attempt: the longer of the failed attempt's Retry-After
        (at most ``retry_after_cap_s``, see :meth:`_retryable`) and the jittered backoff."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after_s", None) or 0.0
        return max(retry_after, self._backoff(retry_state))

    async def _attempt(self, provider: Provider, request: Callable[[int], ProviderRequest], n: int,
                       cause: Envelope, tx: Tx, out: _Outcome) -> None:
        """One call bounded by the executor timeout; records its events and its cost in ``out``.
        Before the call its worst case is reserved on the task's cap and on every budget line
        that pays for it; after it, the reservation is settled to the call event's actual
        cost (agents/budget.py steps 1-3).

        Raises:
            ProviderError: the call failed (the executor's timeout becomes ProviderTimeout).
            BudgetRefused: no budget admits the call; it was not made.
        """
        req = request(n)
        held = await self._reserve(provider, req, n, cause, tx, out)
        timeout = (self.settings.provider_timeout_s  # rules (agents/rules.py): raise_timeout
                   * self._rules.timeout_factor(cause.payload.features.complexity))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                resp = await provider.complete(req)
        except TimeoutError:
            err = ProviderTimeout(f"no answer within {timeout} s",
                                  latency_ms=(time.perf_counter() - started) * 1000)
            await self._settle(held, self._failed(provider, n, err, cause, tx, out), tx, out)
            raise err from None
        except ProviderError as err:
            await self._settle(held, self._failed(provider, n, err, cause, tx, out), tx, out)
            raise
        event = make_event(ProviderCallCompleted(
            task_id=cause.payload.task_id, provider=provider.id, model=resp.model, attempt=n,
            latency_ms=resp.latency_ms, input_tokens=resp.input_tokens,
            output_tokens=resp.output_tokens, cost_usd=resp.cost_usd, response_text=resp.text,
            config_fingerprint=self.fingerprints[provider.id],
            task_type=req.task_type, worker=out.worker,
        ), producer=f"executor.provider.{provider.id}", cause=cause, attempt=n,
            discriminator=provider.id)
        tx.emit("calls", event, key=provider.id)
        await self._settle(held, event, tx, out)
        out.response = resp
        out.cost_usd += resp.cost_usd
        out.tokens += resp.input_tokens + resp.output_tokens

    def _failed(self, provider: Provider, attempt: int, err: ProviderError, cause: Envelope, tx: Tx,
                out: _Outcome) -> Envelope:
        """Record a failed attempt: ``ProviderCallFailed`` (calls topic, keyed by provider; also
        returned), ``ErrorLogged`` PROVIDER (errors topic, keyed by task), and its cost in
        ``out``. The message is the adapter's, which never carries a secret
        (agents/providers/base.py)."""
        task_id = cause.payload.task_id
        producer = f"executor.provider.{provider.id}"
        message = str(err)
        call = make_event(ProviderCallFailed(
            task_id=task_id, provider=provider.id, model=provider.model, attempt=attempt,
            latency_ms=err.latency_ms, input_tokens=err.input_tokens,
            output_tokens=err.output_tokens, cost_usd=err.cost_usd, error_type=err.error_type,
            http_status=err.http_status, retry_after_s=err.retry_after_s, message=message[:500],
            config_fingerprint=self.fingerprints[provider.id],
            task_type=out.budget.task_type if out.budget else None, worker=out.worker,
        ), producer=producer, cause=cause, attempt=attempt, discriminator=provider.id)
        tx.emit("calls", call, key=provider.id)
        tx.emit("errors", make_event(ErrorLogged(
            category="PROVIDER", error_type=err.error_type, message=message[:2000],
            agent_id=producer, task_id=task_id,
            context={"provider": provider.id, "model": provider.model, "attempt": attempt,
                     "http_status": err.http_status, "retry_after_s": err.retry_after_s,
                     "retryable": err.retryable, "latency_ms": err.latency_ms,
                     # rules (agents/rules.py): what the error patterns are keyed by
                     "task_type": cause.payload.features.task_type,
                     "complexity": cause.payload.features.complexity},
        ), producer=producer, cause=cause, attempt=attempt, discriminator=f"{provider.id}:error"))
        out.errors.append(err.error_type)
        out.cost_usd += err.cost_usd
        out.tokens += err.input_tokens + err.output_tokens
        return call

    async def _reserve(self, provider: Provider, req: ProviderRequest, n: int, cause: Envelope,
                       tx: Tx, out: _Outcome) -> tuple[WorstCase, Grant | None] | None:
        """Steps 1-2 of agents/budget.py for one attempt: hold its worst case on the task's
        cap, then on the shared lines (waiting, :data:`BUSY_POLL_S` at a time, while they are
        busy with in-flight reservations: those settle within a call timeout). Returns what is
        held, None when the call has no budget at all (``out.budget`` None).

        Raises:
            BudgetRefused: the task's cap or a line is exhausted (recorded as
                ``BudgetExceeded`` and ``ErrorLogged`` BUDGET on the errors topic).
        """
        tb = out.budget
        if tb is None:
            return None
        worst = worst_case(request_text(req.prompt, req.json_schema), req.max_output_tokens,
                           provider.price_per_mtok())
        if not tb.allowance.take(worst):
            self._refused(provider, n, cause, tx, out, worst, TASK_LINE, False)
        lines = tuple(x for x in self.budget_lines
                      if x.applies(provider.id, tb.task_type, out.worker))
        if not lines:
            return worst, None
        budgets = Budgets(tx.keys, int(self.settings.budget_pending_ttl_s * 1000))
        ttl_ms = int(self.settings.provider_timeout_s * 1000) + RESERVATION_GRACE_MS
        member = f"r:{cause.event_id}:{provider.id}:{n}:{uuid.uuid4().hex}"
        while True:
            async with self._budget_gate:
                got = await budgets.reserve(tx.redis, lines, member, worst, tb.priority,
                                            datetime.now(UTC), ttl_ms)
            if isinstance(got, Grant):
                if got.from_reserve:
                    tx.emit("errors", make_event(ReserveGranted(
                        task_id=cause.payload.task_id, provider=provider.id, priority=tb.priority,
                        worst_microusd=worst.micro, worst_tokens=worst.tokens,
                    ), producer="executor.budget", cause=cause, attempt=n,
                        discriminator=f"{provider.id}:reserve"))
                return worst, got
            if isinstance(got, Refusal):
                tb.allowance.settle(worst, 0, 0)
                self._refused(provider, n, cause, tx, out, worst, got.line, got.reserve_denied)
            # plain asyncio.sleep: ``self.sleep`` is the retry wait tests record
            await asyncio.sleep(BUSY_POLL_S)

    def _refused(self, provider: Provider, n: int, cause: Envelope, tx: Tx, out: _Outcome,
                 worst: WorstCase, line: str, reserve_denied: bool) -> None:
        """Record a call no budget admits and raise :class:`BudgetRefused`."""
        task_id = cause.payload.task_id
        priority = out.budget.priority if out.budget else 0
        tx.emit("errors", make_event(BudgetExceeded(
            task_id=task_id, provider=provider.id, line=line, priority=priority,
            reserve_denied=reserve_denied, worst_microusd=worst.micro, worst_tokens=worst.tokens,
        ), producer="executor.budget", cause=cause, attempt=n, discriminator=f"{provider.id}:budget"))
        message = (f"budget {line} cannot admit a call of {provider.id} (worst case "
                   f"{worst.micro} micro-USD, {worst.tokens} tokens)"
                   + (f"; the reserve denies priority {priority}" if reserve_denied else ""))
        tx.emit("errors", make_event(ErrorLogged(
            category="BUDGET", error_type="BudgetExceeded", message=message,
            agent_id="executor.budget", task_id=task_id,
            context={"provider": provider.id, "line": line, "attempt": n,
                     "reserve_denied": reserve_denied},
        ), producer="executor.budget", cause=cause, attempt=n,
            discriminator=f"{provider.id}:budget:error"))
        out.errors.append("budget_exceeded")
        raise BudgetRefused(line, reserve_denied)

    async def _settle(self, held: tuple[WorstCase, Grant | None] | None, event: Envelope, tx: Tx,
                      out: _Outcome) -> None:
        """Step 3 of agents/budget.py: settle what :meth:`_reserve` held to the call event's
        actual cost (micro-USD, rounded up) and tokens. A Redis outage here is logged, not
        raised: re-running the batch would call the provider again, and the reservation
        expires by itself."""
        if held is None or out.budget is None:
            return
        worst, grant = held
        p = event.payload
        micro, tokens = micro_ceil(p.cost_usd), p.input_tokens + p.output_tokens
        out.budget.allowance.settle(worst, micro, tokens)
        if grant is None:
            return
        budgets = Budgets(tx.keys, int(self.settings.budget_pending_ttl_s * 1000))
        try:
            async with self._budget_gate:
                await budgets.settle(tx.redis, grant, event.event_id if micro or tokens else None,
                                     event.occurred_at, micro, tokens)
        except REDIS_DOWN as exc:
            log.warning("budget settle failed (%r): the reservation of %s expires instead",
                        exc, grant.member)

    async def _consensus(self, strategy: str, answered: list[_Outcome], task) -> ConsensusResult:
        # a single candidate needs no vote; parsing it here would repeat the validator's work
        single = strategy == "single" or len(answered) < 2
        views = [CandidateView(provider=o.provider, text=o.response.text,
                               parses=True if single else _parses(o.response.text),
                               signature=None, passes_examples=None) for o in answered]
        if strategy != "single" and len(views) > 1 and task.kind == "code" and task.entry_point:
            views = await self._with_behaviour(views, task)
        return decide(strategy, views)

    async def _with_behaviour(self, views: list[CandidateView], task) -> list[CandidateView]:
        """Run each parsing candidate on the prompt's visible examples in the sandbox; the
        outputs are the behaviour signature consensus groups by.

        The sandbox is the one ``settings.sandbox`` names (:func:`agents.sandbox.resolve_mode`,
        decided at worker start-up). Under ``off`` no candidate runs: the views keep no
        signature and unknown ``passes_examples``, so consensus groups candidates by their
        normalised text and ranks them on parsing alone.
        """
        mode = resolve_mode(self.settings.sandbox)
        if mode is None:
            return views
        examples = extract_examples(task.prompt, task.entry_point)
        if not examples:
            return views

        async def run(v: CandidateView) -> CandidateView:
            if not v.parses:
                return v
            res = await arun_python(behaviour_script(v.text, task.entry_point, examples),
                                    timeout_s=5.0, cpu_s=5, mode=mode)
            line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
            try:
                out = orjson.loads(line)
                return CandidateView(v.provider, v.text, v.parses, orjson.dumps(out["outputs"]).decode(),
                                     all(out["passed"]), v.weight)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return CandidateView(v.provider, v.text, v.parses, None, False, v.weight)

        return list(await asyncio.gather(*(run(v) for v in views)))


def _no_answer_reason(outcomes: list[_Outcome]) -> str:
    """Why a task falls back: each provider asked so far with the ``error_type`` of its failed
    calls, e.g. ``"flaky: rate_limited, server_error"``."""
    if not outcomes:
        return "no routing action was admissible"
    return "; ".join(f"{o.provider}: {', '.join(o.errors)}" for o in outcomes)


def _parses(text: str) -> bool:
    try:
        compile(text, "<candidate>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def _time_limit(a: TaskAnalyzed) -> float:
    for r in a.analyses:
        if "time_limit_ms" in r.features:
            return float(r.features["time_limit_ms"])
    return 5000.0


def qconfig(s: Settings) -> qlearning.QConfig:
    return qlearning.QConfig(alpha=s.learning_rate, gamma=s.discount, epsilon_start=s.epsilon_start,
                             epsilon_min=s.epsilon_min, epsilon_decay=s.epsilon_decay,
                             experience_size=s.experience_size, minibatch=s.replay_minibatch)


def breaker_config(s: Settings) -> BreakerConfig:
    return BreakerConfig(failure_threshold=s.breaker_failure_threshold,
                         open_timeout_ms=int(s.breaker_open_timeout_s * 1000),
                         success_threshold=s.breaker_success_threshold,
                         half_open_max_calls=s.breaker_half_open_max_calls,
                         failure_rate=s.breaker_failure_rate, window_size=s.breaker_window_size,
                         window_ms=int(s.breaker_window_s * 1000),
                         minimum_calls=s.breaker_minimum_calls,
                         slow_call_ms=s.breaker_slow_call_ms,
                         slow_call_rate=s.breaker_slow_call_rate,
                         backoff_factor=s.breaker_backoff_factor,
                         max_open_ms=int(s.breaker_max_open_s * 1000),
                         quota_open_ms=int(s.breaker_quota_open_s * 1000),
                         permit_ttl_ms=int(s.breaker_permit_ttl_s * 1000))
