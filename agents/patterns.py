"""The pattern extractor (Fractal-RMO learning subsystem; SPEC §4 learning, §7): recurring
errors in ``ErrorLogged`` become ``PatternDetected`` events on the learning topic.

**Keys.** An error counts toward the pattern whose key makes a rule actionable
(``category|error_type|task_type|complexity|provider``, ``*`` for a part the rule does not
depend on):

- an answer the validator failed (SYNTAX, LOGIC, RUNTIME, TIMEOUT, PERFORMANCE, SECURITY,
  SCHEMA): ``{category}|*|{task_type}|*|{provider}``, the provider whose answer it was. A rule
  can route that task type away from that provider;
- a provider call that timed out (PROVIDER, ``timeout``): ``PROVIDER|timeout|*|{complexity}|*``.
  A rule can give tasks of that complexity longer.

Other errors (rate limits, 5xx, budgets) are the breakers' and budgets' business: no pattern.
The context fields come from where the errors are built (agents/validator.py,
agents/executor.py ``_failed``).

**Counts** (:class:`PatternProjection`, from the errors topic): ``occurrences`` are distinct
tasks (the validator logs up to five failures of one level; a provider call up to three
attempts), ``events`` the ErrorLogged events; ``truncated`` counts SYNTAX errors of an answer
that ends mid-statement (:func:`is_truncated`), ``at_limit`` the timeouts that ran to the
executor's own limit (:data:`AT_LIMIT_SHARE` of it).

**Confidence** rises with frequency: ``occurrences / (opportunities + 1)``, where the
opportunities are the tasks that could have failed this way: the validated answers of that
provider on that task type, or every task of that complexity (agents/outcomes.py). This is
the posterior mean of the failure share under a Beta(0, 1) prior (one imagined success), so
a share needs repeats to be believed: 3 of 3 gives 0.75, 4 of 4 0.8, 9 of 9 0.9, while 3 of
10 stays 0.27. Outcomes are counted from the rewards topic, which trails the errors by the
learning stage's lag, so an occurrence counts only once its task's outcome is in
(:func:`occurrences`; the pairing, in bounded memory: agents/pairing.py): numerator and denominator are the same tasks, and a lag delays a
detection but never inflates a confidence.

**Detection** (:func:`detect`, live only): when a pattern has at least
:data:`MIN_OCCURRENCES` (3) occurrences and confidence >= :data:`DETECT_CONFIDENCE` (0.7), its
``PatternDetected`` is emitted once. Either side of the pair can complete the evidence, so
both check: the errors consumer (:class:`PatternExtractor`) as errors arrive, the rewards
consumer (agents/rules.py ``RuleMonitor``) as the outcomes of their tasks arrive. The event id
derives from the pattern key, not from the event that tipped it: a re-run, the other
consumer, or a second worker racing on another partition makes the same id, which the rules
consumer drops as a duplicate.
"""

from __future__ import annotations

import codeop
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from redis.asyncio import Redis

from agents.outcomes import ANY, OutcomeChanges, Outcomes, complexity_scope, type_scope
from agents.pairing import error_sides, paired, queue_sides
from models.codec import derive_event_id, make_event
from models.events import Envelope, ErrorLogged, PatternDetected
from streams.config import Settings
from streams.keys import Keys
from streams.projections import epoch_ms
from streams.stage import Consumer, Tx

MIN_OCCURRENCES = 3
"""A pattern needs this many distinct tasks (SPEC §4, §7)."""
DETECT_CONFIDENCE = 0.7
"""The extractor's confidence threshold (SPEC §7)."""
AT_LIMIT_SHARE = 0.95
"""A timeout whose latency reached this share of the executor's limit ran to that limit."""
ANSWER_CATEGORIES = frozenset({"SYNTAX", "LOGIC", "RUNTIME", "TIMEOUT", "PERFORMANCE",
                               "SECURITY", "SCHEMA"})
"""The validator's failure categories of an answer (agents/validation.py)."""
PRODUCER = "learning.patterns"

# min/max of the stored event times in one atomic step, so workers sharing the errors
# topic's partitions never lose an earlier first or a later last occurrence
_SPAN_LUA = """
local first = redis.call('HGET', KEYS[1], 'first_seen_ms')
if not first or tonumber(ARGV[1]) < tonumber(first) then
  redis.call('HSET', KEYS[1], 'first_seen_ms', ARGV[1]) end
local last = redis.call('HGET', KEYS[1], 'last_seen_ms')
if not last or tonumber(ARGV[2]) > tonumber(last) then
  redis.call('HSET', KEYS[1], 'last_seen_ms', ARGV[2]) end
return 1
"""


@dataclass(frozen=True)
class PatternKey:
    """What an error pattern is about; :data:`agents.outcomes.ANY` where it does not matter."""

    category: str
    error_type: str
    task_type: str
    complexity: str
    provider: str

    @property
    def id(self) -> str:
        """``category|error_type|task_type|complexity|provider``."""
        return f"{self.category}|{self.error_type}|{self.task_type}|{self.complexity}|{self.provider}"

    @classmethod
    def parse(cls, pattern: str) -> PatternKey:
        """The key of a :attr:`id` string. Raises ValueError for another shape."""
        parts = pattern.split("|")
        if len(parts) != 5:
            raise ValueError(f"not a pattern key: {pattern!r}")
        return cls(*parts)

    def opportunities(self, outcomes: Outcomes) -> int:
        """The tasks that could have failed by this pattern (module docstring)."""
        if self.provider != ANY:
            return outcomes.on(self.task_type, self.provider).tasks
        return outcomes.of_complexity(self.complexity).tasks

    @property
    def scope(self) -> str:
        """The outcomes scope its opportunities are counted in (agents/outcomes.py)."""
        if self.provider != ANY:
            return type_scope(self.task_type, self.provider)
        return complexity_scope(self.complexity)


async def occurrences(redis: Redis, keys: Keys, patterns: Sequence[str], *,
                      errors: Mapping[str, set[str]] | None = None,
                      outcomes: OutcomeChanges | None = None) -> tuple[dict[str, int], Outcomes]:
    """``(pattern id -> its occurrences whose outcome is recorded, the outcomes)``: each
    pattern's count of paired tasks (agents/pairing.py), so each occurrence comes with its
    opportunity (module docstring: Confidence). A caller's batch not committed yet counts
    too: ``errors`` (pattern id -> task ids) or ``outcomes`` (a batch of rewards). One MULTI
    reads the counts and the outcomes hash: the snapshot the projections commit."""
    pending = outcomes or OutcomeChanges()
    counts, outcomes_h = await paired(redis, keys, {pid: PatternKey.parse(pid).scope for pid in patterns},
                                      errors=errors, outcomes=pending.members)
    return counts, Outcomes.from_hash(outcomes_h).plus(pending)


def pattern_key(err: ErrorLogged) -> PatternKey | None:
    """The pattern ``err`` counts toward, or None (module docstring: Keys)."""
    ctx = err.context
    if err.category in ANSWER_CATEGORIES:
        task_type, provider = ctx.get("task_type"), ctx.get("provider")
        if isinstance(task_type, str) and isinstance(provider, str):
            return PatternKey(err.category, ANY, task_type, ANY, provider)
    elif err.category == "PROVIDER" and err.error_type == "timeout":
        complexity = ctx.get("complexity")
        if isinstance(complexity, str):
            return PatternKey("PROVIDER", "timeout", ANY, complexity, ANY)
    return None


def confidence(occurrences: int, opportunities: int) -> float:
    """``occurrences / (opportunities + 1)`` (module docstring); occurrences are paired with
    opportunities (:func:`occurrences`), so ``min`` only guards against a caller that did not."""
    return min(occurrences, opportunities) / (opportunities + 1)


def is_truncated(code: str | None) -> bool:
    """True when ``code`` fails to compile only because it stops mid-statement (an open
    bracket, block or triple-quoted string at the end), i.e. it reads like an answer cut off
    mid-generation. The test is the interactive interpreter's own "needs more input" check
    (:func:`codeop.compile_command` returns None for incomplete source)."""
    if not code:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in candidate code warn
            return codeop.compile_command(code, "<candidate>", "exec") is None
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False


@dataclass(frozen=True)
class PatternCounts:
    """One pattern's projected hash, read. Times in ms since the epoch (event time)."""

    events: int = 0
    truncated: int = 0
    at_limit: int = 0
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> PatternCounts:
        def n(f: str) -> int | None:
            return int(h[f]) if f in h else None
        return cls(n("events") or 0, n("truncated") or 0, n("at_limit") or 0,
                   n("first_seen_ms"), n("last_seen_ms"))


def to_time(ms: int | None) -> datetime | None:
    """A time in ms since the epoch as a UTC datetime (None stays None)."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


class PatternProjection:
    """``{ns}:learn:pattern:{key}`` hash (the key's parts, ``events``, ``truncated``,
    ``at_limit``, ``first_seen_ms``, ``last_seen_ms``; ``occurrences`` is the pairing's,
    agents/pairing.py, of which each error's task is one side) and the ``{ns}:learn:patterns``
    index, from ``ErrorLogged``. Only sums, set unions, min/max and pairs: the same whatever
    order the errors topic's partitions are read in. ``timeout_ms``: the executor's provider
    timeout (``at_limit``)."""

    name = "patterns"

    def __init__(self, timeout_ms: float) -> None:
        self.timeout_ms = timeout_ms

    def counts(self, events: Sequence[Envelope]) -> dict[str, tuple[PatternKey, dict[str, int], set[str]]]:
        """pattern id -> (key, increments of events/truncated/at_limit and the min/max event
        times in ms, the task ids) over ``events``."""
        out: dict[str, tuple[PatternKey, dict[str, int], set[str]]] = {}
        for e in events:
            if e.event_type != "ErrorLogged":
                continue
            err: ErrorLogged = e.payload
            key = pattern_key(err)
            if key is None:
                continue
            _, d, tasks = out.setdefault(key.id, (key, {}, set()))
            at = epoch_ms(e.occurred_at)
            d["events"] = d.get("events", 0) + 1
            d["truncated"] = d.get("truncated", 0) + (err.context.get("truncated") is True)
            latency = err.context.get("latency_ms")
            d["at_limit"] = d.get("at_limit", 0) + (
                isinstance(latency, int | float) and latency >= AT_LIMIT_SHARE * self.timeout_ms
                and key.category == "PROVIDER")
            d["first"] = min(d.get("first", at), at)
            d["last"] = max(d.get("last", at), at)
            if err.task_id:
                tasks.add(err.task_id)
        return out

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        counts = self.counts(events)
        if not counts:
            return

        def write(pipe, counts=counts) -> None:
            k = tx.keys
            for pid, (key, d, tasks) in counts.items():
                pipe.sadd(k.error_patterns, pid)
                pipe.hset(k.error_pattern(pid), mapping={
                    "category": key.category, "error_type": key.error_type,
                    "task_type": key.task_type, "complexity": key.complexity,
                    "provider": key.provider})
                for f in ("events", "truncated", "at_limit"):
                    pipe.hincrby(k.error_pattern(pid), f, d[f])
                pipe.eval(_SPAN_LUA, 1, k.error_pattern(pid), d["first"], d["last"])

        tx.write(write)
        queue_sides(tx, error_sides({pid: (key.scope, tasks) for pid, (key, _, tasks) in counts.items()}))


async def detect(tx: Tx, patterns: Sequence[str], cause: Envelope, *,
                 errors: Mapping[str, tuple[PatternKey, dict[str, int], set[str]]] | None = None,
                 outcomes: OutcomeChanges | None = None, skip: set[str] | None = None,
                 causes: Mapping[str, Envelope] | None = None) -> list[str]:
    """Emit the ``PatternDetected`` of each of ``patterns`` that meets the thresholds now and
    was not detected before (module docstring: Detection), caused by ``causes[id]`` (default
    ``cause``); returns the ids emitted or found detected already. ``errors`` is a batch of errors not projected yet
    (:meth:`PatternProjection.counts`), ``outcomes`` a batch of rewards (both count);
    ``skip``: patterns the caller knows are detected."""
    todo = [pid for pid in patterns if pid not in (skip or ())]
    if not todo:
        return []
    k = tx.keys
    pending = errors or {}
    pipe = tx.redis.pipeline(transaction=False)
    pipe.hmget(k.detected, todo)
    for pid in todo:
        pipe.hgetall(k.error_pattern(pid))
    detected, *stored_h = await pipe.execute()
    found, seen = await occurrences(tx.redis, k, todo, outcomes=outcomes,
                                    errors={pid: c[2] for pid, c in pending.items()})
    done = [pid for pid, d in zip(todo, detected) if d is not None]
    for pid, was_detected, h in zip(todo, detected, stored_h):
        key = PatternKey.parse(pid)
        opportunities = key.opportunities(seen)
        conf = confidence(found[pid], opportunities)
        if was_detected is not None or found[pid] < MIN_OCCURRENCES or conf < DETECT_CONFIDENCE:
            continue
        stored = PatternCounts.from_hash(h)
        d = pending.get(pid, (key, {}, set()))[1]
        times = [x for x in (stored.first_seen_ms, stored.last_seen_ms, d.get("first"), d.get("last"))
                 if x is not None]
        payload = PatternDetected(
            pattern=pid, category=key.category, error_type=key.error_type,
            task_type=key.task_type, complexity=key.complexity, provider=key.provider,
            occurrences=found[pid], opportunities=opportunities, confidence=conf,
            events=stored.events + d.get("events", 0),
            truncated=stored.truncated + d.get("truncated", 0),
            at_limit=stored.at_limit + d.get("at_limit", 0),
            first_seen=to_time(min(times)), last_seen=to_time(max(times)))
        why = (causes or {}).get(pid, cause)
        tx.emit("learning", make_event(
            payload, producer=PRODUCER, cause=why, correlation_id=pid,
            event_id=derive_event_id(pid, PRODUCER, 0, "PatternDetected"),
            occurred_at=why.occurred_at), key=pid)
        done.append(pid)
    return done


class PatternExtractor(Consumer):
    """Consumer of the errors topic: projects the pattern counts and, live, emits each
    pattern's ``PatternDetected`` when it first meets the thresholds (module docstring). The
    rewards consumer (agents/rules.py ``RuleMonitor``) checks them too as outcomes arrive."""

    name = PRODUCER
    source = "errors"
    handles = frozenset({"ErrorLogged"})

    def __init__(self, settings: Settings) -> None:
        self.projection = PatternProjection(settings.provider_timeout_s * 1000)
        self.projections = (self.projection,)
        # patterns this process detected: the rules consumer may not have projected them yet
        self._detected: set[str] = set()

    async def process(self, events: Sequence[Envelope], tx: Tx) -> None:
        counts = self.projection.counts(events)
        # each pattern's detection is caused by its own latest error
        last = {pid: e for e in events if (key := pattern_key(e.payload)) is not None
                for pid in (key.id,)}
        self._detected.update(await detect(tx, sorted(counts), events[-1], errors=counts,
                                           skip=self._detected, causes=last))


def detected_payload(raw: str) -> PatternDetected:
    """A ``{ns}:learn:detected`` value (the PatternDetected payload as JSON), parsed."""
    return PatternDetected.model_validate(orjson.loads(raw))
