"""Service resolution and `rmo up` / `rmo down` ownership (streams/locate.py), against real
embedded Tansu and redis-server processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streams import locate
from streams.embedded import ServiceHandle, free_port, process_start_ticks, start_kafka, start_redis
from streams.locate import ServiceUnreachable


@pytest.fixture(scope="module")
def kafka() -> Iterator[ServiceHandle]:
    handle = start_kafka()
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Never touch the developer's real `rmo up` state.
    monkeypatch.setenv("RMO_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[ServiceHandle]:
    handle = start_redis(tmp_path / "redis.log")
    yield handle
    handle.stop()


def test_set_redis_url_that_does_not_answer_is_an_error_never_replaced(kafka: ServiceHandle) -> None:
    closed = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ServiceUnreachable) as info:
        locate.locate(kafka.address, closed)
    message = str(info.value)
    assert "REDIS_URL=redis://:***@127.0.0.1:" in message
    assert "s3cret" not in message
    assert "\n" not in message and "unset it" in message


def test_set_kafka_that_does_not_answer_is_an_error(own_redis: ServiceHandle) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnreachable, match=f"KAFKA_BOOTSTRAP_SERVERS={closed} does not answer"):
        locate.locate(closed, own_redis.address)


def test_not_a_redis_url_names_the_form() -> None:
    with pytest.raises(ServiceUnreachable, match="REDIS_URL=localhost:6379 is not a Redis URL"):
        locate.check_set_address("redis", "localhost:6379")


def test_set_addresses_are_used_as_they_are(kafka: ServiceHandle, own_redis: ServiceHandle) -> None:
    found = locate.locate(kafka.address, own_redis.address)
    assert (found.bootstrap, found.redis_url, found.temporary, found.kept) == (
        kafka.address, own_redis.address, [], [])


def test_up_record_wins_over_the_local_default_redis(kafka: ServiceHandle,
                                                     own_redis: ServiceHandle) -> None:
    # what `rmo up` printed is what later commands use, even with a Redis on :6379
    locate.write_records({"kafka": kafka, "redis": own_redis})
    found = locate.locate(None, None)
    assert (found.bootstrap, found.redis_url, found.temporary) == (kafka.address,
                                                                   own_redis.address, [])


def test_a_gone_record_is_an_error_for_commands_and_replaced_by_up(tmp_path: Path,
                                                                   kafka: ServiceHandle) -> None:
    gone = start_redis(tmp_path / "gone.log")
    gone.stop()
    locate.write_records({"kafka": kafka, "redis": gone})
    with pytest.raises(ServiceUnreachable, match="is gone: run `rmo up`"):
        locate.locate(None, None)
    running, started = locate.bring_up("kafka", "redis")
    try:
        assert running["kafka"] == kafka and [h.name for h in started] == ["redis"]
        assert started[0].pid != gone.pid
        assert locate.recorded()["redis"].pid == started[0].pid
    finally:
        for h in started:
            h.stop()


def test_second_up_reuses_and_a_wedged_record_is_refused_not_overwritten(tmp_path: Path) -> None:
    _, (handle,) = locate.bring_up("redis")
    try:
        again, started_again = locate.bring_up("redis")
        assert started_again == [] and again["redis"].pid == handle.pid
        os.kill(handle.pid, signal.SIGSTOP)  # runs, but answers nothing
        try:
            with pytest.raises(ServiceUnreachable, match="running but not answering: `rmo down`"):
                locate.bring_up("redis")
            assert locate.recorded()["redis"].pid == handle.pid
        finally:
            os.kill(handle.pid, signal.SIGCONT)
    finally:
        handle.stop()


def test_down_stops_only_its_own_state_dirs_services(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMO_STATE_DIR", str(tmp_path / "a"))
    _, (a,) = locate.bring_up("redis")
    monkeypatch.setenv("RMO_STATE_DIR", str(tmp_path / "b"))
    _, (b,) = locate.bring_up("redis")
    try:
        monkeypatch.setenv("RMO_STATE_DIR", str(tmp_path / "a"))
        assert [(r.handle.pid, r.stopped) for r in locate.bring_down()] == [(a.pid, True)]
        assert not a.is_running() and locate.recorded() == {}
        assert redis.Redis.from_url(b.address).ping()
    finally:
        a.stop()
        b.stop()


def test_down_never_signals_a_reused_pid() -> None:
    # a process of the same executable at a recorded pid, but started later: not ours
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = process_start_ticks(stranger.pid)
        assert ticks is not None
        record = ServiceHandle("redis", "redis://127.0.0.1:1/0", stranger.pid, sys.executable, 1,
                               start_ticks=ticks - 1)
        locate.write_records({"redis": record})
        assert [(r.handle.pid, r.stopped) for r in locate.bring_down()] == [(stranger.pid, False)]
        assert stranger.poll() is None
        assert not locate.state_file().exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_records_tolerate_garbage(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    locate.state_file().write_text("{not json")
    assert locate.recorded() == {}
    locate.state_file().write_text(json.dumps({"kafka": {"pid": "x"}, "redis": "nope"}))
    assert locate.recorded() == {}


def test_default_state_dir_is_the_checkouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RMO_STATE_DIR")
    checkout = Path(locate.__file__).resolve().parent.parent
    assert locate.state_dir() == checkout / ".rmo"
