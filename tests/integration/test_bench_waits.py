"""`rmo bench` never waits silently: a measurement whose tasks stop completing ends with one
line naming open tasks (streams/bench.py ``_completed``), against a real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.bench import _completed as completed
from streams.bench import bench_tasks
from streams.client import high_watermarks
from streams.demo import DemoError

pytestmark = pytest.mark.integration


async def test_a_measurement_whose_tasks_stop_completing_ends_naming_them(settings, topics,
                                                                           tmp_path: Path) -> None:
    tasks = bench_tasks(3, "lost")  # never submitted: nothing will complete them
    start = await high_watermarks(settings.require_kafka(), topics.name("tasks"))
    with pytest.raises(DemoError, match=r"no task completed for 1 s, 3 of 3 still open "
                                        r"\(e\.g\. lost-0, lost-1, lost-2\)"):
        await completed(settings, tasks, start, [], tmp_path / "worker.log", stall_s=1.0)
