"""Faust's aiokafka transport with a configurable fetch max wait (URL scheme ``rmokafka://``).

Faust hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer. Tansu (SPEC §2) does not
answer a pending fetch when records arrive: it holds it for the full max wait, so every hop
whose input ran dry waited up to 1.5 s (measured: 450 ms median delivery with 1500, 1 ms
with 100). The app sets ``fetch_max_wait_ms`` (Settings.fetch_max_wait_ms); against Apache
Kafka a short wait only costs a few more idle fetch requests.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as driver

DEFAULT_FETCH_MAX_WAIT_MS = 1500


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when the consumer starts, which has not happened yet
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", DEFAULT_FETCH_MAX_WAIT_MS)
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    """The aiokafka transport, but for the consumer's fetch max wait."""

    Consumer = Consumer
