"""Faust's aiokafka transport (URL scheme ``rmokafka://``), changed in three ways for the worker.

**Fetch max wait.** Faust hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer. Tansu
(SPEC §2) does not answer a pending fetch when records arrive: it holds it for the full max
wait, so every hop whose input ran dry waited up to 1.5 s (measured: 450 ms median delivery
with 1500, 1 ms with 100). The app sets ``fetch_max_wait_ms`` (Settings.fetch_max_wait_ms);
against Apache Kafka a short wait only costs a few more idle fetch requests.

**Reconnect backoff and one log line per broker state change.** aiokafka has no
``reconnect.backoff.ms``: each of its loops that needs a broker (fetcher, group coordinator,
heartbeat, metadata sync, producer sender) retries a refused connection every
``retry_backoff_ms`` (100 ms) and logs every failure, so a worker whose broker went away wrote
about 100 lines a second. Here a node whose connection failed is not dialled again before a
backoff that doubles from :data:`RECONNECT_BACKOFF_MS` to :data:`RECONNECT_BACKOFF_MAX_MS`
(the Java client's ``reconnect.backoff.ms`` / ``reconnect.backoff.max.ms`` defaults, with its
20 % jitter), and :class:`ConnectionLogFilter` replaces the clients' connection errors with
one line when a broker becomes unreachable, a reminder every :data:`REMINDER_S` seconds and
one line when it is reachable again (:class:`BrokerHealth`).

**Bounded stop.** Faust's stop waits without limit for in-flight records to be acked, for the
producer to deliver what it buffered and for the consumer to leave its group: with the broker
(or Redis) gone, none of these ever finishes, so the worker ignored SIGTERM. Each of those
waits is bounded here (``STOP_*_S``); the worker (streams/worker.py) adds a hard deadline.
Giving up on them is safe: a stage acks a record only after its batch was applied in Redis,
and that batch's outputs were acked by the broker first (streams/stage.py, steps 6-8), so an
unfinished batch committed nothing and is redelivered, and no committed offset depends on a
record still in the producer's buffer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiokafka
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)
from faust.transport.drivers import aiokafka as driver

log = logging.getLogger("rmo.kafka")

DEFAULT_FETCH_MAX_WAIT_MS = 1500
RECONNECT_BACKOFF_MS = 50
RECONNECT_BACKOFF_MAX_MS = 1000
RECONNECT_JITTER = 0.2
REMINDER_S = 30.0

STOP_DRAIN_S = 2.5
"""How long records already taken by an agent may take to be acked when the worker stops."""
STOP_COMMIT_S = 1.0
"""Final offset commit when the consumer stops."""
STOP_FLUSH_S = 0.5
"""Delivery of the producer's buffered records when the app stops."""
STOP_CONSUMER_S = 1.5
"""Closing the Kafka consumer (LeaveGroup, connections)."""
STOP_PRODUCER_S = 0.5
"""Closing the Kafka producer (delivery of what is left, connections)."""

# The record arguments that mark a client log record as a symptom of a broker that cannot be
# reached (as opposed to, say, an authorization or a protocol error, which always pass). The
# coordinator error is what the group coordinator raises itself once it marked the
# coordinator dead.
_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, KafkaConnectionError, NodeNotReadyError,
                      RequestTimedOutError, KafkaTimeoutError, GroupCoordinatorNotAvailableError)
# aiokafka.client's message when it could not open a connection to a node (args: node, error).
_CONNECT_FAILED = "Unable connect to node with id %s: %s"
# Client messages with no exception argument that only ever follow a failed connection.
_CONNECTION_MESSAGES = frozenset({
    "Unable to update metadata from %s",
    "Marking the coordinator dead (node %s)for group %s.",
    "Heartbeat session expired - marking coordinator dead",
})


class BrokerHealth:
    """Which Kafka nodes this process cannot reach, and the log lines about it.

    One line when a node becomes unreachable (error), one when it is reachable again
    (warning), and while any node is unreachable a reminder at most every ``reminder_s``
    seconds (warning); both count the client errors suppressed since the outage began.
    ``clock`` returns seconds. Thread-safe: Faust's consumer runs on a thread of its own.
    """

    def __init__(self, reminder_s: float = REMINDER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reminder_s = reminder_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down: dict[str, float] = {}  # node -> since (clock)
        self._suppressed = 0
        self._last_line = 0.0

    def unreachable(self, node: str, reason: str) -> None:
        """Record that a connection to ``node`` failed (logs only on the state change)."""
        with self._lock:
            if node in self._down:
                return
            self._down[node] = self._last_line = self._clock()
        log.error("Kafka %s unreachable (%s); reconnecting with backoff up to %.0f s, "
                  "further connection errors are collapsed (reminder every %.0f s)",
                  node, reason, RECONNECT_BACKOFF_MAX_MS / 1000, self._reminder_s)

    def reachable(self, node: str) -> None:
        """Record that a connection to ``node`` succeeded (logs only on the state change)."""
        with self._lock:
            since = self._down.pop(node, None)
            if since is None:
                return
            suppressed = self._suppressed
            if not self._down:
                self._suppressed = 0
            down_s = self._clock() - since
        log.warning("Kafka %s reachable again after %.1f s (%d connection errors collapsed)",
                    node, down_s, suppressed)

    def suppress(self) -> bool:
        """True (and counted) if a connection error should not be logged: a node is known to be
        unreachable. Logs the periodic reminder when it is due."""
        with self._lock:
            if not self._down:
                return False
            self._suppressed += 1
            now = self._clock()
            if now - self._last_line < self._reminder_s:
                return True
            self._last_line = now
            nodes = ", ".join(f"{n} for {now - t:.0f} s" for n, t in self._down.items())
            suppressed = self._suppressed
        log.warning("Kafka still unreachable: %s (%d connection errors collapsed)", nodes,
                    suppressed)
        return True


class ConnectionLogFilter(logging.Filter):
    """Drops the Kafka clients' connection errors while :class:`BrokerHealth` knows a node is
    unreachable (their first one becomes that node's state-change line); passes the rest."""

    def __init__(self, health: BrokerHealth) -> None:
        super().__init__()
        self.health = health

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == _CONNECT_FAILED and len(args) == 2:
            self.health.unreachable(f"node {args[0]}", str(args[1]))
        exc = record.exc_info[1] if record.exc_info else None
        if (record.msg == _CONNECT_FAILED or record.msg in _CONNECTION_MESSAGES
                or any(isinstance(a, _CONNECTION_ERRORS) for a in (*args, exc))):
            return not self.health.suppress()
        return True


def install_connection_log_filter(health: BrokerHealth) -> None:
    """Attach a :class:`ConnectionLogFilter` to every ``aiokafka`` logger created so far (all
    of them once aiokafka is imported; a logger's filter sees only the records logged on it,
    not its children's)."""
    flt = ConnectionLogFilter(health)
    names = [n for n in logging.Logger.manager.loggerDict
             if n == "aiokafka" or n.startswith("aiokafka.")]
    for name in names:
        logging.getLogger(name).addFilter(flt)


def reconnect_backoff_s(failures: int) -> float:
    """Seconds before the next connection attempt to a node after ``failures`` (>= 1) failed
    in a row: 50 ms doubling to 1 s, with ±20 % jitter so clients do not retry in step."""
    backoff_ms = min(RECONNECT_BACKOFF_MS * 2 ** min(failures - 1, 30), RECONNECT_BACKOFF_MAX_MS)
    return backoff_ms / 1000 * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)


def add_reconnect_backoff(client: AIOKafkaClient, health: BrokerHealth) -> None:
    """Make ``client`` wait :func:`reconnect_backoff_s` before dialling a node whose last
    connection attempt failed, and report each node's reachability to ``health``.

    aiokafka's callers already treat a missing connection as retriable (they back off
    ``retry_backoff_ms`` and try again), so waiting here only slows their retries down.
    """
    connect = client._get_conn
    failures: dict[Any, int] = {}
    not_before: dict[Any, float] = {}

    async def get_conn(node_id: Any, *, group: ConnectionGroup = ConnectionGroup.DEFAULT,
                       no_hint: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        # another caller may fail (and push the next attempt out) while this one sleeps
        while (wait := not_before.get(node_id, 0.0) - loop.time()) > 0:
            await asyncio.sleep(wait)
        conn = await connect(node_id, group=group, no_hint=no_hint)
        if conn is None:
            failures[node_id] = failures.get(node_id, 0) + 1
            not_before[node_id] = loop.time() + reconnect_backoff_s(failures[node_id])
            health.unreachable(f"node {node_id}", "connection failed")
        elif failures.pop(node_id, None) is not None:
            not_before.pop(node_id, None)
            health.reachable(f"node {node_id}")
        return conn

    client._get_conn = get_conn  # type: ignore[method-assign]


async def stop_step(aw: Awaitable[Any], timeout_s: float, what: str) -> None:
    """Await one step of stopping for at most ``timeout_s`` seconds. A step that overruns or
    fails (aiokafka's consumer close can raise ``CancelledError`` from its fetcher) gets one
    log line naming ``what``, and the stop goes on without it.

    Not ``asyncio.wait_for``: Faust's ack and commit waits swallow ``CancelledError``, and
    ``wait_for`` waits for the cancelled awaitable to finish, which they then never do. An
    overrun step is cancelled but not awaited; the event loop's teardown cancels what is left.
    """
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task not in done:
        task.cancel()
        log.warning("stopping: %s did not finish within %.1f s; going on without it", what,
                    timeout_s)
    elif task.cancelled() or task.exception() is not None:
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        log.warning("stopping: %s failed (%s); going on without it", what, reason)


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when the consumer starts, which has not happened yet
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", DEFAULT_FETCH_MAX_WAIT_MS)
        add_reconnect_backoff(consumer._client, transport.broker_health)
        return consumer

    async def on_thread_stop(self) -> None:
        await stop_step(super().on_thread_stop(), STOP_CONSUMER_S, "closing the Kafka consumer")


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def wait_empty(self) -> None:
        """Faust's drain (wait until the records agents took are acked, then commit), bounded.

        The app calls it while the consumer still runs: the in-flight batches get
        :data:`STOP_DRAIN_S` seconds to finish. The consumer's own stop calls it again, when
        Faust goes straight to the final commit: that gets :data:`STOP_COMMIT_S` seconds.
        """
        if self.should_stop:
            await stop_step(super().wait_empty(), STOP_COMMIT_S, "the final offset commit")
        else:
            await stop_step(super().wait_empty(), STOP_DRAIN_S,
                            "finishing in-flight batches and committing their offsets")


class Producer(driver.Producer):
    def _new_producer(self, transactional_id: str | None = None) -> aiokafka.AIOKafkaProducer:
        producer = super()._new_producer(transactional_id)
        add_reconnect_backoff(producer.client, self.transport.broker_health)
        return producer

    async def flush(self) -> None:
        """Wait until the broker acked every buffered record; bounded once the app stops.

        Faust also flushes before each offset commit while running: that wait stays unbounded.
        """
        if self.app.should_stop:
            await stop_step(super().flush(), STOP_FLUSH_S, "delivering buffered records")
        else:
            await super().flush()

    async def on_stop(self) -> None:
        await stop_step(super().on_stop(), STOP_PRODUCER_S, "closing the Kafka producer")


class Transport(driver.Transport):
    """The aiokafka transport with the changes of this module's docstring.

    Attributes:
        broker_health: reachability of the brokers, shared by this transport's clients.
    """

    Consumer = Consumer
    Producer = Producer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker_health = BrokerHealth()
