"""Worker heartbeats: which workers run in a namespace, with which providers, and whether they
have joined their consumer group yet.

Explicitly ephemeral state, not a projection: one key per worker process,
``{ns}:eph:worker:{host}:{pid}``, holding a :class:`Heartbeat` as JSON and expiring
:data:`TTL_FACTOR` heartbeat intervals after its last refresh. A worker deletes its own key
when it stops; a key left behind by a worker that was killed is recognised as stale at once
when it names a pid of this host that no longer runs, and otherwise expires with its TTL.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

import orjson
from redis.asyncio import Redis

from streams.keys import Keys

TTL_FACTOR = 3
"""A heartbeat lives this many intervals (plus 1 s): two missed refreshes are tolerated."""
HOST = socket.gethostname()

WorkerState = Literal["joining", "running"]


@dataclass(frozen=True)
class Heartbeat:
    """What one worker process announces.

    ``providers``: provider ids in file order; ``fingerprint``: digest of their full
    configuration (:func:`agents.providers.registry.fingerprint`), so two workers with the
    same ids but other settings differ. ``providers_source``: the providers file, or
    ``defaults``. ``state``: ``joining`` until its consumer group's first rebalance completed,
    then ``running``. ``metrics_port``: the port of its Prometheus exposition
    (streams/prometheus.py), None when it serves none. ``policy``: its routing policy
    (``RMO_POLICY``; "" in heartbeats of versions that did not announce it). Times are RFC
    3339 UTC.
    """

    host: str
    pid: int
    started_at: str
    providers: tuple[str, ...]
    fingerprint: str
    providers_source: str
    state: WorkerState = "joining"
    seen_at: str = ""
    metrics_port: int | None = None
    policy: str = ""

    @property
    def worker_id(self) -> str:
        return f"{self.host}:{self.pid}"

    def describe(self) -> str:
        """E.g. ``pid 4242 on host h, providers grok, claude (defaults), policy thompson``."""
        policy = f", policy {self.policy}" if self.policy else ""
        return (f"pid {self.pid} on host {self.host}, providers {', '.join(self.providers)} "
                f"({self.providers_source}){policy}")

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Heartbeat:
        """Raises ValueError, TypeError or KeyError for a value that is not a heartbeat."""
        data = orjson.loads(raw)
        data["providers"] = tuple(data["providers"])
        return cls(**data)


def key(keys: Keys, host: str, pid: int) -> str:
    return keys.ephemeral("worker", f"{host}:{pid}")


async def beat(redis: Redis, keys: Keys, hb: Heartbeat, interval_s: float) -> None:
    """Write ``hb`` (``seen_at`` = now), expiring after :data:`TTL_FACTOR` x ``interval_s`` + 1 s."""
    now = datetime.now(UTC).isoformat()
    value = Heartbeat(**{**asdict(hb), "seen_at": now}).to_json()
    await redis.set(key(keys, hb.host, hb.pid), value, ex=int(interval_s * TTL_FACTOR) + 1)


async def clear(redis: Redis, keys: Keys, host: str, pid: int) -> None:
    """Delete one worker's heartbeat (it stopped)."""
    await redis.delete(key(keys, host, pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def live_workers(redis: Redis, keys: Keys) -> list[Heartbeat]:
    """The heartbeats of workers that are still alive, oldest first.

    A heartbeat of this host whose pid no longer runs (a worker that has just stopped or was
    killed) is deleted and left out; so is a value that is not a heartbeat."""
    found = []
    async for k in redis.scan_iter(keys.ephemeral("worker", "*"), count=100):
        raw = await redis.get(k)
        if raw is None:
            continue
        try:
            hb = Heartbeat.from_json(raw)
        except (ValueError, TypeError, KeyError):
            await redis.delete(k)
            continue
        if hb.host == HOST and not _pid_alive(hb.pid):
            await redis.delete(k)
            continue
        found.append(hb)
    return sorted(found, key=lambda h: h.started_at)
