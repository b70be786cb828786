"""Budgets (SPEC §4 "Token budgets", Cortex's personal/workers budgets and emergency reserve),
safe under concurrency: several executor processes share one budget through one Lua script.

Configuration (YAML, ``--budgets FILE`` or ``RMO_BUDGETS_FILE``)::

    budgets:
      - {scope: global, period: total, limit_usd: 5.00, reserve_usd: 0.50, reserve_min_priority: 8}
      - {scope: "provider:claude", period: day, limit_usd: 2.00}
      - {scope: "task_type:math", part: workers, period: total, limit_tokens: 200000}

A **line** is (scope, part, period) with a USD and/or a token limit. Scopes: ``global`` (the
namespace), ``provider:ID``, ``task_type:T``. ``part`` splits a scope as Cortex splits a
master's budget: ``personal`` lines pay for a task's first provider, ``workers`` lines for the
extra calls of multi-provider consensus, and ``all`` (default) for every call. Periods: ``total``,
``day`` (UTC date), ``month`` (UTC year-month). The per-task ``TaskSubmitted.max_cost_usd`` is
enforced by the executor itself (:class:`TaskAllowance`): all calls of one task run in one
executor coroutine group, so no shared state is needed for it.

Amounts are integers: micro-USD and tokens. Never floats (rounding must not let a sum creep
over a limit).

The reservation protocol, per provider call (agents/executor.py ``_attempt``):

1. **Worst case.** Input tokens = the prompt's UTF-8 bytes plus :data:`PROMPT_OVERHEAD_TOKENS`
   (byte-level BPE tokenizers never emit more tokens than bytes, so this bounds any of them
   without a tokenizer at hand), output tokens = ``max_output_tokens``; USD at the provider's
   ``price_per_mtok()``. An unpriced model reserves tokens only (its calls cost 0 USD).
2. **Reserve** (:data:`RESERVE_LUA`, one script, atomic across processes): on every line of
   the call, drop expired members, then check ``spent + pending + reserved + worst <= cap``
   (cap = limit, minus the global reserve for a task below ``reserve_min_priority``). All lines
   admit or none is touched. Outcomes: granted (a member ``r:{id}`` holding the worst case,
   expiring after the call's timeout plus :data:`RESERVATION_GRACE_MS`, so a crashed executor's
   reservations free themselves); *busy* (it would fit once in-flight reservations settle: the
   executor waits and retries); *exhausted* (it cannot fit even with nothing in flight: the
   call is not made).
3. **Reconcile** (:data:`SETTLE_LUA`): after the call, the reservation becomes a *pending*
   member ``p:{event_id}`` holding the actual cost and tokens of the call's event, with a long
   expiry (``budget_pending_ttl_s``). A failed call that cost nothing just releases.
4. **Project.** :class:`streams.projections.BudgetProjection` adds each call event's cost and
   tokens to the spent counters of every scope and part the call pays into, for each period's
   bucket of the event's time and, in the same MULTI/EXEC as the checkpoint, removes the
   pending member of that event (:data:`CLEAR_LUA`, through the index ``settle`` wrote). So
   from the call's end until its event is applied, its amount is counted exactly once
   (pending), and afterwards once (spent): the invariant ``spent + pending + reserved <=
   limit`` holds at every instant, up to a call whose actual usage exceeded its worst case
   (a provider ignoring ``max_output_tokens``, or a tiered price above the base tier).

Spent is projection state, independent of the configured lines so that replay rebuilds it
exactly with or without a budgets file: hashes ``{ns}:budget:total``, ``{ns}:budget:day:{date}``
and ``{ns}:budget:month:{year-month}``, fields ``{scope}/{part}:microusd|tokens|calls``
(:func:`spent_fields`). Reservations and pending members are ephemeral
(``{ns}:eph:budget:{line}:{bucket}:exp|amt``, :func:`held_keys`); the Lua scripts also touch
the per-event index ``{ns}:eph:budget:pend:{event_id}`` (a key not passed in KEYS: fine on a
single Redis, not on Redis Cluster).

Pending members expire too: an executor that crashed between reconciling and producing its
events never produces them; a re-run reconciles the same event ids (same members, no double
count). A pending member whose event is dropped as a duplicate stays until it expires, which
over-counts (safe). ``budget_pending_ttl_s`` must exceed the calls consumer's lag, or an
unprojected amount would be forgotten early.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.asyncio import Redis

from streams.keys import Keys

MICRO = 1_000_000
PROMPT_OVERHEAD_TOKENS = 256
"""Tokens added to the request text's bytes for the chat template and system prompt
(agents/providers/prompting.py: the longest fixed system prompt is under 300 characters, and
a JSON schema it may embed is counted in the text; 256 leaves room for role markers)."""
RESERVATION_GRACE_MS = 10_000
"""A reservation outlives its call's timeout by this much (ms) before it expires."""
BUSY_POLL_S = 0.02
"""Seconds between retries of a reservation that is busy (waiting for in-flight calls)."""

Period = Literal["total", "day", "month"]
Part = Literal["all", "personal", "workers"]


class BudgetLine(BaseModel):
    """One configured budget: a scope, the part of it, a period, USD and/or token limits.

    ``reserve_usd``/``reserve_tokens`` (global scope only): the emergency reserve, the last part
    of the limit, granted only to tasks of priority >= ``reserve_min_priority``.

    Raises (pydantic ValidationError): no limit, a reserve on a non-global scope or larger than
    its limit, an unknown scope form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: str = Field(pattern=r"^(global|provider:[^:/]+|task_type:[^:/]+)$")
    part: Part = "all"
    period: Period = "total"
    limit_usd: float | None = Field(default=None, ge=0)
    limit_tokens: int | None = Field(default=None, ge=0)
    reserve_usd: float = Field(default=0.0, ge=0)
    reserve_tokens: int = Field(default=0, ge=0)
    reserve_min_priority: int = Field(default=11, ge=1, le=11)

    @model_validator(mode="after")
    def _check(self) -> BudgetLine:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError(f"budget {self.scope}: set limit_usd and/or limit_tokens")
        if (self.reserve_usd or self.reserve_tokens) and self.scope != "global":
            raise ValueError(f"budget {self.scope}: only the global scope holds a reserve")
        if self.reserve_usd > (self.limit_usd or 0) or self.reserve_tokens > (self.limit_tokens or 0):
            raise ValueError(f"budget {self.scope}: the reserve exceeds the limit")
        return self

    @property
    def id(self) -> str:
        """Key part naming the line, e.g. ``provider:claude/all/day``."""
        return f"{self.scope}/{self.part}/{self.period}"

    @property
    def limit_micro(self) -> int:
        """USD limit in micro-USD, -1 when there is none."""
        return -1 if self.limit_usd is None else round(self.limit_usd * MICRO)

    @property
    def limit_tok(self) -> int:
        return -1 if self.limit_tokens is None else self.limit_tokens

    @property
    def field(self) -> str:
        """The spent-hash field prefix of this line: ``{scope}/{part}`` (:func:`spent_fields`)."""
        return f"{self.scope}/{self.part}"

    def applies(self, provider: str, task_type: str, worker: bool) -> bool:
        """Whether a call of ``provider`` for a task of ``task_type`` is paid by this line;
        ``worker``: the call is an extra call of multi-provider consensus."""
        if self.part != "all" and (self.part == "workers") != worker:
            return False
        return (self.scope == "global" or self.scope == f"provider:{provider}"
                or self.scope == f"task_type:{task_type}")


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: tuple[BudgetLine, ...] = ()


def load_budgets(path: Path | None) -> BudgetConfig:
    """The budgets of a YAML file (module docstring); none when ``path`` is None.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not YAML (pydantic.ValidationError, a ValueError too: a line is
            invalid; its message names the field).
    """
    if path is None:
        return BudgetConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML: {exc}") from None
    return BudgetConfig.model_validate(raw or {})


def micro_ceil(usd: float) -> int:
    """``usd`` in micro-USD rounded up (after rounding to nano-USD, so float noise such as
    0.1 + 0.2 does not add a micro-USD): spent is never under-counted."""
    return -(-round(usd * 1e9) // 1000)


@dataclass(frozen=True)
class WorstCase:
    """A call's upper bound: micro-USD and tokens."""

    micro: int
    tokens: int


def request_text(prompt: str, json_schema: dict | None) -> str:
    """The text a call's request carries, for :func:`worst_case`: the prompt, and a json
    task's schema, which providers put into the system prompt (agents/providers/prompting.py)."""
    return prompt + (json.dumps(json_schema, indent=2, sort_keys=True) if json_schema else "")


def worst_case(sent: str, max_output_tokens: int,
               price_per_mtok: tuple[float, float] | None) -> WorstCase:
    """Step 1: the most a call can use (module docstring); ``sent``: the text the request
    carries (prompt, and a JSON schema put into the system prompt). Prices in USD per
    million tokens: a token at p USD/Mtok costs p micro-USD."""
    tokens_in = len(sent.encode("utf-8")) + PROMPT_OVERHEAD_TOKENS
    tokens = tokens_in + max_output_tokens
    if price_per_mtok is None:
        return WorstCase(0, tokens)
    pin, pout = price_per_mtok
    return WorstCase(math.ceil(tokens_in * pin + max_output_tokens * pout), tokens)


TASK_LINE = "task"
"""The line name of a task's own cap (``max_cost_usd``, ``budget_tokens``) in refusals."""


@dataclass
class TaskAllowance:
    """A task's own cap (``TaskSubmitted.max_cost_usd`` in micro-USD, ``budget_tokens``; None:
    unlimited) and what its calls spent and hold. All calls of one task run in one executor
    coroutine group, and asyncio does not switch inside these methods, so no lock is needed."""

    limit_micro: int | None
    limit_tokens: int | None
    spent: WorstCase = WorstCase(0, 0)
    held: WorstCase = WorstCase(0, 0)

    def take(self, worst: WorstCase) -> bool:
        """Hold ``worst`` if spent + held + worst fits both caps; False (nothing held) if not."""
        if self.limit_micro is not None and self.spent.micro + self.held.micro + worst.micro > self.limit_micro:
            return False
        if self.limit_tokens is not None and self.spent.tokens + self.held.tokens + worst.tokens > self.limit_tokens:
            return False
        self.held = WorstCase(self.held.micro + worst.micro, self.held.tokens + worst.tokens)
        return True

    def settle(self, worst: WorstCase, micro: int, tokens: int) -> None:
        """Release ``worst`` and add the call's actual micro-USD and tokens."""
        self.held = WorstCase(self.held.micro - worst.micro, self.held.tokens - worst.tokens)
        self.spent = WorstCase(self.spent.micro + micro, self.spent.tokens + tokens)


class BudgetRefused(Exception):
    """A call that no budget admits (step 2 exhausted): it is not made. ``line`` names the
    refusing line (:attr:`BudgetLine.id` or :data:`TASK_LINE`); ``reserve_denied``: the global
    reserve would have admitted it but the task's priority is too low."""

    def __init__(self, line: str, reserve_denied: bool = False) -> None:
        super().__init__(f"budget {line} exhausted")
        self.line = line
        self.reserve_denied = reserve_denied


_PRUNE = """
-- integers as Redis wants them: Lua numbers are doubles, and -0 or 1e+15 are not integers
local function int(n) return string.format('%d', n) end
local function num(amt, f) return tonumber(redis.call('HGET', amt, f) or '0') end
local function remove(exp, amt, m)
  local v = redis.call('HGET', amt, m)
  if not v then return end
  local u, t = string.match(v, '(-?%d+):(-?%d+)')
  local kind = string.sub(m, 1, 1)
  redis.call('HINCRBY', amt, '#' .. kind .. 'usd', int(-tonumber(u)))
  redis.call('HINCRBY', amt, '#' .. kind .. 'tok', int(-tonumber(t)))
  redis.call('HDEL', amt, m)
  redis.call('ZREM', exp, m)
end
local function prune(exp, amt, now)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now)) do remove(exp, amt, m) end
end
local function add(exp, amt, m, u, t, expiry, now)
  local kind = string.sub(m, 1, 1)
  redis.call('HSET', amt, m, int(u) .. ':' .. int(t))
  redis.call('HINCRBY', amt, '#' .. kind .. 'usd', int(u))
  redis.call('HINCRBY', amt, '#' .. kind .. 'tok', int(t))
  redis.call('ZADD', exp, expiry, m)
  -- the keys outlive their longest member by a minute, so abandoned buckets disappear; from
  -- the caller's clock, as every expiry here, so a skewed host cannot expire them early
  local ttl = math.ceil((tonumber(expiry) - tonumber(now)) / 1000) + 60
  if redis.call('TTL', amt) < ttl then
    redis.call('EXPIRE', amt, ttl)
    redis.call('EXPIRE', exp, ttl)
  end
end
"""

RESERVE_LUA = _PRUNE + """
-- KEYS: per line (spent hash, expiry zset, amount hash). ARGV: now_ms, member, expiry_ms,
-- worst_usd, worst_tok, then per line: spent field prefix, limit_usd, limit_tok, cap_usd,
-- cap_tok (the cap this task may use: the limit, or the limit minus the reserve below
-- reserve_min_priority), ordinary_usd, ordinary_tok (the limit minus the reserve); -1: no
-- limit. Returns {code, line index (1-based; 0 when granted), reserve}: code 0 granted
-- (reserve 1 when the grant dips into the reserve), 1 busy (it fits once in-flight
-- reservations settle), 2 exhausted (reserve 1 when the full limit would have admitted it:
-- denied by priority).
local now, member, expiry = ARGV[1], ARGV[2], ARGV[3]
local wu, wt = tonumber(ARGV[4]), tonumber(ARGV[5])
local function over(cap, used) return cap >= 0 and used > cap end
local n = #KEYS / 3
local from_reserve = 0
for i = 1, n do
  local spent, exp, amt = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  prune(exp, amt, now)
  local b = 5 + 7 * (i - 1)
  local f = ARGV[b+1]
  local lu, lt = tonumber(ARGV[b+2]), tonumber(ARGV[b+3])
  local cu, ct = tonumber(ARGV[b+4]), tonumber(ARGV[b+5])
  local ou, ot = tonumber(ARGV[b+6]), tonumber(ARGV[b+7])
  local su = tonumber(redis.call('HGET', spent, f .. ':microusd') or '0') + num(amt, '#pusd')
  local st = tonumber(redis.call('HGET', spent, f .. ':tokens') or '0') + num(amt, '#ptok')
  local ru, rt = num(amt, '#rusd'), num(amt, '#rtok')
  if over(cu, su + wu) or over(ct, st + wt) then
    local by_limit = not over(lu, su + wu) and not over(lt, st + wt)
    return {2, i, by_limit and 1 or 0}
  end
  if over(cu, su + ru + wu) or over(ct, st + rt + wt) then
    return {1, i, 0}
  end
  if over(ou, su + ru + wu) or over(ot, st + rt + wt) then from_reserve = 1 end
end
for i = 1, n do
  add(KEYS[3*i-1], KEYS[3*i], member, wu, wt, expiry, now)
end
return {0, 0, from_reserve}
"""

SETTLE_LUA = _PRUNE + """
-- KEYS: per line (expiry zset, amount hash) of the reservation's bucket, then per line the
-- same of the event's bucket (usually the same keys), then the event's pending index.
-- ARGV: now_ms, reservation member, pending member ('' to release only), actual_usd,
-- actual_tok, pending expiry_ms.
local n = (#KEYS - 1) / 4
for i = 1, n do
  remove(KEYS[2*i-1], KEYS[2*i], ARGV[2])
end
if ARGV[3] ~= '' then
  local held = {}
  for i = 1, n do
    local exp, amt = KEYS[2*n+2*i-1], KEYS[2*n+2*i]
    prune(exp, amt, ARGV[1])
    remove(exp, amt, ARGV[3])  -- a re-run reconciling the same event replaces its member
    add(exp, amt, ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[1])
    held[#held + 1] = exp
    held[#held + 1] = amt
  end
  local index = KEYS[#KEYS]
  redis.call('SET', index, table.concat(held, ' '),
             'PX', math.max(1, tonumber(ARGV[6]) - tonumber(ARGV[1])))
end
return 0
"""

CLEAR_LUA = _PRUNE + """
-- KEYS[1]: a projected event's pending index; ARGV[1]: its pending member. Removes the
-- member from every (expiry zset, amount hash) the index names (none: nothing pending).
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
local ks = {}
for k in string.gmatch(held, '%S+') do ks[#ks + 1] = k end
for i = 1, #ks / 2 do remove(ks[2*i-1], ks[2*i], ARGV[1]) end
redis.call('DEL', KEYS[1])
return 0
"""

PERIODS: tuple[Period, ...] = ("total", "day", "month")


def bucket(period: Period, t: datetime) -> str:
    """The bucket of UTC time ``t`` in ``period``: ``total``, ``day:2026-12-02``, ``month:2026-12``."""
    match period:
        case "day":
            return t.strftime("day:%Y-%m-%d")
        case "month":
            return t.strftime("month:%Y-%m")
    return "total"


def spent_key(keys: Keys, period: Period, t: datetime) -> str:
    """Projection hash of one period bucket: ``{ns}:budget:{bucket}``."""
    return keys.budget(bucket(period, t))


def spent_fields(provider: str, task_type: str | None, worker: bool) -> list[str]:
    """Field prefixes (``{scope}/{part}``) a call pays into, in every period bucket."""
    scopes = ["global", f"provider:{provider}"] + ([f"task_type:{task_type}"] if task_type else [])
    parts = ("all", "workers" if worker else "personal")
    return [f"{sc}/{pt}" for sc in scopes for pt in parts]


def held_keys(keys: Keys, line: BudgetLine, t: datetime) -> tuple[str, str]:
    """Ephemeral (expiry zset, amount hash) of a line's reservations and pending amounts in the
    bucket of ``t``. Amount fields: member -> ``"usd:tokens"``; totals ``#rusd #rtok``
    (reserved) and ``#pusd #ptok`` (pending)."""
    base = keys.ephemeral("budget", line.id, bucket(line.period, t))
    return f"{base}:exp", f"{base}:amt"


def pending_index(keys: Keys, event_id: str) -> str:
    """Ephemeral string naming the keys that hold a call event's pending member."""
    return keys.ephemeral("budget", "pend", event_id)


@dataclass(frozen=True)
class Grant:
    """A granted reservation (step 2): which lines and buckets hold it, its member and amounts."""

    member: str
    lines: tuple[BudgetLine, ...]
    at: datetime
    worst: WorstCase
    from_reserve: bool


@dataclass(frozen=True)
class Refusal:
    """An exhausted line (step 2): its id, and whether the reserve denied a low priority."""

    line: str
    reserve_denied: bool


@dataclass(frozen=True)
class Budgets:
    """The reservation protocol on one namespace's keys (module docstring);
    ``pending_ttl_ms``: how long a settled amount stays pending at most."""

    keys: Keys
    pending_ttl_ms: int

    async def reserve(self, redis: Redis, lines: tuple[BudgetLine, ...], member: str,
                      worst: WorstCase, priority: int, at: datetime, ttl_ms: int,
                      ) -> Grant | Refusal | None:
        """One attempt of step 2 at time ``at``: a Grant, a Refusal (exhausted), or None
        (busy: retry later). ``ttl_ms``: how long the reservation lives unless settled.
        ``member`` must start with ``r:`` and be unique per attempt."""
        keys, argv = self.reserve_args(lines, member, worst, priority, at, ttl_ms)
        return self.reserve_result(lines, member, worst, at,
                                   await redis.eval(RESERVE_LUA, len(keys), *keys, *argv))

    def reserve_result(self, lines: tuple[BudgetLine, ...], member: str, worst: WorstCase,
                       at: datetime, reply: list[int]) -> Grant | Refusal | None:
        """The outcome of :data:`RESERVE_LUA`'s ``reply`` (see :meth:`reserve`)."""
        code, index, reserve = (int(v) for v in reply)
        if code == 0:
            return Grant(member, lines, at, worst, bool(reserve))
        if code == 2:
            return Refusal(lines[index - 1].id, bool(reserve))
        return None

    def reserve_args(self, lines: tuple[BudgetLine, ...], member: str, worst: WorstCase,
                     priority: int, at: datetime, ttl_ms: int) -> tuple[list[str], list]:
        """KEYS and ARGV of :data:`RESERVE_LUA` for :meth:`reserve`."""
        now_ms = int(at.timestamp() * 1000)
        keys: list[str] = []
        argv: list[int | str] = [now_ms, member, now_ms + ttl_ms, worst.micro, worst.tokens]
        for x in lines:
            keys += [spent_key(self.keys, x.period, at), *held_keys(self.keys, x, at)]
            lu, lt = x.limit_micro, x.limit_tok
            ou = lu if lu < 0 else lu - round(x.reserve_usd * MICRO)
            ot = lt if lt < 0 else lt - x.reserve_tokens
            vip = priority >= x.reserve_min_priority
            argv += [x.field, lu, lt, lu if vip else ou, lt if vip else ot, ou, ot]
        return keys, argv

    async def settle(self, redis: Redis, grant: Grant, event_id: str | None, at: datetime,
                     micro: int, tokens: int) -> None:
        """Step 3: release ``grant``; with ``event_id``, keep the call's actual micro-USD and
        tokens pending under that event until the projection applies it (time ``at``: the
        event's occurred_at, whose bucket the projection will use)."""
        keys, argv = self.settle_args(grant, event_id, at, micro, tokens)
        await redis.eval(SETTLE_LUA, len(keys), *keys, *argv)

    def settle_args(self, grant: Grant, event_id: str | None, at: datetime, micro: int,
                    tokens: int) -> tuple[list[str], list]:
        """KEYS and ARGV of :data:`SETTLE_LUA` for :meth:`settle`."""
        now_ms = int(at.timestamp() * 1000)
        keys = [k for x in grant.lines for k in held_keys(self.keys, x, grant.at)]
        keys += [k for x in grant.lines for k in held_keys(self.keys, x, at)]
        keys.append(pending_index(self.keys, event_id or ""))
        pending = f"p:{event_id}" if event_id else ""
        return keys, [now_ms, grant.member, pending, micro, tokens, now_ms + self.pending_ttl_ms]


@dataclass(frozen=True)
class BudgetUsage:
    """One line of ``rmo budget``: the line's id, scope, part and period, the bucket now,
    limits (None: none), spent (projected), pending (settled, not yet projected) and reserved
    (in flight) amounts, what remains, and the part of the global reserve already used. USD
    as floats for display (computed from integer micro-USD), tokens as integers."""

    line: str
    scope: str
    part: str
    period: str
    bucket: str
    limit_usd: float | None
    limit_tokens: int | None
    spent_usd: float
    spent_tokens: int
    calls: int
    pending_usd: float
    pending_tokens: int
    reserved_usd: float
    reserved_tokens: int
    remaining_usd: float | None
    remaining_tokens: int | None
    reserve_usd: float
    reserve_granted_usd: float
    reserve_granted_tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


async def usage(redis: Redis, keys: Keys, lines: tuple[BudgetLine, ...], at: datetime) -> list[BudgetUsage]:
    """The state of every line at time ``at`` (its current bucket). Expired reservations still
    in Redis are left out (the reserve script prunes them on its next run)."""
    out: list[BudgetUsage] = []
    now_ms = int(at.timestamp() * 1000)
    for x in lines:
        spent = await redis.hmget(spent_key(keys, x.period, at),
                                  [f"{x.field}:microusd", f"{x.field}:tokens", f"{x.field}:calls"])
        su, st, calls = (int(v or 0) for v in spent)
        exp, amt = held_keys(keys, x, at)
        live = set(await redis.zrangebyscore(exp, f"({now_ms}", "+inf"))
        held = {"r": [0, 0], "p": [0, 0]}
        for member, value in (await redis.hgetall(amt)).items():
            member = member.decode() if isinstance(member, bytes) else member
            value = value.decode() if isinstance(value, bytes) else value
            if member.startswith("#") or member not in live:
                continue
            u, t = value.split(":")
            held[member[0]][0] += int(u)
            held[member[0]][1] += int(t)
        (ru, rt), (pu, pt) = held["r"], held["p"]
        lu, lt = x.limit_micro, x.limit_tok
        ordinary_u = lu - round(x.reserve_usd * MICRO) if lu >= 0 else -1
        ordinary_t = lt - x.reserve_tokens if lt >= 0 else -1
        out.append(BudgetUsage(
            line=x.id, scope=x.scope, part=x.part, period=x.period, bucket=bucket(x.period, at),
            limit_usd=x.limit_usd, limit_tokens=x.limit_tokens,
            spent_usd=su / MICRO, spent_tokens=st, calls=calls,
            pending_usd=pu / MICRO, pending_tokens=pt, reserved_usd=ru / MICRO, reserved_tokens=rt,
            remaining_usd=None if lu < 0 else max(0, lu - su - pu - ru) / MICRO,
            remaining_tokens=None if lt < 0 else max(0, lt - st - pt - rt),
            reserve_usd=x.reserve_usd,
            reserve_granted_usd=max(0, su - ordinary_u) / MICRO if x.reserve_usd else 0.0,
            reserve_granted_tokens=max(0, st - ordinary_t) if x.reserve_tokens else 0,
        ))
    return out
