"""Executor stage: TaskAnalyzed -> routing decision -> provider calls -> consensus -> TaskExecuted.

Per batch (SPEC §4): the Q-table and breaker states are read once; each task's action is
chosen in batch order (the state includes the previous choice); then every task's provider
calls run concurrently, each bounded by the executor timeout (default 30 s). Every call is a
``ProviderCallCompleted``/``ProviderCallFailed`` event keyed by provider on the calls topic;
the decision with its propensities is a ``ProviderSelected`` on the decisions topic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from agents import qlearning
from agents.breaker import BreakerConfig, BreakerState, admission
from agents.consensus import CandidateView, ConsensusResult, decide
from agents.examples import behaviour_script, extract_examples
from agents.providers.base import (
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResponse,
    ProviderTimeout,
    RateLimited,
    ServerError,
)
from agents.sandbox import arun_python, resolve_mode
from models.codec import make_event
from models.events import (
    Candidate,
    Envelope,
    ProviderCallCompleted,
    ProviderCallFailed,
    ProviderSelected,
    TaskAnalyzed,
    TaskExecuted,
)
from streams.config import Settings
from streams.projections import CountersProjection, TaskStatusProjection
from streams.stage import Consumer, Tx

RETRYABLE = (RateLimited, ServerError, ProviderTimeout)


@dataclass(frozen=True)
class Action:
    """A routing action: which providers to ask and how to combine their answers."""

    name: str
    providers: tuple[str, ...]
    strategy: str


def build_actions(provider_ids: Sequence[str], strategies: Sequence[str]) -> list[Action]:
    """``{provider}:single`` for each provider, plus ``all:{strategy}`` for every multi-provider
    strategy when there are at least two providers (the Grokputer action space)."""
    actions = [Action(f"{p}:single", (p,), "single") for p in provider_ids] if "single" in strategies else []
    if len(provider_ids) > 1:
        actions += [Action(f"all:{s}", tuple(provider_ids), s) for s in strategies if s != "single"]
    return actions


@dataclass
class _Outcome:
    """One provider's answer (None when every attempt failed) and what all attempts cost."""

    provider: str
    response: ProviderResponse | None
    cost_usd: float = 0.0
    tokens: int = 0


@dataclass(frozen=True)
class _Plan:
    state: str
    action: Action | None
    choice: qlearning.Choice | None
    epsilon: float
    skipped_open: tuple[str, ...]
    policy: str = "epsilon-greedy"


class ExecutorStage(Consumer):
    name = "executor"
    source = "analyses"
    handles = frozenset({"TaskAnalyzed"})
    projections = (TaskStatusProjection(), CountersProjection())

    def __init__(self, providers: dict[str, Provider], settings: Settings, max_attempts: int = 2,
                 forced_actions: dict[str, str] | None = None) -> None:
        """``forced_actions`` (task id -> action name) replaces the policy for those tasks:
        re-execution replays the recorded decision instead of deciding again.

        Building the stage does not check ``settings.sandbox``: replay builds stages it never
        runs. Whoever runs it checks first (:func:`agents.sandbox.resolve_mode` at worker
        start-up)."""
        self.forced_actions = forced_actions or {}
        self.providers = providers
        self.settings = settings
        self.max_attempts = max_attempts
        self.actions = build_actions(list(providers), settings.strategies)
        self.qcfg = qconfig(settings)
        self.bcfg = breaker_config(settings)
        self.previous: str | None = None

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        k = tx.keys
        pipe = tx.redis.pipeline(transaction=False)
        pipe.hgetall(k.qtable)
        pipe.hget(k.qmeta, "updates")
        for p in self.providers:
            pipe.hgetall(k.breaker(p))
        table_h, updates, *breakers = await pipe.execute()
        q = qlearning.from_fields(table_h)
        eps = qlearning.epsilon(int(updates or 0), self.qcfg)
        now_ms = int(time.time() * 1000)
        states = {p: BreakerState.from_hash(h) for p, h in zip(self.providers, breakers)}
        blocked = await self._blocked(states, now_ms, tx)
        plans: list[tuple[Envelope, _Plan]] = []
        for e in events:
            try:
                plans.append((e, self._decide(e, q, eps, blocked)))
            except (ValueError, KeyError, AttributeError) as exc:  # one bad event must not sink the batch
                tx.fail(e, exc)
        results = await asyncio.gather(*(self._execute(e, plan, tx) for e, plan in plans),
                                       return_exceptions=True)
        for (e, _), r in zip(plans, results):
            if isinstance(r, Exception):
                tx.fail(e, r)
            elif isinstance(r, BaseException):
                raise r

    async def _blocked(self, states: dict[str, BreakerState], now_ms: int, tx: Tx) -> set[str]:
        """Providers whose breaker rejects calls now; half-open ones need a trial permit."""
        blocked = set()
        for p, s in states.items():
            verdict = admission(s, now_ms, self.bcfg)
            if verdict == "reject":
                blocked.add(p)
            elif verdict == "trial":
                key = tx.keys.ephemeral("halfopen", p, s.opened_at_ms)
                n = await tx.redis.incr(key)
                await tx.redis.expire(key, int(self.bcfg.open_timeout_ms / 1000) * 2 + 10)
                if n > self.bcfg.half_open_max_calls:
                    blocked.add(p)
        return blocked

    def _decide(self, e: Envelope, q: qlearning.QTable, eps: float, blocked: set[str]) -> _Plan:
        a: TaskAnalyzed = e.payload
        state = qlearning.make_state(self.previous, a.features.task_type, a.features.complexity)
        skipped = tuple(sorted(blocked))
        forced = self.forced_actions.get(a.task_id)
        if forced is not None:
            action = next((x for x in self.actions if x.name == forced), None)
            if action is None:
                raise ValueError(f"recorded action {forced!r} is not available; actions: "
                                 f"{[x.name for x in self.actions]}")
            return _Plan(state, action, qlearning.Choice(forced, False, {forced: 1.0}, {}), 0.0,
                         skipped, policy="replay")
        # an open breaker removes every action that would call that provider
        usable = [x for x in self.actions if not set(x.providers) & blocked]
        if not usable:
            return _Plan(state, None, None, eps, skipped)
        rng = qlearning.seeded_rng(e.event_id, self.settings.seed)
        choice = qlearning.select(state, [x.name for x in usable], q, eps, rng)
        action = next(x for x in usable if x.name == choice.action)
        self.previous = action.providers[0] if len(action.providers) == 1 else "all"
        return _Plan(state, action, choice, eps, skipped)

    async def _execute(self, e: Envelope, plan: _Plan, tx: Tx) -> None:
        a: TaskAnalyzed = e.payload
        task = a.task
        if task is None:
            raise ValueError("TaskAnalyzed without its task: cannot execute")
        action = plan.action
        outcomes: list[_Outcome] = []
        if action is not None and plan.choice is not None:
            tx.emit("decisions", make_event(ProviderSelected(
                task_id=a.task_id, state=plan.state, action=action.name,
                providers=list(action.providers), strategy=action.strategy, policy=plan.policy,
                epsilon=plan.epsilon, explored=plan.choice.explored,
                action_probabilities=plan.choice.probabilities, q_values=plan.choice.q_values,
                skipped_open=list(plan.skipped_open),
            ), producer="executor.policy", cause=e))

            def request(attempt: int) -> ProviderRequest:
                return ProviderRequest(task_id=a.task_id, prompt=task.prompt, kind=task.kind,
                                       entry_point=task.entry_point,
                                       task_type=a.features.task_type, attempt=attempt)

            outcomes = list(await asyncio.gather(*(self._call(p, request, e, tx)
                                                   for p in action.providers)))
        answered = [o for o in outcomes if o.response is not None]
        result = await self._consensus(action.strategy if action else "single", answered, task)
        executed = TaskExecuted(
            task_id=a.task_id, state=plan.state, action=action.name if action else "none",
            candidates=[Candidate(provider=o.provider, text=o.response.text) for o in answered],
            consensus_strategy=result.strategy, chosen=result.chosen.provider if result.chosen else None,
            chosen_text=result.chosen.text if result.chosen else None, agreement=result.agreement,
            cost_usd=sum(o.cost_usd for o in outcomes), tokens=sum(o.tokens for o in outcomes),
            kind=task.kind,
            entry_point=task.entry_point, test=task.test, prompt=task.prompt,
            time_limit_ms=float(_time_limit(a)),
        )
        tx.emit("executions", make_event(executed, producer="executor", cause=e))

    async def _call(self, provider_id: str, request, cause: Envelope, tx: Tx) -> _Outcome:
        """Call one provider, retrying 429/5xx/timeouts (tenacity, honouring Retry-After) up to
        ``max_attempts``; every attempt is one event on the calls topic."""
        provider = self.providers[provider_id]
        out = _Outcome(provider.id, None)
        try:
            # the first attempt runs outside tenacity: most calls succeed, and building a
            # retrying controller per call costs as much as an instant provider's answer
            await self._attempt(provider, request, 0, cause, tx, out)
            return out
        except RETRYABLE as exc:
            if self.max_attempts < 2:
                return out
            await asyncio.sleep(_wait_seconds(exc))
        except ProviderError:
            return out
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.max_attempts - 1),
                                               retry=retry_if_exception_type(RETRYABLE),
                                               wait=_retry_after, reraise=True):
                with attempt:
                    await self._attempt(provider, request, attempt.retry_state.attempt_number,
                                        cause, tx, out)
        except ProviderError:
            pass  # every attempt failed; each failure is already an event
        return out

    async def _attempt(self, provider: Provider, request, n: int, cause: Envelope, tx: Tx,
                       out: _Outcome) -> None:
        """One call bounded by the executor timeout; records its event and its cost in ``out``.

        Raises:
            ProviderError: the call failed (timeouts become ProviderTimeout).
        """
        timeout = self.settings.provider_timeout_s
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                resp = await provider.complete(request(n))
        except TimeoutError:
            err = ProviderTimeout(f"no answer within {timeout} s",
                                  latency_ms=(time.perf_counter() - started) * 1000)
            self._failed(provider, n, err, cause, tx)
            raise err from None
        except ProviderError as err:
            self._failed(provider, n, err, cause, tx)
            out.cost_usd += err.cost_usd
            out.tokens += err.input_tokens + err.output_tokens
            raise
        tx.emit("calls", make_event(ProviderCallCompleted(
            task_id=cause.payload.task_id, provider=provider.id, model=resp.model, attempt=n,
            latency_ms=resp.latency_ms, input_tokens=resp.input_tokens,
            output_tokens=resp.output_tokens, cost_usd=resp.cost_usd, response_text=resp.text,
        ), producer=f"executor.provider.{provider.id}", cause=cause, attempt=n,
            discriminator=provider.id), key=provider.id)
        out.response = resp
        out.cost_usd += resp.cost_usd
        out.tokens += resp.input_tokens + resp.output_tokens

    def _failed(self, provider: Provider, attempt: int, err: ProviderError, cause: Envelope, tx: Tx) -> None:
        tx.emit("calls", make_event(ProviderCallFailed(
            task_id=cause.payload.task_id, provider=provider.id, model=provider.model, attempt=attempt,
            latency_ms=err.latency_ms, input_tokens=err.input_tokens,
            output_tokens=err.output_tokens, cost_usd=err.cost_usd, error_type=err.error_type,
            http_status=err.http_status, retry_after_s=err.retry_after_s, message=str(err)[:500],
        ), producer=f"executor.provider.{provider.id}", cause=cause, attempt=attempt,
            discriminator=provider.id), key=provider.id)

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


def _wait_seconds(exc: BaseException | None) -> float:
    """Wait what the provider's Retry-After asks (capped at 2 s), else 50 ms."""
    ra = getattr(exc, "retry_after_s", None)
    return min(float(ra), 2.0) if ra else 0.05


def _retry_after(retry_state) -> float:
    """tenacity wait strategy: :func:`_wait_seconds` of the last attempt's exception."""
    return _wait_seconds(retry_state.outcome.exception() if retry_state.outcome else None)


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
                         half_open_max_calls=s.breaker_half_open_max_calls)
