"""EventProducer.send_events against a real broker: batched produce keeps what one send()
per record gave (partition of each key, per-key order, the ack of each record)."""

from __future__ import annotations

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from models.codec import decode, make_event
from models.events import TaskSubmitted
from streams.client import EventProducer, read_topic

pytestmark = pytest.mark.integration


def tasks(n: int, pad: int) -> list:
    """``n`` submitted-task events of about ``pad`` bytes each, ten tasks sharing each key."""
    return [make_event(TaskSubmitted(task_id=f"t{i}", kind="code", prompt="x" * pad),
                       producer="test", correlation_id=f"key-{i % (n // 10)}")
            for i in range(n)]


async def test_each_ack_names_where_its_record_landed_over_several_batches(settings, topics):
    # ~6 MB: every partition's records fill more than one 1 MB batch
    events = tasks(3000, 2000)
    topic = topics.name("tasks")
    async with EventProducer(settings.require_kafka()) as producer:
        acks = await producer.send_events(topic, events)

    assert len(acks) == len(events)
    landed = {(r.partition, r.offset): r async for r in read_topic(settings.require_kafka(), topic)}
    assert len(landed) == len(events)
    partitions = sorted({md.partition for md in acks})
    assert partitions == [0, 1, 2, 3]
    for event, md in zip(events, acks):
        record = landed[(md.partition, md.offset)]
        assert decode(record.value).event_id == event.event_id
        assert record.key == event.correlation_id.encode()
        # where send() would have put it: murmur2 of the key over the topic's 4 partitions
        assert md.partition == DefaultPartitioner()(record.key, [0, 1, 2, 3], [0, 1, 2, 3])
    # one key's records keep the order of the call
    by_key: dict[bytes, list[int]] = {}
    for event, md in zip(events, acks):
        by_key.setdefault(event.correlation_id.encode(), []).append(md.offset)
    assert all(offsets == sorted(offsets) for offsets in by_key.values())


async def test_one_key_for_all_and_an_oversized_record_raise_as_send_does(settings, topics):
    topic = topics.name("tasks")
    async with EventProducer(settings.require_kafka(), max_request_size=50_000) as producer:
        acks = await producer.send_events(topic, tasks(20, 100), key="one")
        assert len({md.partition for md in acks}) == 1
        assert [md.offset for md in acks] == list(range(acks[0].offset, acks[0].offset + 20))
        with pytest.raises(MessageSizeTooLargeError, match="over max_request_size=50000"):
            await producer.send_events(topic, tasks(10, 60_000))
