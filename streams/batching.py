"""Batching a Faust stream: at once when the consumer was idle, Faust's window when it is busy.

Faust's ``Stream.take_events(max_, within)`` yields when ``max_`` events are buffered or when
its ``within`` timer fires, so every hop held even a lone record for up to ``within`` seconds:
five hops made most of an idle pipeline's latency.
:func:`take_available` starts a batch as soon as an event is buffered if the consumer's
previous batch ended at least ``interval_s`` ago, and otherwise at ``interval_s`` after that
end, which is what Faust's timer does under load. Measured (docs/performance.md, "Latency"):
an idle pipeline's p50 / p99 went from 169 / 235 ms to 60 / 101 ms, a pipeline at half its
capacity kept its figures. Taking every batch at once instead ("smart batching") was tried
and was worse under load: the per-batch cost of the commit protocol (1-2 ms of CPU) then
runs many more times, and a pipeline at half its capacity saturated.

Acks follow Faust's own take: the stream's automatic acks are off and a batch's events are
acked only after the consumer's loop body for that batch returned, so offsets never pass
unfinished work (SPEC §4).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust


async def take_available(stream: faust.StreamT, max_: int,
                         interval_s: float = 0.0) -> AsyncIterator[list[faust.EventT]]:
    """Yield lists of 1..``max_`` events of ``stream``, each taken as the module docstring says
    (``interval_s``: seconds from a batch's end before the next may start; 0: at once). Events
    arriving while ``max_`` are buffered wait in Faust's stream buffer (back pressure to the
    fetcher)."""
    buffer: list[faust.EventT] = []
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()

    async def add(value: Any) -> Any:
        event = stream.current_event
        if event is None:
            raise RuntimeError("batching found no current event")
        buffer.append(event)
        arrived.set()
        if len(buffer) >= max_:
            room.clear()
            await stream.wait(room)
        return value

    # the records Faust has fetched but its drainer has not handed to ``add`` yet
    pending = stream.channel.queue
    loop = asyncio.get_running_loop()
    finished = -interval_s  # when the last batch was done (loop time)
    acks = stream.enable_acks
    stream.enable_acks = False  # acked below, once the batch is applied
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # how Faust's own take drains the stream
    try:
        while not stream.should_stop:
            if (await stream.wait(arrived)).stopped:
                return
            # what has arrived includes what waits in the channel's queue: let the drainer
            # move it into the buffer first, or a backlog would run as batches of one; stop
            # when a turn of the loop moved nothing (a drainer that waits or has ended)
            moved = True
            while moved and len(buffer) < max_ and not pending.empty():
                had = len(buffer)
                await asyncio.sleep(0)
                moved = len(buffer) > had
            wait = finished + interval_s - loop.time()
            if wait > 0 and len(buffer) < max_:
                await asyncio.sleep(wait)
            batch = buffer[:max_]
            del buffer[:max_]
            if not buffer:
                arrived.clear()
            room.set()
            yield batch
            for event in batch:
                await stream.ack(event)
            finished = loop.time()
    finally:
        stream.enable_acks = acks
        stream._processors.remove(add)
