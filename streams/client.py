"""Producing and reading topics with plain aiokafka: what the CLI, replay and tests use.

"Caught up" is decided from the high watermark that fetch responses carry, never from
``end_offsets()`` (ListOffsets LATEST under-reports on Tansu; SPEC §2).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import RecordMetadata

from models.codec import CodecError, decode, encode
from models.events import Envelope
from streams.stage import PRODUCER_MAX_REQUEST_BYTES, Record

_PARTITIONER = DefaultPartitioner()
"""What ``AIOKafkaProducer.send`` partitions a keyed record by (murmur2 of the key)."""
MAX_OFFSET = 2**63 - 1
"""The largest Kafka offset (an int64 on the wire)."""

class EventProducer:
    """An aiokafka producer speaking envelopes; use as ``async with EventProducer(...)``."""

    def __init__(self, bootstrap: str, **kwargs) -> None:
        kwargs.setdefault("max_request_size", PRODUCER_MAX_REQUEST_BYTES)
        self._max_request_size: int = kwargs["max_request_size"]
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                          max_batch_size=1 << 20, **kwargs)

    async def __aenter__(self) -> Self:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()  # a start that fails still closes its connections
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def send(self, topic: str, key: bytes | None, value: bytes):
        """Buffer one record; returns a future resolving to its RecordMetadata (the ack)."""
        return await self._producer.send(topic, value=value, key=key)

    async def send_events(self, topic: str, events: Iterable[Envelope],
                          key: str | None = None) -> list[RecordMetadata]:
        """Produce envelopes keyed by ``key`` or each one's correlation id; wait for every ack.
        Returns the RecordMetadata list (partition, offset) in input order.

        Each partition's records go into batches of aiokafka's direct batch API
        (``create_batch`` / ``send_batch``) instead of one ``send`` each: the same records,
        partitions and order, for about a third less CPU per record (docs/performance.md,
        "Ingest"). The partition of a key is the default partitioner's (murmur2, as the Java
        client's and ``send``'s), so a key's records land where every other producer puts
        them. A record's offset is its batch's base offset plus its place in the batch; its
        ``timestamp`` is the batch's as the broker acked it (-1 under CreateTime, where
        ``send``'s ack carried the record's own).

        Raises:
            aiokafka.errors.MessageSizeTooLargeError: an encoded record is over the
                producer's ``max_request_size`` (as ``send`` raises it); the records before
                it in ``events`` may have been sent.
        """
        partitions = sorted(await self._producer.partitions_for(topic))
        open_batches: dict[int, tuple[Any, list[int]]] = {}  # partition -> (builder, indexes)
        sent: list[tuple[asyncio.Future, list[int]]] = []
        # encoded as they are appended: a full batch goes out while the next ones are encoded
        for i, event in enumerate(events):
            k, value = (key or event.correlation_id).encode(), encode(event)
            if len(k) + len(value) > self._max_request_size:
                raise MessageSizeTooLargeError(f"a record of {len(k) + len(value)} bytes is "
                                               f"over max_request_size={self._max_request_size}")
            p = _PARTITIONER(k, partitions, partitions)
            if p not in open_batches:
                open_batches[p] = (self._producer.create_batch(), [])
            builder, members = open_batches[p]
            if builder.append(key=k, value=value, timestamp=None) is None:  # full: send it
                sent.append((await self._producer.send_batch(builder, topic, partition=p), members))
                builder, members = open_batches[p] = (self._producer.create_batch(), [])
                builder.append(key=k, value=value, timestamp=None)  # an empty batch takes any
            members.append(i)
        for p, (builder, members) in open_batches.items():
            sent.append((await self._producer.send_batch(builder, topic, partition=p), members))
        acks: dict[int, RecordMetadata] = {}
        for base, (_, members) in zip(await asyncio.gather(*(f for f, _ in sent)), sent):
            for j, i in enumerate(members):
                acks[i] = RecordMetadata(*base[:3], base.offset + j, *base[4:])
        return [acks[i] for i in range(len(acks))]


async def read_topic(bootstrap: str, topic: str, *, start: dict[int, int] | None = None,
                     follow: bool = False, idle_timeout_s: float = 30.0) -> AsyncIterator[Record]:
    """Yield every record of ``topic`` from the beginning (or per-partition ``start`` offsets).

    Without ``follow`` it stops once every partition's position reached the high watermark
    seen in a fetch response. Raises TimeoutError when a partition reports no high watermark
    within ``idle_timeout_s``.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                group_id=None, auto_offset_reset="earliest",
                                fetch_max_wait_ms=100,
                                # a dead letter of a 1 MB record is ~1.4 MB
                                max_partition_fetch_bytes=2 * PRODUCER_MAX_REQUEST_BYTES)
    try:
        await consumer.start()  # inside: a start that fails still closes its connections
        partitions = await _partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        for tp in tps:
            if start and tp.partition in start:
                consumer.seek(tp, start[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + idle_timeout_s
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, msgs in batch.items():
                for m in msgs:
                    yield Record(m.topic, m.partition, m.offset, m.key, m.value)
            if follow:
                continue
            if await _caught_up(consumer, tps):
                return
            if batch:
                deadline = time.monotonic() + idle_timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: no high watermark within {idle_timeout_s} s")
    finally:
        await consumer.stop()


async def read_events(bootstrap: str, topic: str) -> AsyncIterator[Envelope]:
    """Every envelope of ``topic`` from the beginning to the high watermark (:func:`read_topic`);
    a record that does not decode is skipped (the stage that read it dead-lettered it)."""
    async for record in read_topic(bootstrap, topic):
        try:
            yield decode(record.value)
        except CodecError:
            continue


async def high_watermarks(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """partition -> high watermark of ``topic``, from a fetch response (consumes nothing
    durable). Raises TimeoutError when a partition reports none within ``timeout_s``."""
    return (await topics_high_watermarks(bootstrap, [topic], timeout_s))[topic]


async def topics_high_watermarks(bootstrap: str, topics: Sequence[str],
                                 timeout_s: float = 30.0) -> dict[str, dict[int, int]]:
    """topic -> partition -> high watermark for each of ``topics``, with one client (SPEC §2:
    Tansu's high watermark is the one of a fetch response). Raises TimeoutError when a
    partition reports none within ``timeout_s``.

    Each partition is fetched from ListOffsets' latest offset: Tansu's (the last batch's
    base + 1) is at or below the high watermark, so the fetch is valid and returns at most
    that batch, not the partition's history; Apache Kafka's is the high watermark itself."""
    hw: dict[TopicPartition, int] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                fetch_max_wait_ms=50)
    try:
        await consumer.start()  # inside: a start that fails still closes its connections
        tps = [TopicPartition(t, p) for t in dict.fromkeys(topics)
               for p in await _partitions(consumer, t)]
        consumer.assign(tps)
        for tp, latest in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, latest)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100)
            for tp in tps:
                h = consumer.highwater(tp)
                if h is not None and tp not in hw:
                    hw[tp] = h
                    consumer.pause(tp)  # known: stop fetching its records
            if len(hw) == len(tps):
                out: dict[str, dict[int, int]] = {t: {} for t in topics}
                for tp, h in hw.items():
                    out[tp.topic][tp.partition] = h
                return out
        missing = sorted({tp.topic for tp in tps if tp not in hw})
        raise TimeoutError(f"{', '.join(missing)}: no high watermark reported within {timeout_s} s")
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> Sequence[int]:
    for _ in range(50):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise LookupError(f"topic {topic} does not exist: run `rmo topics create`")


async def _caught_up(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> bool:
    for tp in tps:
        hw = consumer.highwater(tp)
        if hw is None or await consumer.position(tp) < hw:
            return False
    return True
