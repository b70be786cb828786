"""agents/budget.py: configuration, worst cases, and the Lua-backed reservation protocol
against a real Redis (its own namespace per test), including a hypothesis state machine:
no interleaving of reserve / reconcile / release / expiry / projection lets
spent + pending + reserved exceed a limit."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pydantic import ValidationError
from redis import Redis

from agents.budget import (
    CLEAR_LUA,
    MICRO,
    PERIODS,
    RESERVE_LUA,
    SETTLE_LUA,
    BudgetConfig,
    BudgetLine,
    Budgets,
    Grant,
    Refusal,
    TaskAllowance,
    WorstCase,
    held_keys,
    micro_ceil,
    pending_index,
    spent_fields,
    spent_key,
    worst_case,
)
from streams.keys import Keys

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def redis(redis_url: str) -> Iterator[Redis]:
    r = Redis.from_url(redis_url, decode_responses=True)
    yield r
    for k in r.scan_iter("budgettest*"):
        r.delete(k)
    r.close()


def fresh_keys() -> Keys:
    return Keys(f"budgettest{secrets.token_hex(4)}")


def reserve(r: Redis, b: Budgets, lines, worst: WorstCase, priority: int = 3, at: datetime = T0,
            ttl_ms: int = 40_000) -> Grant | Refusal | None:
    member = f"r:{uuid.uuid4().hex}"
    keys, argv = b.reserve_args(lines, member, worst, priority, at, ttl_ms)
    return b.reserve_result(lines, member, worst, at, r.eval(RESERVE_LUA, len(keys), *keys, *argv))


def settle(r: Redis, b: Budgets, g: Grant, event_id: str | None, micro: int, tokens: int,
           at: datetime = T0) -> None:
    keys, argv = b.settle_args(g, event_id, at, micro, tokens)
    r.eval(SETTLE_LUA, len(keys), *keys, *argv)


def project(r: Redis, keys: Keys, event_id: str, provider: str, micro: int, tokens: int,
            at: datetime = T0) -> None:
    """What BudgetProjection writes for one call event, in one MULTI/EXEC."""
    pipe = r.pipeline(transaction=True)
    for period in PERIODS:
        for prefix in spent_fields(provider, "math", False):
            pipe.hincrby(spent_key(keys, period, at), f"{prefix}:microusd", micro)
            pipe.hincrby(spent_key(keys, period, at), f"{prefix}:tokens", tokens)
    pipe.eval(CLEAR_LUA, 1, pending_index(keys, event_id), f"p:{event_id}")
    pipe.execute()


# --------------------------------------------------------------------------- config


def test_a_line_needs_a_limit_and_only_global_holds_a_reserve() -> None:
    with pytest.raises(ValidationError, match="limit_usd and/or limit_tokens"):
        BudgetLine(scope="global")
    with pytest.raises(ValidationError, match="only the global scope"):
        BudgetLine(scope="provider:claude", limit_usd=1, reserve_usd=0.1)
    with pytest.raises(ValidationError, match="exceeds the limit"):
        BudgetLine(scope="global", limit_usd=1, reserve_usd=2)
    with pytest.raises(ValidationError):
        BudgetLine(scope="team:x", limit_usd=1)
    cfg = BudgetConfig.model_validate({"budgets": [
        {"scope": "global", "period": "total", "limit_usd": 5.0, "reserve_usd": 0.5, "reserve_min_priority": 4},
        {"scope": "provider:claude", "period": "day", "limit_usd": 2.0},
        {"scope": "task_type:math", "part": "workers", "limit_tokens": 200000}]})
    assert [x.id for x in cfg.budgets] == ["global/all/total", "provider:claude/all/day",
                                           "task_type:math/workers/total"]
    assert cfg.budgets[0].limit_micro == 5_000_000 and cfg.budgets[2].limit_micro == -1


def test_lines_apply_by_scope_and_part() -> None:
    glob = BudgetLine(scope="global", limit_usd=1)
    claude = BudgetLine(scope="provider:claude", limit_usd=1)
    workers = BudgetLine(scope="task_type:math", part="workers", limit_usd=1)
    personal = BudgetLine(scope="task_type:math", part="personal", limit_usd=1)
    assert glob.applies("grok", "string", False) and glob.applies("grok", "string", True)
    assert claude.applies("claude", "x", False) and not claude.applies("grok", "x", False)
    assert workers.applies("grok", "math", True) and not workers.applies("grok", "math", False)
    assert personal.applies("grok", "math", False) and not personal.applies("grok", "math", True)
    assert not workers.applies("grok", "string", True)


def test_worst_case_bounds_a_byte_level_tokenizer_and_an_unpriced_model_reserves_tokens() -> None:
    w = worst_case("é" * 10, 100, (3.0, 15.0))  # 20 UTF-8 bytes
    assert w.tokens == 20 + 256 + 100
    assert w.micro == (20 + 256) * 3 + 100 * 15  # p USD/Mtok = p micro-USD per token
    assert worst_case("abc", 100, None) == WorstCase(0, 3 + 256 + 100)


def test_micro_ceil_never_undercounts() -> None:
    assert micro_ceil(0.1 + 0.2) == 300_000  # float noise does not add a micro-USD
    assert micro_ceil(0.0000011) == 2
    assert micro_ceil(0.0) == 0


def test_task_allowance_holds_worst_cases_against_its_cap() -> None:
    a = TaskAllowance(limit_micro=1000, limit_tokens=None)
    assert a.take(WorstCase(600, 10))
    assert not a.take(WorstCase(500, 10))  # 600 held + 500 > 1000
    a.settle(WorstCase(600, 10), 100, 10)
    assert a.take(WorstCase(500, 10)) and a.spent == WorstCase(100, 10)


# --------------------------------------------------------------------------- protocol


def test_reserve_is_all_or_none_and_names_the_exhausted_line(redis: Redis) -> None:
    keys = fresh_keys()
    glob = BudgetLine(scope="global", limit_usd=1.0)
    prov = BudgetLine(scope="provider:a", limit_tokens=1000)
    b = Budgets(keys, 600_000)
    got = reserve(redis, b, (glob, prov), WorstCase(10_000, 1500))
    assert got == Refusal("provider:a/all/total", False)
    # nothing held on the global line either
    assert redis.hget(held_keys(keys, glob, T0)[1], "#rusd") is None
    assert isinstance(reserve(redis, b, (glob, prov), WorstCase(10_000, 600)), Grant)


def test_busy_until_reservations_settle_then_exhausted_once_spent(redis: Redis) -> None:
    keys = fresh_keys()
    line = BudgetLine(scope="global", limit_usd=0.01)  # 10_000 micro-USD
    b = Budgets(keys, 600_000)
    g = reserve(redis, b, (line,), WorstCase(6000, 0))
    assert isinstance(g, Grant)
    assert reserve(redis, b, (line,), WorstCase(6000, 0)) is None  # busy: fits once g settles
    settle(redis, b, g, "e1", 5000, 0)  # pending 5000
    assert reserve(redis, b, (line,), WorstCase(6000, 0)) == Refusal("global/all/total", False)
    project(redis, keys, "e1", "a", 5000, 0)  # pending -> spent, counted once
    assert redis.hget(held_keys(keys, line, T0)[1], "#pusd") == "0"
    assert redis.hget(spent_key(keys, "total", T0), "global/all:microusd") == "5000"
    assert isinstance(reserve(redis, b, (line,), WorstCase(5000, 0)), Grant)


def test_a_failed_call_releases_and_a_crashed_reservation_expires(redis: Redis) -> None:
    keys = fresh_keys()
    line = BudgetLine(scope="global", limit_usd=0.01)
    b = Budgets(keys, 600_000)
    g = reserve(redis, b, (line,), WorstCase(8000, 0))
    settle(redis, b, g, None, 0, 0)  # failed, cost nothing: released
    crashed = reserve(redis, b, (line,), WorstCase(8000, 0), ttl_ms=1000)
    assert isinstance(crashed, Grant)
    assert reserve(redis, b, (line,), WorstCase(8000, 0), at=T0 + timedelta(milliseconds=999)) is None
    assert isinstance(reserve(redis, b, (line,), WorstCase(8000, 0), at=T0 + timedelta(seconds=1)), Grant)


def test_the_reserve_grants_by_priority_and_denies_otherwise(redis: Redis) -> None:
    keys = fresh_keys()
    line = BudgetLine(scope="global", limit_usd=0.01, reserve_usd=0.004, reserve_min_priority=4)
    b = Budgets(keys, 600_000)
    g = reserve(redis, b, (line,), WorstCase(5000, 0))
    assert isinstance(g, Grant) and not g.from_reserve
    settle(redis, b, g, "e1", 5000, 0)
    # 5000 + 2000 > the ordinary 6000: only a priority >= 4 task may dip into the reserve
    assert reserve(redis, b, (line,), WorstCase(2000, 0), priority=3) == Refusal("global/all/total", True)
    granted = reserve(redis, b, (line,), WorstCase(2000, 0), priority=4)
    assert isinstance(granted, Grant) and granted.from_reserve
    # beyond the full limit even a priority task is refused, and not "by priority"
    assert reserve(redis, b, (line,), WorstCase(4000, 0), priority=5) is None
    settle(redis, b, granted, "e2", 2000, 0)
    assert reserve(redis, b, (line,), WorstCase(4000, 0), priority=5) == Refusal("global/all/total", False)


def test_a_rerun_reconciling_the_same_event_does_not_count_it_twice(redis: Redis) -> None:
    keys = fresh_keys()
    line = BudgetLine(scope="global", limit_usd=0.01)
    b = Budgets(keys, 600_000)
    for _ in range(2):  # a crashed executor re-runs the batch: same deterministic event id
        g = reserve(redis, b, (line,), WorstCase(3000, 0))
        settle(redis, b, g, "same", 3000, 0)
    assert redis.hget(held_keys(keys, line, T0)[1], "#pusd") == "3000"


def test_day_buckets_are_separate(redis: Redis) -> None:
    keys = fresh_keys()
    line = BudgetLine(scope="provider:a", period="day", limit_usd=0.01)
    b = Budgets(keys, 600_000)
    g = reserve(redis, b, (line,), WorstCase(9000, 0))
    settle(redis, b, g, "e1", 9000, 0)
    project(redis, keys, "e1", "a", 9000, 0)
    assert isinstance(reserve(redis, b, (line,), WorstCase(2000, 0)), Refusal)
    assert isinstance(reserve(redis, b, (line,), WorstCase(2000, 0), at=T0 + timedelta(days=1)), Grant)


# --------------------------------------------------------------------------- property


LIMIT_MICRO = 20_000
LIMIT_TOKENS = 5_000
RESERVATION_TTL_MS = 3_000
PENDING_TTL_MS = 10_000


class ReservationMachine(RuleBasedStateMachine):
    """Executors reserve, reconcile or release; their reservations and pending amounts expire
    when they crash; the projection applies call events in any order. A pending amount is
    projected only before it expires (``budget_pending_ttl_s`` exceeds the consumer's lag):
    an expired one belongs to an event that was never produced."""

    redis_url = ""  # set by the test from the session's Redis

    @initialize()
    def setup(self) -> None:
        self.r: Redis = Redis.from_url(self.redis_url, decode_responses=True)
        self.keys = fresh_keys()
        self.lines = (BudgetLine(scope="global", limit_usd=LIMIT_MICRO / MICRO, reserve_usd=0.005,
                                 reserve_min_priority=4),
                      BudgetLine(scope="provider:a", limit_tokens=LIMIT_TOKENS))
        self.b = Budgets(self.keys, PENDING_TTL_MS)
        self.now = T0
        self.inflight: list[tuple[Grant, str, datetime]] = []  # provider, expiry
        self.pending: list[tuple[str, str, int, int, datetime]] = []  # event, provider, amounts, expiry

    def teardown(self) -> None:
        if hasattr(self, "r"):
            for k in self.r.scan_iter(f"{self.keys.namespace}:*"):
                self.r.delete(k)
            self.r.close()

    def _expire(self) -> None:
        self.inflight = [x for x in self.inflight if x[2] > self.now]
        self.pending = [p for p in self.pending if p[4] > self.now]

    @rule(micro=st.integers(0, 9000), tokens=st.integers(0, 3000), priority=st.integers(1, 5),
          provider=st.sampled_from(["a", "b"]))
    def reserve(self, micro: int, tokens: int, priority: int, provider: str) -> None:
        lines = tuple(x for x in self.lines if x.applies(provider, "math", False))
        got = reserve(self.r, self.b, lines, WorstCase(micro, tokens), priority, self.now,
                      RESERVATION_TTL_MS)
        if isinstance(got, Grant):
            self.inflight.append((got, provider, self.now + timedelta(milliseconds=RESERVATION_TTL_MS)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data(), failed=st.booleans())
    def reconcile_or_release(self, data, failed: bool) -> None:
        i = data.draw(st.integers(0, len(self.inflight) - 1))
        g, provider, _ = self.inflight.pop(i)
        micro = data.draw(st.integers(0, g.worst.micro))
        tokens = data.draw(st.integers(0, g.worst.tokens))
        if failed and data.draw(st.booleans()):
            settle(self.r, self.b, g, None, 0, 0)  # a failed call that cost nothing
            return
        event_id = uuid.uuid4().hex
        settle(self.r, self.b, g, event_id, micro, tokens, self.now)
        self.pending.append((event_id, provider, micro, tokens,
                             self.now + timedelta(milliseconds=PENDING_TTL_MS)))

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def project(self, data) -> None:
        event_id, provider, micro, tokens, _ = self.pending.pop(
            data.draw(st.integers(0, len(self.pending) - 1)))
        project(self.r, self.keys, event_id, provider, micro, tokens, self.now)

    @rule(ms=st.integers(1, 4000))
    def advance(self, ms: int) -> None:
        self.now += timedelta(milliseconds=ms)
        self._expire()

    @invariant()
    def never_over_a_limit(self) -> None:
        if not hasattr(self, "r"):
            return
        now_ms = int(self.now.timestamp() * 1000)
        for x, (limit, i) in zip(self.lines, ((LIMIT_MICRO, 0), (LIMIT_TOKENS, 1))):
            f = "microusd" if i == 0 else "tokens"
            spent = int(self.r.hget(spent_key(self.keys, "total", self.now), f"{x.field}:{f}") or 0)
            exp, amt = held_keys(self.keys, x, self.now)
            live = set(self.r.zrangebyscore(exp, f"({now_ms}", "+inf"))
            held = sum(int(v.split(":")[i]) for m, v in self.r.hgetall(amt).items()
                       if not m.startswith("#") and m in live)
            assert spent + held <= limit, (x.id, spent, held)
        # Redis holds exactly the model's live amounts, nothing leaked or lost
        exp, amt = held_keys(self.keys, self.lines[0], self.now)
        live = set(self.r.zrangebyscore(exp, f"({now_ms}", "+inf"))
        assert live == ({g.member for g, _, _ in self.inflight} | {f"p:{p[0]}" for p in self.pending})


@pytest.mark.timeout(300)
def test_no_interleaving_overspends(redis_url: str) -> None:
    ReservationMachine.redis_url = redis_url
    run = ReservationMachine.TestCase
    run.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
    run().runTest()


# --------------------------------------------------------------------------- executor


@pytest.fixture
async def aredis(redis_url: str):
    from redis.asyncio import Redis as AsyncRedis

    r = AsyncRedis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


def harness(namespace: str, aredis, tmp_path, body: str):
    from tests.unit.test_executor_fallback import Harness

    h = Harness(namespace, aredis)
    path = tmp_path / "budgets.yaml"
    path.write_text(body)
    h.settings = h.settings.model_copy(update={"budgets_file": path})
    return h


# "def f():\n" at grok-4's 3 / 15 USD per Mtok: (9 + 256) * 3 + 1024 * 15 = 16_155 micro-USD
GROK_WORST = 16_155


async def test_a_call_no_budget_admits_is_not_made_and_the_task_names_the_line(
        namespace, aredis, tmp_path) -> None:
    from tests.unit.test_executor_fallback import Scripted, executed, of, ok, task

    h = harness(namespace, aredis, tmp_path,
                f"budgets:\n  - {{scope: global, limit_usd: {(GROK_WORST - 1) / MICRO}}}\n")
    p = Scripted("p", ok())
    out = await h.run(h.stage(p), task())
    assert p.requests == []
    assert of(out, "ProviderCallCompleted") == [] and of(out, "ProviderCallFailed") == []
    x = executed(out)
    assert x.chosen is None and x.budget_scope == "global/all/total"
    (refusal,) = of(out, "BudgetExceeded")
    assert (refusal.provider, refusal.line, refusal.worst_microusd) == ("p", "global/all/total", GROK_WORST)
    assert [e.category for e in of(out, "ErrorLogged")] == ["BUDGET"]


async def test_a_refused_provider_falls_back_and_the_call_is_settled_pending(
        namespace, aredis, tmp_path) -> None:
    from tests.unit.test_executor_fallback import Scripted, executed, of, ok, task

    h = harness(namespace, aredis, tmp_path, "budgets:\n  - {scope: 'provider:p', limit_usd: 0.001}\n"
                "  - {scope: global, limit_usd: 1.0}\n")
    p, q = Scripted("p", ok()), Scripted("q", ok())
    out = await h.run(h.stage(p, q), task())
    assert p.requests == [] and len(q.requests) == 1
    x = executed(out)
    assert x.chosen == "q" and x.budget_scope is None
    (call,) = of(out, "ProviderCallCompleted")
    assert (call.task_type, call.worker) == ("string", False)
    # the call's actual cost (0.001 USD) is pending under its event id, the reservation gone
    glob = BudgetLine(scope="global", limit_usd=1.0)
    _, amt = held_keys(h.keys, glob, datetime.now(UTC))
    held = await aredis.hgetall(amt)
    assert held["#rusd"] == "0" and held["#pusd"] == "1000"
    (event_id,) = [e.event_id for e in out if e.event_type == "ProviderCallCompleted"]
    assert [m for m in held if m[:2] in ("p:", "r:")] == [f"p:{event_id}"]


async def test_the_task_cap_refuses_what_max_cost_usd_cannot_cover(namespace, aredis, tmp_path) -> None:
    from models.events import TaskSubmitted
    from tests.unit.test_executor_fallback import Scripted, executed, ok, task

    h = harness(namespace, aredis, tmp_path, "budgets: []\n")
    capped = TaskSubmitted(task_id="t0", kind="code", prompt="def f():\n", entry_point="f",
                           max_cost_usd=(GROK_WORST - 1) / MICRO)
    p = Scripted("p", ok())
    out = await h.run(h.stage(p), task(0, capped))
    assert p.requests == [] and executed(out).budget_scope == "task"
    roomy = capped.model_copy(update={"max_cost_usd": GROK_WORST / MICRO})
    out = await h.run(h.stage(p), task(0, roomy))
    assert len(p.requests) == 1 and executed(out).chosen == "p"


def test_a_budget_refusal_completes_budget_exceeded() -> None:
    from models.events import RewardComputed

    r = RewardComputed(task_id="t", state="s", action="a", next_state="s2", performance=0.0,
                       cost_usd=0.0, cost_weight=10.0, reward=0.0, passed=False, provider=None,
                       tokens=0, budget_scope="global/all/total")
    assert r.completion_status == "budget_exceeded"
    assert r.model_copy(update={"budget_scope": None}).completion_status == "failed"
