"""streams.demo.guarded: a wait whose cancellation is swallowed once still ends."""

from __future__ import annotations

import asyncio

import pytest

from streams import demo


async def _swallows_one_cancel(state: dict[str, int]) -> None:
    """Ignores the first cancellation, as redis-py can inside a command (redis/redis-py#2028),
    then waits to be cancelled again."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        state["swallowed"] += 1
    await asyncio.sleep(3600)


async def test_guarded_ends_even_when_a_check_swallows_its_cancellation(monkeypatch) -> None:
    monkeypatch.setattr(demo, "WATCH_INTERVAL_S", 0.01)
    monkeypatch.setattr(demo, "RECANCEL_S", 0.05)
    state = {"swallowed": 0, "checks": 0}

    async def check() -> None:
        state["checks"] += 1
        await _swallows_one_cancel(state)

    async def main() -> None:
        while state["checks"] == 0:  # end once the watch is inside its check
            await asyncio.sleep(0.01)

    await asyncio.wait_for(demo.guarded(main(), check, timeout_s=10), 5)
    assert state["swallowed"] == 1


async def test_guarded_still_raises_what_main_raised(monkeypatch) -> None:
    monkeypatch.setattr(demo, "RECANCEL_S", 0.05)

    async def main() -> None:
        raise demo.DemoError("the worker is gone")

    async def check() -> None:
        await asyncio.sleep(0)

    with pytest.raises(demo.DemoError, match="the worker is gone"):
        await asyncio.wait_for(demo.guarded(main(), check, timeout_s=10), 5)
