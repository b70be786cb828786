"""Shared fixtures: one real embedded Kafka-protocol broker (Tansu) per session, the real
Redis (REDIS_URL, else an embedded one), and a fresh namespace per test."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from redis import Redis as SyncRedis

from agents import sandbox
from streams import embedded, logs
from streams.config import Settings
from streams.keys import Keys
from streams.topics import create_topics, load_topics

# Every worker a test starts joins its consumer groups, and Tansu's first JoinGroup waits
# session_timeout / 2 (SPEC §2): a 4 s session (the default is 6 s) takes a second off each
# start. Set before any Settings is built, so the tests and the workers they spawn agree.
os.environ.setdefault("RMO_SESSION_TIMEOUT_S", "4")


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Bootstrap address of a session-scoped Tansu broker (or KAFKA_BOOTSTRAP_SERVERS)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    handle = embedded.start_kafka()
    yield handle.address
    handle.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if embedded.redis_reachable(url):
        yield url
        return
    handle = embedded.start_redis()
    yield handle.address
    handle.stop()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of its own for each test; its Redis keys are deleted afterwards, and so
    are those of the namespaces named after it (``{ns}-replay-…``: what `rmo replay` rebuilt)."""
    ns = f"t{secrets.token_hex(4)}"
    yield ns
    r = SyncRedis.from_url(redis_url)
    for pattern in (Keys(ns).pattern(), f"{ns}-*"):
        for key in r.scan_iter(pattern, count=1000):
            r.delete(key)
    r.close()


@pytest.fixture
def settings(kafka: str, redis_url: str, namespace: str) -> Settings:
    return Settings(namespace=namespace, kafka_bootstrap_servers=kafka, redis_url=redis_url)


@pytest.fixture
def topics(settings: Settings):
    registry = load_topics(settings.namespace)
    asyncio.run(create_topics(settings.require_kafka(), registry))
    return registry


@pytest.fixture
def without_bwrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A PATH holding only ``prlimit``, as on a host without bubblewrap; the sandbox's
    per-process answers cached under the real PATH are dropped before and after. Yields a
    path that untrusted code would create if it ran outside a sandbox."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "util-linux prlimit is needed by every sandbox mode"
    (bin_dir / "prlimit").symlink_to(prlimit)
    monkeypatch.setenv("PATH", str(bin_dir))
    caches = (sandbox.resolve_mode, sandbox.bwrap_problem, sandbox._warn_reduced_isolation)
    for cached in caches:
        cached.cache_clear()
    yield tmp_path / f"ran-unsandboxed-{uuid.uuid4().hex}"
    for cached in caches:
        cached.cache_clear()


@pytest.fixture
def bwrap_unless_simulated(request: pytest.FixtureRequest) -> None:
    """Skip a test that needs a working bwrap where there is none, unless it simulates a
    machine without bwrap itself (``without_bwrap``)."""
    if "without_bwrap" in request.fixturenames:
        return
    problem = sandbox.bwrap_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger, structlog and the registered secrets back as they were."""
    root = logging.getLogger()
    handlers, level, secrets = list(root.handlers), root.level, set(logs._secrets)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logs._secrets.clear()
    logs._secrets.update(secrets)
