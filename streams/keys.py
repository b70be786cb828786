"""Redis key layout. Every key lives under ``{namespace}:`` (SPEC §5).

Projection state is everything except the bookkeeping prefixes: ``ckpt`` (last applied offset
per consumer and topic-partition), ``seen`` (event ids a consumer applied, for dropping
re-produced duplicates) and ``eph`` (ephemeral coordination: heartbeats, half-open permits, budget reservations).
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

    def checkpoint(self, consumer: str, topic: str, partition: int) -> str:
        return self._k("ckpt", consumer, topic, partition)

    def seen(self, consumer: str) -> str:
        return self._k("seen", consumer)

    def ephemeral(self, *parts: object) -> str:
        return self._k("eph", *parts)

    def pattern(self) -> str:
        return self._k("*")

    def is_bookkeeping(self, key: str) -> bool:
        rest = key[len(self.namespace) + 1:]
        return rest.split(":", 1)[0] in BOOKKEEPING
