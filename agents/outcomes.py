"""Task outcomes per task type and provider, and per complexity: the denominators of error
patterns' confidence (agents/patterns.py) and the history protocol rules are evaluated and
measured on (agents/rules.py).

Counted from ``RewardComputed`` on the rewards topic: every task ends with exactly one, it
names the provider whose answer was validated (``provider``, None when nobody answered) and
its state carries the analyzer's task type and complexity. Only verified outcomes count
(``passed`` / ``failed``): an unverified answer or a budget refusal says nothing about a
provider's answers. The rewards topic has one partition, so the projection is applied in one
total order, live and in replay; it only adds integers, so it is order-free anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agents.pairing import outcome_sides, queue_sides
from models.events import Envelope, RewardComputed
from streams.stage import Tx

ANY = "*"
"""A pattern or scope part that matches every value (e.g. every provider)."""
NO_PROVIDER = "-"
"""The provider of a task no provider answered."""
SEP = "\t"


def state_features(state: str) -> tuple[str, str] | None:
    """``(task_type, complexity)`` of a routing state: its last two parts, in both shapes
    (agents/qlearning.py ``make_state``: ``previous|task_type|complexity``; ``feature_state``:
    ``task_type|complexity``), or None for a string of another shape."""
    parts = state.split("|")
    return (parts[-2], parts[-1]) if len(parts) in (2, 3) else None


def type_scope(task_type: str, provider: str) -> str:
    """The scope of the tasks of ``task_type`` answered by ``provider``."""
    return f"type|{task_type}|{provider}"


def complexity_scope(complexity: str) -> str:
    """The scope of every task of ``complexity``."""
    return f"complexity|{complexity}"


def _type_field(task_type: str, provider: str, what: str) -> str:
    return SEP.join(("type", task_type, provider, what))


def _complexity_field(complexity: str, what: str) -> str:
    return SEP.join(("complexity", complexity, what))


@dataclass(frozen=True)
class Tally:
    """Validated tasks and how many of them failed."""

    tasks: int = 0
    failed: int = 0

    @property
    def rate(self) -> float:
        """Failed / tasks (0.0 without tasks)."""
        return self.failed / self.tasks if self.tasks else 0.0

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.tasks - other.tasks, self.failed - other.failed)


@dataclass(frozen=True)
class Outcomes:
    """The projection's hash, read: field -> count (see :class:`OutcomesProjection`)."""

    counts: Mapping[str, int]

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> Outcomes:
        return cls({f: int(v) for f, v in h.items()})

    def _tally(self, tasks_field: str, failed_field: str) -> Tally:
        return Tally(self.counts.get(tasks_field, 0), self.counts.get(failed_field, 0))

    def on(self, task_type: str, provider: str) -> Tally:
        """Tasks of ``task_type`` answered by ``provider``."""
        return self._tally(_type_field(task_type, provider, "tasks"),
                           _type_field(task_type, provider, "failed"))

    def of_type(self, task_type: str, *, excluding: str | None = None) -> Tally:
        """Every task of ``task_type`` (unanswered ones included), or with ``excluding`` the
        ones other providers answered."""
        tasks = failed = 0
        prefix = SEP.join(("type", task_type, ""))
        for f, n in self.counts.items():
            if not f.startswith(prefix):
                continue
            provider, what = f[len(prefix):].rsplit(SEP, 1)
            if excluding is not None and provider in (excluding, NO_PROVIDER):
                continue
            if what == "tasks":
                tasks += n
            else:
                failed += n
        return Tally(tasks, failed)

    def of_complexity(self, complexity: str) -> Tally:
        """Every task of ``complexity``."""
        return self._tally(_complexity_field(complexity, "tasks"),
                           _complexity_field(complexity, "failed"))

    def plus(self, changes: OutcomeChanges) -> Outcomes:
        """These counts with a batch's ``changes`` added (a batch not projected yet)."""
        counts = dict(self.counts)
        for f, n in changes.incr.items():
            counts[f] = counts.get(f, 0) + n
        return Outcomes(counts)


@dataclass(frozen=True)
class OutcomeChanges:
    """What a batch of rewards adds: hash field -> increment, scope -> task ids."""

    incr: Mapping[str, int] = field(default_factory=dict)
    members: Mapping[str, frozenset[str]] = field(default_factory=dict)


class OutcomesProjection:
    """``{ns}:learn:outcomes`` hash, from ``RewardComputed``: per verified task, ``tasks``
    and (when it failed) ``failed`` are incremented under ``type<TAB>{task_type}<TAB>{provider}``
    (:data:`NO_PROVIDER` when nobody answered) and ``complexity<TAB>{complexity}``; the task's
    outcome in both scopes is one side of its error patterns' pairs (agents/pairing.py), so
    an error pattern counts exactly the occurrences whose outcome is in (agents/patterns.py)."""

    name = "outcomes"

    @staticmethod
    def changes(events: Sequence[Envelope]) -> OutcomeChanges:
        """The hash increments and set members of ``events`` (the ``RewardComputed`` ones)."""
        incr: dict[str, int] = {}
        members: dict[str, set[str]] = {}
        for e in events:
            if e.event_type != "RewardComputed":
                continue
            r: RewardComputed = e.payload
            features = state_features(r.state)
            if features is None or r.completion_status not in ("passed", "failed"):
                continue
            task_type, complexity = features
            failed = int(r.completion_status == "failed")
            for f, n in ((_type_field(task_type, r.provider or NO_PROVIDER, "tasks"), 1),
                         (_type_field(task_type, r.provider or NO_PROVIDER, "failed"), failed),
                         (_complexity_field(complexity, "tasks"), 1),
                         (_complexity_field(complexity, "failed"), failed)):
                incr[f] = incr.get(f, 0) + n
            for scope in (type_scope(task_type, r.provider or NO_PROVIDER), complexity_scope(complexity)):
                members.setdefault(scope, set()).add(r.task_id)
        return OutcomeChanges(incr, {s: frozenset(ids) for s, ids in members.items()})

    async def apply(self, events: Sequence[Envelope], tx: Tx) -> None:
        changes = self.changes(events)
        if not changes.incr:
            return

        def write(pipe, changes=changes) -> None:
            for f, n in changes.incr.items():
                pipe.hincrby(tx.keys.outcomes, f, n)

        tx.write(write)
        queue_sides(tx, outcome_sides(changes.members))
