"""Small helpers shared by the pika cross-client tests.

Every wait here is bounded: a broker that never answers makes the test fail
with a clear message instead of hanging.
"""

import os
import time
import uuid

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
WAIT_TIMEOUT = 5.0  # seconds for any single expected event


def amqp_url():
    return os.environ.get("AMQP_URL", DEFAULT_URL)


def connection_parameters():
    params = pika.URLParameters(amqp_url())
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.stack_timeout = 5
    params.blocked_connection_timeout = 10
    params.client_properties = {"connection_name": "warren-clients-python"}
    return params


_connect_failure = None


def connect():
    """Open a BlockingConnection. If the broker could not be reached once,
    later calls fail at once with the same error, so an unreachable or mute
    broker costs one connect timeout per run rather than one per test."""
    global _connect_failure
    if _connect_failure is not None:
        raise AssertionError("broker unreachable earlier in this run: %r" % (_connect_failure,))
    try:
        return pika.BlockingConnection(connection_parameters())
    except Exception as exc:  # pika raises several unrelated types here
        _connect_failure = exc
        raise


def unique(kind):
    """A name no other test (or earlier run) uses."""
    return "warren-test-py-%s-%s" % (kind, uuid.uuid4().hex[:12])


def wait_until(connection, predicate, timeout=WAIT_TIMEOUT, what="condition"):
    """Pump connection I/O until predicate() is true, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        connection.process_data_events(time_limit=min(0.05, remaining))


def pump_for(connection, seconds):
    """Process I/O for a fixed time (used to show that nothing else arrives)."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        connection.process_data_events(time_limit=min(0.05, remaining))


def declare_temp_queue(channel, **kwargs):
    """A server-named, exclusive queue: removed by the broker when the
    connection closes, so nothing is left behind even if a test fails."""
    result = channel.queue_declare(queue="", exclusive=True, **kwargs)
    return result.method.queue


def ready_count(channel, queue):
    return channel.queue_declare(queue=queue, passive=True).method.message_count


class Collector:
    """basic_consume callback that records deliveries (optionally acking)."""

    def __init__(self, ack=False):
        self.messages = []
        self.ack = ack

    def __call__(self, channel, method, properties, body):
        self.messages.append((method, properties, body))
        if self.ack:
            channel.basic_ack(method.delivery_tag)

    def __len__(self):
        return len(self.messages)

    def bodies(self):
        return [m[2] for m in self.messages]


def consume_n(connection, channel, queue, n, timeout=WAIT_TIMEOUT, ack=True):
    """Consume exactly n messages from queue, return them, then cancel."""
    collector = Collector(ack=ack)
    tag = channel.basic_consume(queue, collector)
    try:
        wait_until(connection, lambda: len(collector) >= n, timeout,
                   "%d message(s) on %s (got %d)" % (n, queue, len(collector)))
    finally:
        channel.basic_cancel(tag)
    return collector.messages


def drain_bodies(connection, channel, queue, settle=0.2):
    """All bodies currently routed to queue (get until empty), acked."""
    # Give the broker a moment to finish routing anything in flight.
    pump_for(connection, settle)
    bodies = []
    deadline = time.monotonic() + WAIT_TIMEOUT
    while time.monotonic() < deadline:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)
    raise AssertionError("queue %s did not drain" % queue)
