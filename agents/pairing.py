"""Pairing error patterns' occurrences with task outcomes, in bounded memory.

An error pattern's occurrences are the distinct tasks that failed by it *and whose outcome is
recorded* (agents/patterns.py, Confidence): numerator and denominator are the same tasks. The
two sides arrive on two topics read by two consumers (errors: the pattern extractor; rewards:
the outcomes projection), in either order. Each pair is counted once, when its second side is
applied, into the pattern hash's ``occurrences`` field.

**The protocol** (:data:`PAIR_LUA`, queued by both projections into their batch's commit,
streams/stage.py step 7):

1. Each side is a field of the task's join buffer, the hash ``{ns}:eph:learn:pair:{task}``:
   ``err<TAB>{pattern}`` (value: the pattern's outcomes scope) from an ``ErrorLogged``,
   ``out<TAB>{scope}`` from a ``RewardComputed`` (one per scope of the task's outcome,
   agents/outcomes.py). ``HSETNX``: a side already there (the validator logs up to five
   failures of one level, a call up to three attempts) changes nothing.
2. A side that is new completes the pairs whose other side is there: a new ``err`` field
   with its scope's ``out`` field, a new ``out`` field with every ``err`` field of that scope.
   Each completed pair increments ``occurrences`` of its pattern by one.
3. The buffer's expiry is set to ``Settings.learn_join_window_s`` from now.

One script per batch, so the check of step 2 and the write of step 1 are atomic against the
other consumer's: whichever side is applied second sees the first, never both or neither.
The count is therefore the number of (task, pattern) with both sides applied, the same in any
order; the commit protocol applies each event once.

**Why the buffer may expire.** It only needs to hold a side until the other arrives. Live, a
pair is lost only if the two consumers apply its sides more than the window apart: a consumer
that far behind (the default, 7 days, is Kafka's default log retention) has lost events to
the log's retention anyway. Replay applies a whole log in minutes, so it counts the same
pairs. The window is wall-clock time (a buffer is not state of the log but of its reading), so
the buffer lives under ``eph`` and ``rmo replay --verify`` compares the counts, not the buffers.
Memory: about rate x window of buffers (one per task with an error or an outcome), instead of
every task id ever seen in a set per scope and per pattern.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
from redis.asyncio import Redis

from streams.keys import Keys
from streams.stage import Tx

ERR = "err\t"
OUT = "out\t"

PAIR_LUA = """
local window = tonumber(ARGV[1])
local patterns = ARGV[2]
for k = 1, #KEYS do
  for _, side in ipairs(cjson.decode(ARGV[k + 2])) do
    local f, scope = side[1], side[2]
    if redis.call('HSETNX', KEYS[k], f, scope) == 1 then
      if string.sub(f, 1, 4) == 'err\t' then
        if redis.call('HEXISTS', KEYS[k], 'out\t' .. scope) == 1 then
          redis.call('HINCRBY', patterns .. string.sub(f, 5), 'occurrences', 1)
        end
      else
        local h = redis.call('HGETALL', KEYS[k])
        for i = 1, #h, 2 do
          if string.sub(h[i], 1, 4) == 'err\t' and h[i + 1] == scope then
            redis.call('HINCRBY', patterns .. string.sub(h[i], 5), 'occurrences', 1)
          end
        end
      end
    end
  end
  redis.call('PEXPIRE', KEYS[k], window)
end
return #KEYS
"""
"""KEYS: join buffers; ARGV: window (ms), the pattern hashes' key prefix, then per buffer its
sides as one JSON list of ``[field, scope]`` (module docstring, steps 1-3)."""

Sides = Mapping[str, Iterable[tuple[str, str]]]
"""task id -> its sides: ``(field, scope)``, from :func:`error_sides` / :func:`outcome_sides`."""


def error_sides(tasks_by_pattern: Mapping[str, tuple[str, Iterable[str]]]) -> dict[str, list[tuple[str, str]]]:
    """The ``err`` sides of ``pattern id -> (its scope, task ids)``, per task."""
    sides: dict[str, list[tuple[str, str]]] = {}
    for pid, (scope, tasks) in sorted(tasks_by_pattern.items()):
        for task in tasks:
            sides.setdefault(task, []).append((ERR + pid, scope))
    return sides


def outcome_sides(members: Mapping[str, Iterable[str]]) -> dict[str, list[tuple[str, str]]]:
    """The ``out`` sides of ``scope -> task ids`` (agents/outcomes.py ``OutcomeChanges``), per task."""
    sides: dict[str, list[tuple[str, str]]] = {}
    for scope, tasks in sorted(members.items()):
        for task in tasks:
            sides.setdefault(task, []).append((OUT + scope, scope))
    return sides


def queue_sides(tx: Tx, sides: Sides) -> None:
    """Queue one :data:`PAIR_LUA` of ``sides`` into ``tx``'s commit (nothing when empty)."""
    if not sides:
        return
    keys = tx.keys
    order = sorted(sides)
    args = [int(tx.ctx.settings.learn_join_window_s * 1000), keys.error_pattern("")]
    args += [orjson.dumps(sorted(set(sides[t]))) for t in order]
    tx.write(lambda pipe: pipe.eval(PAIR_LUA, len(order), *map(keys.learn_pair, order), *args))


async def paired(redis: Redis, keys: Keys, scopes: Mapping[str, str], *,
                 errors: Mapping[str, Iterable[str]] | None = None,
                 outcomes: Mapping[str, Iterable[str]] | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """``(pattern id -> occurrences, the outcomes hash)`` for the patterns of ``scopes``
    (pattern id -> its outcomes scope), read in one MULTI: the snapshot the projections
    commit. A caller's batch not committed yet counts as if it were: ``errors`` (pattern id
    -> task ids) and ``outcomes`` (scope -> task ids); each of their (task, pattern) pairs
    adds one when both sides are there with the batch and were not both there before it."""
    new_err = {pid: frozenset(ids) for pid, ids in (errors or {}).items()}
    new_out = {scope: frozenset(ids) for scope, ids in (outcomes or {}).items()}
    none: frozenset[str] = frozenset()
    pids = sorted(scopes)
    candidates = [(pid, task) for pid in pids
                  for task in sorted(new_err.get(pid, none) | new_out.get(scopes[pid], none))]
    pipe = redis.pipeline(transaction=True)
    pipe.hgetall(keys.outcomes)
    for pid in pids:
        pipe.hget(keys.error_pattern(pid), "occurrences")
    for pid, task in candidates:
        pipe.hmget(keys.learn_pair(task), [ERR + pid, OUT + scopes[pid]])
    outcomes_h, *rest = await pipe.execute()
    counts = {pid: int(n or 0) for pid, n in zip(pids, rest)}
    for (pid, task), (err, out) in zip(candidates, rest[len(pids):]):
        had_err, had_out = err is not None, out is not None
        has_err = had_err or task in new_err.get(pid, none)
        has_out = had_out or task in new_out.get(scopes[pid], none)
        counts[pid] += has_err and has_out and not (had_err and had_out)
    return counts, outcomes_h
