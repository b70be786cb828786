"""Starting a worker: topics first, then the Faust app with every consumer; stopping it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime

import faust.worker
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.providers.base import Provider
from agents.providers.registry import fingerprint, load_providers
from agents.sandbox import resolve_mode
from streams import liveness, logs, prometheus, stall
from streams.app import create_app
from streams.config import Settings
from streams.keys import Keys
from streams.liveness import Heartbeat
from streams.pipeline import build_consumers, prepare_log
from streams.topics import load_topics
from streams.transport import install_connection_log_filter

log = logging.getLogger("rmo.worker")

STOP_DEADLINE_S = 9.0
"""A worker told to stop (SIGTERM/SIGINT) exits within this many seconds, whatever it waits on."""


def redis_for_worker(settings: Settings) -> Redis:
    """The worker's Redis client."""
    # bounded timeouts: an unreachable Redis must surface as an error the stages pause on,
    # not as a call that hangs
    return Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5.0,
                           socket_connect_timeout=2.0, health_check_interval=10,
                           # a pooled connection to a restarted server fails once: retry it
                           # on a fresh connection instead of reporting a new outage
                           retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                           retry_on_error=[RedisConnectionError, RedisTimeoutError])


def build_app(settings: Settings, providers: dict[str, Provider], heartbeat: Heartbeat):
    """The worker's Faust app for ``settings`` (services already resolved), watched for
    stalls (streams/stall.py: ``RMO_STALL_MS``, ``RMO_STALL_S``)."""
    registry = load_topics(settings.namespace, settings.topics_file)
    redis = redis_for_worker(settings)
    consumers = build_consumers(settings, providers)
    app = create_app(settings, registry, consumers, redis, heartbeat)
    stall.install(app, registry, consumers, redis, Keys(settings.namespace), heartbeat.worker_id)
    return app


def worker_heartbeat(settings: Settings, providers: dict[str, Provider],
                     metrics_port: int | None = None) -> Heartbeat:
    """What this worker process announces (streams/liveness.py)."""
    return Heartbeat(host=liveness.HOST, pid=os.getpid(), started_at=datetime.now(UTC).isoformat(),
                     providers=tuple(providers), fingerprint=fingerprint(providers),
                     providers_source=str(settings.providers_file or "defaults"),
                     metrics_port=metrics_port, policy=settings.policy)


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Check the providers, create the topics (idempotent), announce the worker as
    ``joining`` (its consumer group's first join takes seconds), then run it until
    SIGINT/SIGTERM.

    Raises:
        agents.providers.registry.ProviderConfigError: the providers file is invalid.
        agents.sandbox.SandboxUnavailable: ``RMO_SANDBOX`` asks for a sandbox this machine
            cannot give (e.g. no bwrap).
        streams.logs.LogConfigError: ``loglevel`` is not a level name.
        streams.prometheus.MetricsPortUnavailable: no port of ``RMO_METRICS_PORT``'s range is free.
    """
    level = logs.level_of(loglevel)
    resolve_mode(settings.sandbox)  # refuse untrusted code without a sandbox before connecting
    registry = load_topics(settings.namespace, settings.topics_file)
    providers = load_providers(settings.providers_file, seed=settings.seed)
    exporter = prometheus.start_exporter(settings, providers)  # /metrics (RMO_METRICS_PORT)
    heartbeat = worker_heartbeat(settings, providers, exporter.port if exporter else None)

    async def prepare() -> None:
        redis = redis_for_worker(settings)
        try:
            await prepare_log(settings, registry, redis)
            await liveness.beat(redis, Keys(settings.namespace), heartbeat,
                                settings.metrics_interval_s)
        finally:
            await redis.aclose()

    asyncio.run(prepare())
    app = build_app(settings, providers, heartbeat)
    if exporter:
        exporter.watch(app)  # consumer lag of the partitions assigned to this worker
    # aiokafka logs every send at DEBUG; building those records costs ~3 % of a busy worker
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    install_connection_log_filter(app.transport.broker_health)
    # logging stays as streams/logs.py configured it (Faust would install its own format);
    # --loglevel lowers the level, -v or --debug of the command line may lower it further
    logs.set_level(min(logging.getLogger().level or logging.WARNING, level))
    Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False,
           override_logging=False).execute_from_commandline()


class Worker(faust.worker.Worker):
    """Faust's worker whose stop on SIGTERM/SIGINT has a deadline (:data:`STOP_DEADLINE_S`).

    The graceful stop runs first, with every wait on Kafka bounded (streams/transport.py). If
    it has not ended by the deadline (a wait nobody bounded, a thread that does not finish),
    the process logs that and exits with ``128 + signal number``, the status of a process
    the signal terminated. Exiting there is safe: Kafka offsets are committed only for
    records whose batch was applied in Redis, in one MULTI/EXEC together with its
    checkpoints, after the broker acked the batch's outputs (streams/stage.py, steps 6-8);
    an unfinished batch wrote nothing and is redelivered, and the events it may have produced
    carry deterministic ids that consumers drop (step 3).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # no terminal spinner: its control characters would land between the log's lines
        self.spinner = None

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        if not self._signal_stop_time:  # mode ignores the signals after the first one
            log.warning("%s received: stopping (exit within %.0f s)", sig.name, STOP_DEADLINE_S)
            _exit_after(STOP_DEADLINE_S, sig)
        super()._schedule_shutdown(sig)


def _exit_after(deadline_s: float, signum: signal.Signals) -> None:
    """Exit the process ``deadline_s`` seconds from now unless it exited by then.

    A daemon thread, not an event loop timer: a stuck stop can block the loop itself (Faust
    joins its consumer thread synchronously), and a daemon thread never delays a normal exit.
    """
    def expire() -> None:
        log.error("graceful stop did not finish within %.0f s of %s; exiting now", deadline_s,
                  signum.name)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(128 + signum)

    timer = threading.Timer(deadline_s, expire)
    timer.daemon = True
    timer.start()
