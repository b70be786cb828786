"""The stall detector (the Grokputer checklist's deadlock detector): a watchdog per worker.

Two things are watched:

1. **The event loop.** A task on the loop beats every :data:`HEARTBEAT_S` (100 ms). A daemon
   thread checks the beat; when it is older than ``RMO_STALL_MS`` (default 2000 ms) the loop
   is blocked (a synchronous call, a CPU-bound loop), and the thread takes the stack of the
   loop's thread (what blocks it) and of every asyncio task, and logs them at once: the loop
   itself cannot log while blocked. When the loop runs again, the beat task measures how
   long it was away and emits one ``StageStalled`` (kind ``event_loop``) on the system topic.
   The beat task measures the gap itself, so a block the thread could not see (C code holding
   the GIL, a stopped process) is still reported, without a stack.
2. **Each consumer's progress.** Every :data:`PROGRESS_INTERVAL_S` the worker compares, for
   each topic-partition assigned to it, the high watermark its Kafka consumer saw in fetch
   responses (SPEC §2: never ``end_offsets``) with each consumer's checkpoint in Redis
   (``{ns}:ckpt:{consumer}:{topic}:{partition}``, the last offset it applied, streams/stage.py).
   A consumer with lag > 0 whose checkpoint did not move for ``RMO_STALL_S`` (default 60 s) is
   stalled: the stacks of every asyncio task are logged and one ``StageStalled`` (kind
   ``consumer``) is emitted, with the stack of that consumer's agent task; the next one only
   after it moved again. (A batch legitimately waiting longer, e.g. a provider's retries and
   fallbacks at a 30 s timeout each, is reported too: from outside it looks the same.)

Stacks of tasks are their await chains (``cr_await`` from the task's coroutine down), which
show where each coroutine waits; ``Task.get_stack()`` only gives the outermost frame of a
suspended coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis

from models.codec import encode, make_event
from models.events import StageStalled
from streams.keys import Keys
from streams.logs import get_logger
from streams.stage import REDIS_DOWN

log = get_logger("rmo.stall")

HEARTBEAT_S = 0.1
"""How often the loop's beat task runs (s); a stall is measured to about this precision."""
PROGRESS_INTERVAL_S = 5.0
"""How often consumers' progress is checked (s), at most (a quarter of ``RMO_STALL_S`` when
that is shorter, so a stall is seen within 1.25 x the threshold)."""
MAX_FRAMES = 30
"""Frames kept per stack (the innermost ones)."""
MAX_EVENT_STACK_CHARS = 8000
"""Characters of a stack carried by a ``StageStalled`` event (the log has them all)."""


class StallSettings(BaseSettings):
    """``RMO_STALL_MS``: a loop blocked longer than this (ms) is a stall (asyncio's debug mode
    flags callbacks over 100 ms; 2 s is far beyond any healthy batch on a busy 2-core machine).
    ``RMO_STALL_S``: a consumer with lag that applied nothing for this long (s) is stalled."""

    model_config = SettingsConfigDict(env_prefix="RMO_", extra="ignore", frozen=True)

    stall_ms: float = Field(default=2000.0, gt=0)
    stall_s: float = Field(default=60.0, gt=0)


# --------------------------------------------------------------------------- stacks


def _frames(coro: Any) -> list[FrameType]:
    """The frames of an await chain, outermost first: each coroutine (or generator, async
    generator) and what it awaits, until a future or a finished coroutine."""
    frames = []
    for _ in range(256):  # a chain is never that deep; a cycle must not hang the watchdog
        if coro is None:
            break
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is not None:
            frames.append(frame)
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))
    return frames


def _format(frames: Sequence[FrameType]) -> list[str]:
    return [f'File "{f.f_code.co_filename}", line {f.f_lineno}, in {f.f_code.co_name}'
            for f in frames[-MAX_FRAMES:]]


def task_stack(task: asyncio.Task) -> list[str]:
    """Where ``task`` is: its await chain as ``File "…", line N, in name`` lines, outermost
    first (at most :data:`MAX_FRAMES`, the innermost)."""
    return _format(_frames(task.get_coro()))


def all_task_stacks(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """Every unfinished task of ``loop``: ``{"task": name, "coro": qualname, "stack": [...]}``.
    Safe to call from another thread while the loop is blocked (it only reads)."""
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:  # the task set changed while being copied (the loop is running)
        return []
    out = []
    for t in tasks:
        coro = t.get_coro()
        out.append({"task": t.get_name(), "coro": getattr(coro, "__qualname__", repr(coro)),
                    "stack": task_stack(t)})
    return out


def thread_stack(thread_id: int) -> list[str]:
    """The current stack of thread ``thread_id`` (innermost last), empty if it is gone."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return []
    return [line.rstrip() for line in traceback.format_stack(frame)[-MAX_FRAMES:]]


def _clip(lines: Iterable[str]) -> str:
    text = "\n".join(lines)
    return text if len(text) <= MAX_EVENT_STACK_CHARS else "…" + text[-MAX_EVENT_STACK_CHARS:]


# --------------------------------------------------------------------------- the event loop


@dataclass
class LoopStall:
    """One measured loop stall: ``blocked_ms`` (ms) the loop did not run; ``stack``: the
    loop thread's stack while blocked (empty if the watchdog thread did not see the block);
    ``tasks``: every asyncio task's stack (:func:`all_task_stacks`)."""

    blocked_ms: float
    stack: list[str] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)


class LoopWatchdog:
    """Watches one event loop (module docstring, 1). ``report`` is awaited, on the loop, with
    each :class:`LoopStall` once the loop runs again.

    Use: ``await watchdog.run()`` as a task on the loop to watch (until cancelled); ``stop()``
    pauses the watch for good (e.g. before a shutdown whose synchronous joins block the loop).
    """

    def __init__(self, threshold_ms: float, report: Callable[[LoopStall], Awaitable[None]],
                 tick_s: float = HEARTBEAT_S) -> None:
        self.threshold_s = threshold_ms / 1000
        self.tick_s = tick_s
        self._report = report
        self._beat = time.monotonic()
        self._seen: LoopStall | None = None  # what the thread captured during this block
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._reports: set[asyncio.Task] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        watcher = threading.Thread(target=self._watch, args=(loop, threading.get_ident()),
                                   name="rmo-stall-watchdog", daemon=True)
        watcher.start()
        try:
            while not self._stopped.is_set():
                before = time.monotonic()
                self._beat = before
                await asyncio.sleep(self.tick_s)
                late_s = time.monotonic() - before - self.tick_s
                if late_s > self.threshold_s and not self._stopped.is_set():
                    self._reported(loop, late_s)
        finally:
            self._stopped.set()

    def stop(self) -> None:
        self._stopped.set()

    def _reported(self, loop: asyncio.AbstractEventLoop, late_s: float) -> None:
        with self._lock:
            seen, self._seen = self._seen, None
        stall = LoopStall(blocked_ms=round(late_s * 1000, 1))
        if seen is not None:
            stall.stack, stall.tasks = seen.stack, seen.tasks
        else:  # the thread did not run during the block: only the tasks' stacks, as of now
            stall.tasks = all_task_stacks(loop)
        # the thread logged the stacks when it saw the block; otherwise they are logged here
        stacks = {} if seen is not None else {"tasks": stall.tasks}
        log.error("event loop was blocked", blocked_ms=stall.blocked_ms,
                  threshold_ms=self.threshold_s * 1000, **stacks)
        # reporting produces to Kafka: a task of its own, so the beat goes on meanwhile
        task = asyncio.create_task(self._report(stall))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _watch(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        captured_beat = None
        while not self._stopped.wait(self.tick_s / 2):
            beat = self._beat
            blocked_s = time.monotonic() - beat
            if blocked_s <= self.threshold_s or beat == captured_beat:
                continue
            captured_beat = beat
            stall = LoopStall(blocked_ms=round(blocked_s * 1000, 1),
                              stack=thread_stack(loop_thread), tasks=all_task_stacks(loop))
            with self._lock:
                self._seen = stall
            log.error("event loop blocked: stacks of its thread and of every task",
                      blocked_ms_so_far=stall.blocked_ms, threshold_ms=self.threshold_s * 1000,
                      loop_stack=stall.stack, tasks=stall.tasks)


# --------------------------------------------------------------------------- consumers


@dataclass
class _Progress:
    checkpoint: int
    since: float  # monotonic s: when the checkpoint last moved, or lag appeared
    reported: bool = False


class ProgressTracker:
    """Remembers, per (consumer, topic, partition), when its checkpoint last moved while it
    had lag (module docstring, 2). Times in monotonic seconds."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self._state: dict[tuple[str, str, int], _Progress] = {}

    def observe(self, key: tuple[str, str, int], checkpoint: int, highwater: int,
                now: float) -> float | None:
        """Record one observation: ``checkpoint`` the last offset applied (-1: none),
        ``highwater`` the partition's high watermark (the next offset to be written). Returns
        the seconds without progress when this observation makes the consumer stalled (once
        per stall: again only after it moved or caught up), else None."""
        lag = highwater - checkpoint - 1
        state = self._state.get(key)
        if lag <= 0:
            self._state.pop(key, None)
            return None
        if state is None or state.checkpoint != checkpoint:
            self._state[key] = _Progress(checkpoint, now)
            return None
        if not state.reported and now - state.since >= self.threshold_s:
            state.reported = True
            return now - state.since
        return None


@dataclass(frozen=True)
class ConsumerStall:
    """A consumer that applied nothing for ``stalled_s`` (s) with ``lag`` records to go."""

    consumer: str
    topic: str
    partition: int
    lag: int
    stalled_s: float


async def check_progress(tracker: ProgressTracker, redis: Redis, keys: Keys,
                         readers: Mapping[str, Sequence[str]],
                         highwaters: Mapping[tuple[str, int], int], now: float) -> list[ConsumerStall]:
    """One round of the progress check: ``readers`` maps a topic to the consumers reading it,
    ``highwaters`` (topic, partition) to its high watermark. Returns the new stalls.

    Raises:
        One of streams.stage.REDIS_DOWN: Redis is unreachable (the consumers pause and log
            that themselves; the caller skips the round).
    """
    keyed = [(c, t, p) for (t, p) in sorted(highwaters) for c in readers.get(t, ())]
    if not keyed:
        return []
    values = await redis.mget([keys.checkpoint(c, t, p) for c, t, p in keyed])
    stalls = []
    for (c, t, p), v in zip(keyed, values):
        checkpoint = -1 if v is None else int(v)
        hw = highwaters[(t, p)]
        stalled = tracker.observe((c, t, p), checkpoint, hw, now)
        if stalled is not None:
            stalls.append(ConsumerStall(c, t, p, hw - checkpoint - 1, stalled))
    return stalls


def agent_stack(app: Any, consumer: str) -> list[str]:
    """Where the Faust agent of ``consumer`` is (streams/app.py names it ``rmo.{consumer}``):
    each actor's coroutine stack, from Faust's ``Agent.actor_tracebacks`` (an actor task's
    own await chain ends at Faust's wrapper of the agent's coroutine). Empty if there is no
    such agent."""
    agent = app.agents.get(f"rmo.{consumer}")
    if agent is None:
        return []
    return [line.rstrip() for tb in agent.actor_tracebacks() for line in tb.splitlines()
            if line.strip()]


# --------------------------------------------------------------------------- the worker


def install(app: Any, registry: Any, consumers: Sequence[Any], redis: Redis, keys: Keys,
            worker_id: str, config: StallSettings | None = None) -> LoopWatchdog:
    """Watch a worker's Faust ``app``: its loop and its ``consumers``' progress (objects with
    ``name`` and ``source``, a topic role of ``registry``); stalls are produced as
    ``StageStalled`` on the system topic, keyed by ``worker_id``. Both watches start with the
    app and stop before it shuts down. Returns the loop watchdog."""
    config = config or StallSettings()
    system = registry.name("system")
    readers: dict[str, list[str]] = {}
    for c in consumers:
        readers.setdefault(registry.name(c.source), []).append(c.name)
    tracker = ProgressTracker(config.stall_s)
    interval = min(PROGRESS_INTERVAL_S, config.stall_s / 4)

    async def emit(stalled: StageStalled) -> None:
        event = make_event(stalled, producer=f"worker.{worker_id}", correlation_id=f"stall:{worker_id}")
        try:
            ack = await app.producer.send(system, worker_id.encode(), encode(event),
                                          partition=None, timestamp=None, headers=None)
            await ack
        except Exception as exc:  # noqa: BLE001 - a broker outage: the log lines stand alone
            log.warning("StageStalled not produced", error=repr(exc))

    async def report_loop(stall: LoopStall) -> None:
        await emit(StageStalled(kind="event_loop", worker=worker_id, stalled_ms=stall.blocked_ms,
                                threshold_ms=config.stall_ms, tasks=len(stall.tasks),
                                stack=_clip(stall.stack)))

    watchdog = LoopWatchdog(config.stall_ms, report_loop)

    async def watch_progress() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            highwaters = {}
            with contextlib.suppress(Exception):  # not assigned yet, or rebalancing
                for tp in app.consumer.assignment():
                    hw = app.consumer.highwater(tp)
                    if hw is not None:
                        highwaters[(tp.topic, tp.partition)] = hw
            try:
                stalls = await check_progress(tracker, redis, keys, readers, highwaters,
                                              time.monotonic())
            except REDIS_DOWN:  # the consumers pause and say so themselves
                continue
            except Exception:  # a bug here must not stop the worker, but must show
                log.exception("progress check failed")
                continue
            if stalls:
                tasks = all_task_stacks(loop)
            for s in stalls:
                stack = agent_stack(app, s.consumer)
                log.error("consumer made no progress: stacks of every task", stage=s.consumer,
                          topic=s.topic, partition=s.partition, lag=s.lag,
                          stalled_s=round(s.stalled_s, 1), threshold_s=config.stall_s,
                          consumer_stack=stack, tasks=tasks)
                await emit(StageStalled(kind="consumer", worker=worker_id, stage=s.consumer,
                                        topic=s.topic, partition=s.partition, lag=s.lag,
                                        stalled_ms=round(s.stalled_s * 1000, 1),
                                        threshold_ms=config.stall_s * 1000, tasks=len(tasks),
                                        stack=_clip(stack)))

    async def stall_watchdog() -> None:
        await watchdog.run()

    async def stall_progress() -> None:
        await watch_progress()

    app.task(stall_watchdog)
    app.task(stall_progress)

    @app.on_before_shutdown.connect
    async def stop_watching(sender: Any, **_: Any) -> None:
        watchdog.stop()

    return watchdog
