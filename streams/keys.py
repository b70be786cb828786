"""Redis key layout. Every key lives under ``{namespace}:`` (SPEC §5).

Projection state is everything except the bookkeeping prefixes: ``ckpt`` (last applied offset
per consumer and topic-partition), ``seen`` (event ids a consumer applied, for dropping
re-produced duplicates, in epoch buckets that expire: streams/seen.py) and ``eph``
(ephemeral, each with an expiry: heartbeats, half-open permits, budget reservations, the
learning subsystem's join buffers: agents/pairing.py).
``rmo replay --verify`` compares projection state only.
"""

from __future__ import annotations

from dataclasses import dataclass

BOOKKEEPING = ("ckpt", "seen", "eph")


@dataclass(frozen=True)
class Keys:
    namespace: str

    def _k(self, *parts: object) -> str:
        return ":".join((self.namespace, *map(str, parts)))

    def task(self, task_id: str) -> str:
        """Hash: one task's projected lifecycle fields."""
        return f"{self.namespace}:task:{task_id}"  # hot path: once per task event

    @property
    def qtable(self) -> str:
        """Hash: ``state<TAB>action`` -> Q-value (repr of a float)."""
        return self._k("q", "table")

    @property
    def qmeta(self) -> str:
        """Hash: ``updates`` (count of rewards applied)."""
        return self._k("q", "meta")

    @property
    def experience(self) -> str:
        """List: the latest experiences as JSON ``[state, action, reward, next_state]``."""
        return self._k("q", "experience")

    @property
    def bandit(self) -> str:
        """Hash: the contextual bandit's statistics (agents/policy/bandit.py)."""
        return self._k("bandit")

    def breaker(self, provider: str) -> str:
        return self._k("breaker", provider)

    def provider_stats(self, provider: str) -> str:
        return self._k("provider", provider)

    @property
    def providers_index(self) -> str:
        """Set of provider ids that have stats."""
        return self._k("providers")

    @property
    def counters(self) -> str:
        return self._k("counters")

    def budget(self, bucket: str) -> str:
        """Hash: spent amounts of one period bucket (agents/budget.py :func:`spent_key`)."""
        return self._k("budget", bucket)

    # learning subsystem (agents/outcomes.py, agents/patterns.py, agents/rules.py)

    @property
    def outcomes(self) -> str:
        """Hash: validated tasks and failures per task type and provider, and per complexity
        (agents/outcomes.py)."""
        return self._k("learn", "outcomes")

    def error_pattern(self, pattern: str) -> str:
        """Hash: one error pattern's counts, occurrences and first/last event times
        (agents/patterns.py, agents/pairing.py)."""
        return self._k("learn", "pattern", pattern)

    def learn_pair(self, task_id: str) -> str:
        """Hash, ephemeral: one task's join buffer of error and outcome sides
        (agents/pairing.py), expiring ``Settings.learn_join_window_s`` after its last write."""
        return self._k("eph", "learn", "pair", task_id)

    @property
    def error_patterns(self) -> str:
        """Set: every error pattern key seen."""
        return self._k("learn", "patterns")

    @property
    def detected(self) -> str:
        """Hash: pattern key -> its PatternDetected payload (JSON), the first one."""
        return self._k("learn", "detected")

    def rule(self, rule_id: str) -> str:
        """Hash: one protocol rule's state and evidence (agents/rules.py)."""
        return self._k("learn", "rule", rule_id)

    @property
    def rules(self) -> str:
        """Set: every proposed rule id."""
        return self._k("learn", "rules")

    @property
    def active_rules(self) -> str:
        """Hash: rule id -> JSON ``{"kind", "params"}`` of each rule in force (the executor's read)."""
        return self._k("learn", "active")

    def job(self, job_id: str) -> str:
        """String: one job's coordinator state as JSON (agents/cortex/job.py ``JobState``)."""
        return self._k("job", job_id)

    @property
    def jobs(self) -> str:
        """Sorted set: job id -> its submission time (epoch s)."""
        return self._k("jobs")

    @property
    def job_deadlines(self) -> str:
        """Sorted set: open job id -> its deadline (epoch s), for the coordinator's tick."""
        return self._k("jobs", "deadlines")

    @property
    def escalations(self) -> str:
        """Hash: open escalation id -> JSON {job_id, subtask_id, domain, reason, detail}."""
        return self._k("escalations")

    def checkpoint(self, consumer: str, topic: str, partition: int) -> str:
        return self._k("ckpt", consumer, topic, partition)

    def seen(self, consumer: str, epoch: int) -> str:
        """Set: the event ids ``consumer`` applied while ``epoch`` was the current seen epoch
        (streams/seen.py)."""
        return self._k("seen", consumer, epoch)

    @property
    def seen_current(self) -> str:
        """String: the seen epoch commits add applied ids to (absent: 0; streams/seen.py)."""
        return self._k("seen", "_epoch", "current")

    @property
    def seen_oldest(self) -> str:
        """String: the oldest seen epoch whose buckets may still exist (absent: 0)."""
        return self._k("seen", "_epoch", "oldest")

    @property
    def seen_closes(self) -> str:
        """Hash: ``{epoch}`` -> JSON close record of that seen epoch (streams/seen.py)."""
        return self._k("seen", "_epoch", "closes")

    def ephemeral(self, *parts: object) -> str:
        return self._k("eph", *parts)

    def pattern(self) -> str:
        return self._k("*")

    def is_bookkeeping(self, key: str) -> bool:
        rest = key[len(self.namespace) + 1:]
        return rest.split(":", 1)[0] in BOOKKEEPING
