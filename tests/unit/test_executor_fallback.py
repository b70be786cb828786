"""agents/executor.py steps 3-4: retries, Retry-After, fallbacks, breakers, ErrorLogged.

ExecutorStage is driven directly on a real Redis (breakers, Q-table and half-open permits live
there) with scripted fake providers; no broker: a Context without a producer keeps the emitted
events in ``tx.emitted``. The policy is made greedy (ε = 0), so with an empty Q-table it picks
the first provider's ``{provider}:single`` action; waits between attempts are recorded by an
injected ``sleep`` instead of being slept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import pytest
from redis.asyncio import Redis

from agents.breaker import BreakerState
from agents.executor import ExecutorStage
from agents.providers.base import (
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResponse,
    RateLimited,
    ServerError,
)
from models.codec import make_event
from models.events import Envelope, TaskAnalyzed, TaskFeatures, TaskSubmitted
from streams.config import Settings
from streams.keys import Keys
from streams.stage import Context, Tx
from streams.topics import load_topics

STATE = "string|low"  # qlearning.feature_state("string", "low"): the routing state of task()


class AuthFailed(ProviderError):
    """Stands for an adapter's 401 (not retryable); the executor knows only ``retryable``."""

    error_type: ClassVar[str] = "auth"
    retryable: ClassVar[bool] = False


class ConnectionLost(ProviderError):
    """Stands for a retryable error class the executor has never heard of."""

    error_type: ClassVar[str] = "connection_failed"
    retryable: ClassVar[bool] = True


Step = str | Callable[[], ProviderError]
"""One scripted call: answer this text, or raise what the factory makes."""


class Scripted(Provider):
    """Plays ``script`` call by call (the last step repeats); ``hang_s`` delays every call."""

    kind = "fake"

    def __init__(self, pid: str, *script: Step, hang_s: float = 0.0) -> None:
        self.id = pid
        self.model = "grok-4"
        self.script = script
        self.hang_s = hang_s
        self.requests: list[ProviderRequest] = []

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        step = self.script[min(len(self.requests), len(self.script) - 1)]
        self.requests.append(request)
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if isinstance(step, str):
            return ProviderResponse(text=step, model=self.model, input_tokens=3, output_tokens=4,
                                    cost_usd=0.001, latency_ms=1.0)
        raise step()

    @property
    def attempts(self) -> list[int]:
        return [r.attempt for r in self.requests]


def ok(text: str = "def f():\n    return 1\n") -> str:
    return text


def rate_limited(after_s: float | None) -> Callable[[], ProviderError]:
    return lambda: RateLimited("429 slow down", http_status=429, retry_after_s=after_s)


def server_error(status: int = 500) -> Callable[[], ProviderError]:
    return lambda: ServerError(f"{status} upstream failed", http_status=status)


def auth() -> ProviderError:
    return AuthFailed("401 invalid key: set OPENAI_API_KEY", http_status=401)


class Waits(list[float]):
    """An injected sleep: records each wait (s) and returns at once."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def task(i: int = 0, submitted: TaskSubmitted | None = None) -> Envelope:
    submitted = submitted or TaskSubmitted(task_id=f"t{i}", kind="code", prompt="def f():\n",
                                           entry_point="f")
    root = make_event(submitted, producer="test", event_id=f"submitted-{i}")
    analyzed = TaskAnalyzed(task_id=f"t{i}", analyses=[], action_items=[], task=submitted,
                            features=TaskFeatures(task_type="string", complexity="low"))
    return make_event(analyzed, producer="analyzer", cause=root)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


class Harness:
    """One namespace, its settings, and a way to run one executor batch."""

    def __init__(self, namespace: str, redis: Redis) -> None:
        self.keys = Keys(namespace)
        self.redis = redis
        # greedy Q-learning: the tests set Q-values to steer the choice
        self.settings = Settings(namespace=namespace, sandbox="off", strategies=("single",),
                                 policy="epsilon-greedy", propensity_floor=0.0,
                                 epsilon_start=0.0, epsilon_min=0.0)
        self.waits = Waits()

    def stage(self, *providers: Provider, **settings: object) -> ExecutorStage:
        s = self.settings.model_copy(update=settings)
        return ExecutorStage({p.id: p for p in providers}, s, sleep=self.waits)

    async def run(self, stage: ExecutorStage, *events: Envelope) -> list[Envelope]:
        ctx = Context(settings=stage.settings, keys=self.keys, topics=load_topics(self.keys.namespace),
                      redis=self.redis, producer=None)
        tx = Tx(ctx)
        await stage.process(list(events), tx)
        assert not tx.failed, tx.failed
        return [e for _, _, e in tx.emitted]

    async def set_breaker(self, provider: str, state: BreakerState) -> None:
        await self.redis.hset(self.keys.breaker(provider), mapping=state.to_hash())

    async def set_q(self, values: dict[str, float]) -> None:
        await self.redis.hset(self.keys.qtable, mapping={f"{STATE}\t{a}": repr(v)
                                                         for a, v in values.items()})


@pytest.fixture
def h(namespace: str, redis: Redis) -> Harness:
    return Harness(namespace, redis)


def of(events: list[Envelope], event_type: str) -> list:
    return [e.payload for e in events if e.event_type == event_type]


def executed(events: list[Envelope]):
    (x,) = of(events, "TaskExecuted")
    return x


# --------------------------------------------------------------------------- retries


async def test_retryable_errors_are_retried_with_growing_jittered_backoff(h: Harness) -> None:
    p = Scripted("p", server_error(500), server_error(503), ok())
    out = await h.run(h.stage(p), task())
    assert p.attempts == [0, 1, 2]
    # defaults: 0.5 s * 2**(n-1) plus up to 0.5 s of jitter before retry n
    assert len(h.waits) == 2
    assert 0.5 <= h.waits[0] <= 1.0 and 1.0 <= h.waits[1] <= 1.5
    failed = of(out, "ProviderCallFailed")
    assert [(f.attempt, f.error_type, f.http_status) for f in failed] == \
        [(0, "server_error", 500), (1, "server_error", 503)]
    assert [c.attempt for c in of(out, "ProviderCallCompleted")] == [2]
    assert of(out, "FallbackSelected") == []
    x = executed(out)
    assert (x.action, x.chosen, [c.provider for c in x.candidates]) == ("p:single", "p", ["p"])


async def test_an_unknown_retryable_error_class_is_retried(h: Harness) -> None:
    p = Scripted("p", lambda: ConnectionLost("connection refused"), ok())
    out = await h.run(h.stage(p), task())
    assert p.attempts == [0, 1]
    assert executed(out).chosen == "p"


async def test_attempts_stop_at_max_attempts(h: Harness) -> None:
    p = Scripted("p", server_error())
    out = await h.run(h.stage(p, max_attempts=4), task())
    assert p.attempts == [0, 1, 2, 3]
    assert len(h.waits) == 3
    x = executed(out)
    assert x.chosen is None and x.candidates == []


async def test_non_retryable_errors_are_not_retried(h: Harness) -> None:
    p = Scripted("p", auth)
    out = await h.run(h.stage(p), task())
    assert p.attempts == [0]
    assert h.waits == []
    (err,) = of(out, "ErrorLogged")
    assert err.error_type == "auth" and err.context["retryable"] is False
    assert "OPENAI_API_KEY" in err.message  # the adapter's message, passed on as it is


async def test_retry_after_longer_than_the_backoff_is_waited(h: Harness) -> None:
    p = Scripted("p", rate_limited(3.0), ok())
    out = await h.run(h.stage(p), task())
    assert p.attempts == [0, 1]
    assert h.waits == [3.0]
    assert of(out, "ProviderCallFailed")[0].retry_after_s == 3.0


async def test_a_short_retry_after_still_waits_the_backoff(h: Harness) -> None:
    p = Scripted("p", rate_limited(0.01), ok())
    await h.run(h.stage(p), task())
    assert len(h.waits) == 1 and 0.5 <= h.waits[0] <= 1.0


async def test_retry_after_over_the_cap_is_not_waited_but_falls_back(h: Harness) -> None:
    p = Scripted("p", rate_limited(60.0), ok())
    q = Scripted("q", ok("def f():\n    return 2\n"))
    out = await h.run(h.stage(p, q, retry_after_cap_s=10.0), task())
    assert p.attempts == [0] and h.waits == []
    assert q.attempts == [0]
    assert executed(out).chosen == "q"


async def test_retry_after_up_to_the_cap_is_honoured(h: Harness) -> None:
    p = Scripted("p", rate_limited(10.0), ok())
    await h.run(h.stage(p, retry_after_cap_s=10.0), task())
    assert p.attempts == [0, 1] and h.waits == [10.0]


async def test_timeouts_are_retried_then_fall_back(h: Harness) -> None:
    slow = Scripted("slow", ok(), hang_s=5.0)
    q = Scripted("q", ok())
    started = time.monotonic()
    out = await h.run(h.stage(slow, q, provider_timeout_s=0.05), task())
    assert time.monotonic() - started < 2.0
    failed = of(out, "ProviderCallFailed")
    assert [(f.provider, f.attempt, f.error_type) for f in failed] == \
        [("slow", 0, "timeout"), ("slow", 1, "timeout"), ("slow", 2, "timeout")]
    assert all(f.latency_ms >= 40 for f in failed)
    assert executed(out).chosen == "q"


async def test_every_failed_call_is_an_error_logged_provider(h: Harness) -> None:
    p = Scripted("p", rate_limited(0.2), server_error(502), auth)
    q = Scripted("q", ok())
    out = await h.run(h.stage(p, q), task())
    failed = [e for e in out if e.event_type == "ProviderCallFailed"]
    errors = [e for e in out if e.event_type == "ErrorLogged"]
    assert [(e.payload.category, e.payload.error_type, e.payload.context["attempt"])
            for e in errors] == [("PROVIDER", "rate_limited", 0), ("PROVIDER", "server_error", 1),
                                 ("PROVIDER", "auth", 2)]
    assert [e.payload.context["http_status"] for e in errors] == [429, 502, 401]
    assert all(e.payload.task_id == "t0" and e.payload.agent_id == "executor.provider.p"
               and e.causation_id == task().event_id for e in errors)
    ids = [e.event_id for e in failed + errors]
    assert len(set(ids)) == len(ids)


async def test_event_ids_are_the_same_when_the_batch_runs_again(h: Harness) -> None:
    def providers() -> tuple[Provider, ...]:
        return Scripted("p", server_error()), Scripted("q", rate_limited(0.1), ok())

    first = await h.run(h.stage(*providers()), task())
    again = await h.run(h.stage(*providers()), task())
    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert {e.event_type for e in first} >= {"ProviderSelected", "ProviderCallFailed", "ErrorLogged",
                                             "FallbackSelected", "ProviderCallCompleted", "TaskExecuted"}


async def test_every_attempt_and_fallback_gets_the_tasks_request(h: Harness) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    submitted = TaskSubmitted(task_id="t0", kind="json", prompt="Give a.", json_schema=schema)
    p, q = Scripted("p", server_error()), Scripted("q", ok('{"a": 1}'))
    await h.run(h.stage(p, q), task(submitted=submitted))
    assert [(r.attempt, r.kind, r.json_schema, r.task_type) for r in p.requests + q.requests] == \
        [(0, "json", schema, "string"), (1, "json", schema, "string"), (2, "json", schema, "string"),
         (0, "json", schema, "string")]


# --------------------------------------------------------------------------- fallbacks


async def test_fallback_answers_when_the_chosen_provider_cannot(h: Harness) -> None:
    p = Scripted("p", server_error(503))
    q = Scripted("q", ok("def f():\n    return 2\n"))
    out = await h.run(h.stage(p, q), task())
    assert p.attempts == [0, 1, 2] and q.attempts == [0]
    (selected,) = of(out, "ProviderSelected")
    assert selected.action == "p:single"
    (fb,) = of(out, "FallbackSelected")
    assert (fb.task_id, fb.action, fb.from_providers, fb.to_provider, fb.attempt) == \
        ("t0", "p:single", ["p"], "q", 1)
    assert fb.reason == "p: server_error, server_error, server_error"
    x = executed(out)
    # the action stays the policy's; the candidate names who answered
    assert (x.action, x.chosen, x.chosen_text) == ("p:single", "q", "def f():\n    return 2\n")
    assert x.cost_usd == pytest.approx(0.001) and x.tokens == 7
    # the fallback is announced before its calls
    types = [e.event_type for e in out]
    assert types.index("FallbackSelected") < types.index("ProviderCallCompleted")


async def test_no_fallback_after_an_answer(h: Harness) -> None:
    p = Scripted("p", server_error(), ok())
    q = Scripted("q", ok())
    out = await h.run(h.stage(p, q), task())
    assert q.requests == [] and of(out, "FallbackSelected") == []


async def test_fallback_order_is_q_value_then_registry_order(h: Harness) -> None:
    a, b, c, d = (Scripted(x, server_error()) for x in "abcd")
    await h.set_q({"a:single": 1.0, "b:single": 0.2, "c:single": 0.5})  # d unvisited: 0.0
    out = await h.run(h.stage(a, b, c, d, max_fallbacks=3), task())
    assert of(out, "ProviderSelected")[0].action == "a:single"
    fbs = of(out, "FallbackSelected")
    assert [(f.attempt, f.to_provider, f.from_providers) for f in fbs] == \
        [(1, "c", ["a"]), (2, "b", ["a", "c"]), (3, "d", ["a", "c", "b"])]


async def test_fallback_ties_go_in_registry_order(h: Harness) -> None:
    a, z, b = Scripted("a", auth), Scripted("z", auth), Scripted("b", ok())
    out = await h.run(h.stage(a, z, b), task())
    assert [f.to_provider for f in of(out, "FallbackSelected")] == ["z", "b"]
    assert executed(out).chosen == "b"


async def test_no_fallback_beyond_max_fallbacks(h: Harness) -> None:
    a, b, c = (Scripted(x, server_error()) for x in "abc")
    healthy = Scripted("d", ok())
    out = await h.run(h.stage(a, b, c, healthy, max_fallbacks=2), task())
    assert [f.to_provider for f in of(out, "FallbackSelected")] == ["b", "c"]
    assert healthy.requests == []
    x = executed(out)
    assert x.chosen is None and x.candidates == []


async def test_max_fallbacks_zero_disables_fallback(h: Harness) -> None:
    p, q = Scripted("p", auth), Scripted("q", ok())
    out = await h.run(h.stage(p, q, max_fallbacks=0), task())
    assert q.requests == [] and of(out, "FallbackSelected") == []
    assert executed(out).chosen is None


async def test_a_task_fails_only_when_no_provider_answers(h: Harness) -> None:
    a, b, c = Scripted("a", server_error()), Scripted("b", auth), Scripted("c", rate_limited(0.1))
    out = await h.run(h.stage(a, b, c), task())
    assert [len(p.requests) for p in (a, b, c)] == [3, 1, 3]
    assert len(of(out, "ErrorLogged")) == len(of(out, "ProviderCallFailed")) == 7
    x = executed(out)
    assert x.chosen is None and x.chosen_text is None and x.candidates == []


async def test_with_no_admissible_action_a_fallback_still_answers(h: Harness) -> None:
    """Only ``all:majority`` is configured and one provider's breaker is open: the policy has
    no action, but the healthy provider can still answer the task."""
    a, b = Scripted("a", ok()), Scripted("b", ok())
    await h.set_breaker("a", BreakerState(state="open", failures=5, opened_at_ms=(t := int(time.time() * 1000)),
                                        open_until_ms=t + 60_000))
    out = await h.run(h.stage(a, b, strategies=("majority",)), task())
    assert of(out, "ProviderSelected") == []
    (fb,) = of(out, "FallbackSelected")
    assert (fb.action, fb.from_providers, fb.to_provider) == ("none", [], "b")
    assert fb.reason == "no routing action was admissible"
    assert a.requests == []
    x = executed(out)
    assert (x.action, x.chosen) == ("none", "b")


# --------------------------------------------------------------------------- breakers


async def test_open_breaker_providers_are_skipped_by_routing_and_fallback(h: Harness) -> None:
    a, b, c = Scripted("a", server_error()), Scripted("b", ok()), Scripted("c", ok())
    await h.set_q({"b:single": 5.0, "a:single": 1.0})  # b would be chosen, and be the first fallback
    await h.set_breaker("b", BreakerState(state="open", failures=5, opened_at_ms=(t := int(time.time() * 1000)),
                                        open_until_ms=t + 60_000))
    out = await h.run(h.stage(a, b, c), task())
    (selected,) = of(out, "ProviderSelected")
    assert selected.action == "a:single" and selected.skipped_open == ["b"]
    assert [f.to_provider for f in of(out, "FallbackSelected")] == ["c"]
    assert b.requests == []
    assert executed(out).chosen == "c"


async def test_half_open_fallback_spends_a_permit_and_gets_one_attempt(h: Harness) -> None:
    """Two tasks fall back to a half-open provider with one permit in all: one gets it, and
    its trial is a single attempt (a failure reopens the breaker); the other finds none."""
    down = Scripted("down", server_error())
    trial = Scripted("trial", server_error())
    opened = int(time.time() * 1000) - 120_000  # the 60 s open timeout has elapsed
    await h.set_breaker("trial", BreakerState(state="open", failures=5, opened_at_ms=opened,
                                                      open_until_ms=opened + 60_000))
    out = await h.run(h.stage(down, trial, breaker_half_open_max_calls=1), task(0), task(1))
    assert [s.action for s in of(out, "ProviderSelected")] == ["down:single", "down:single"]
    assert trial.attempts == [0]
    assert len(of(out, "FallbackSelected")) == 1
    assert await h.redis.zcard(h.keys.ephemeral("halfopen", "trial", opened)) == 1


async def test_a_half_open_routing_choice_spends_a_permit(h: Harness) -> None:
    """The greedy policy picks the half-open provider (first in registry order) while its
    one permit lasts; the next task of the batch is routed elsewhere."""
    trial, b = Scripted("trial", ok()), Scripted("b", ok())
    opened = int(time.time() * 1000) - 120_000
    await h.set_breaker("trial", BreakerState(state="half_open", failures=5, opened_at_ms=opened))
    out = await h.run(h.stage(trial, b, breaker_half_open_max_calls=1), task(0), task(1))
    selected = of(out, "ProviderSelected")
    assert [(s.action, s.skipped_open) for s in selected] == \
        [("trial:single", []), ("b:single", ["trial"])]
    assert len(trial.requests) == 1


async def test_a_half_open_fallback_can_answer(h: Harness) -> None:
    down, trial = Scripted("down", auth), Scripted("trial", ok())
    opened = int(time.time() * 1000) - 120_000
    await h.set_breaker("trial", BreakerState(state="half_open", failures=5, opened_at_ms=opened))
    out = await h.run(h.stage(down, trial), task())
    assert executed(out).chosen == "trial"


async def test_unspent_trial_permits_are_given_back(h: Harness) -> None:
    a, trial = Scripted("a", ok()), Scripted("trial", ok())
    opened = int(time.time() * 1000) - 120_000
    await h.set_breaker("trial", BreakerState(state="open", failures=5, opened_at_ms=opened,
                                                      open_until_ms=opened + 60_000))
    key = h.keys.ephemeral("halfopen", "trial", opened)
    # another executor holds one of the two permits, unexpired
    await h.redis.zadd(key, {"elsewhere": int(time.time() * 1000) + 30_000})
    out = await h.run(h.stage(a, trial), task())
    assert executed(out).chosen == "a" and trial.requests == []
    assert await h.redis.zrange(key, 0, -1) == ["elsewhere"]
    assert await h.redis.pttl(key) > 0


async def test_permits_held_elsewhere_block_the_half_open_provider(h: Harness) -> None:
    down, trial = Scripted("down", auth), Scripted("trial", ok())
    opened = int(time.time() * 1000) - 120_000
    await h.set_breaker("trial", BreakerState(state="open", failures=5, opened_at_ms=opened,
                                                      open_until_ms=opened + 60_000))
    until = int(time.time() * 1000) + 30_000  # every permit taken, none expired
    await h.redis.zadd(h.keys.ephemeral("halfopen", "trial", opened), {"p1": until, "p2": until})
    out = await h.run(h.stage(down, trial), task())
    assert of(out, "ProviderSelected")[0].skipped_open == ["trial"]
    assert trial.requests == [] and of(out, "FallbackSelected") == []
    assert executed(out).chosen is None


def test_the_executor_batch_is_its_own_setting_and_the_others_use_batch_max() -> None:
    from streams.app import batch_limit
    from streams.pipeline import build_consumers

    providers = {"a": Scripted("a", "x")}
    for own, expected in ((None, 700), (5000, 5000)):
        settings = Settings(batch_max=700, executor_batch_max=own)
        limits = {c.name: batch_limit(c, settings) for c in build_consumers(settings, providers)}
        assert limits.pop("executor") == expected
        assert set(limits.values()) == {700}  # every other consumer keeps RMO_BATCH_MAX
