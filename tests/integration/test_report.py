"""`rmo report` (streams/report.py) after a small run: a worker, 30 HumanEval tasks with the
default sim providers, two poison records. The HTML is self-contained and each of its plots
is there, decodes as a PNG and shows something; the Q-values it plots are the live Q-table's."""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from PIL import Image
from redis.asyncio import Redis

from agents import qlearning
from agents.executor import qconfig
from models.codec import make_event
from models.events import TaskSubmitted
from streams.client import EventProducer
from streams.demo import humaneval_tasks
from streams.keys import Keys
from streams.report import PLOTS, learning_curve, most_updated_state, read_log
from tests.integration.helpers import cli_env, eventually, rmo, submit, wait_completed, worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUDGETS = ("budgets:\n  - {scope: global, period: total, limit_usd: 5.0}\n"
           "  - {scope: \"provider:claude\", period: day, limit_tokens: 500000}\n")
IMG = re.compile(r'<img id="plot-([a-z-]+)" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def plots(page: str) -> dict[str, bytes]:
    return {m.group(1): base64.b64decode(m.group(2)) for m in IMG.finditer(page)}


def assert_readable_png(name: str, data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", name
    assert len(data) > 2048, f"{name}: {len(data)} bytes"
    rgb = image.convert("RGB")
    assert rgb.width >= 600 and rgb.height >= 150, (name, rgb.size)
    colours = rgb.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 20, f"{name}: {len(colours)} colours"  # not blank, not one colour
    (white, _), *_ = sorted(colours, key=lambda c: -c[0])
    assert white < rgb.width * rgb.height * 0.97, f"{name}: almost only background"


async def test_report_after_a_run_has_every_plot(settings, topics, tmp_path: Path) -> None:
    tasks = humaneval_tasks(30)
    broken = make_event(TaskSubmitted(task_id="rep-broken", kind="code", prompt="p"),
                        producer="test").model_dump(mode="json")
    broken["payload"]["priority"] = "high"  # fails the schema: dead-lettered, task completes
    with worker(settings, tmp_path) as log:
        await submit(settings, topics, tasks)
        async with EventProducer(settings.require_kafka()) as producer:
            for key, value in ((b"rep-broken", orjson.dumps(broken)), (b"rep-junk", b"not json")):
                await (await producer.send(topics.name("tasks"), key, value))
        ids = {t.task_id for t in tasks} | {"rep-broken"}
        await wait_completed(settings, topics, ids, timeout_s=240, log=log)
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        keys = Keys(settings.namespace)
        try:
            rewards = len(tasks)
            assert await eventually(lambda: _updates_at_least(redis, keys, rewards), 30)
            live_q = qlearning.from_fields(await redis.hgetall(keys.qtable))
        finally:
            await redis.aclose()

    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(BUDGETS)
    out = tmp_path / "report"
    env = cli_env(settings)
    result = rmo("report", "--out", str(out), "--budgets", str(budgets), "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = orjson.loads(result.stdout)
    assert summary["plots"] == list(PLOTS) and summary["empty"] == [], summary
    assert summary["tasks"] == len(ids)
    path = Path(summary["path"])
    assert path == out / f"rmo-report-{settings.namespace}.html"
    page = path.read_text()
    # self-contained: no script, no stylesheet or image from anywhere else
    assert "<script" not in page and "href=" not in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    images = plots(page)
    assert sorted(images) == sorted(PLOTS)
    for name, data in images.items():
        assert_readable_png(name, data)
    assert "not_json" in page and "schema" in page  # the two dead letters' error types
    assert "global/all/total" in page and "provider:claude/all/day" in page

    # the Q-values the report plots are the live Q-table's: it folds the rewards topic as the
    # projection does (a change to one without the other fails here)
    report_log = await read_log(settings, topics, None)
    state = most_updated_state(report_log)
    curve = learning_curve(report_log.rewards, qconfig(settings), state)
    assert curve[-1].updates == rewards
    assert curve[-1].q == pytest.approx(live_q[state], abs=0, rel=0)

    # a window with nothing in it: every plot is still there, drawn as "no data"
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    result = rmo("report", "--out", str(out), "--since", later, "--json", env=env)
    assert result.returncode == 0, result.stderr
    empty = orjson.loads(result.stdout)
    assert empty["events"] == 0 and sorted(empty["empty"]) == sorted(PLOTS)
    images = plots(Path(empty["path"]).read_text())
    assert sorted(images) == sorted(PLOTS)
    assert all(Image.open(io.BytesIO(d)).format == "PNG" for d in images.values())


async def _updates_at_least(redis: Redis, keys: Keys, n: int) -> bool:
    return int(await redis.hget(keys.qmeta, "updates") or 0) >= n
