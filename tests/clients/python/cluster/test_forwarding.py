"""A queue whose home is one node, used through the others (pika).

Run by run.sh --cluster with AMQP_URLS naming three nodes of one cluster: the
queue is declared on the second, published to with confirms through the
first, and consumed and acked through the third.
"""

import os
import time

import pika
import pika.exceptions

from amqp_helpers import unique

WAIT = 10.0


def urls():
    found = os.environ.get("AMQP_URLS", "").split()
    assert len(found) == 3, "AMQP_URLS must name three nodes"
    return found


def connect(url):
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    return pika.BlockingConnection(params)


def until_declared(conn, queue):
    """A channel on conn once queue is known there (the cluster's log brings it)."""
    deadline = time.monotonic() + WAIT
    while True:
        ch = conn.channel()
        try:
            ch.queue_declare(queue, passive=True)
            return ch
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404, e
            assert time.monotonic() < deadline, "%s not on every node in time" % queue
            time.sleep(0.1)


def test_publish_through_one_node_and_consume_through_another():
    u1, u2, u3 = urls()
    queue = unique("forwarded")
    home = connect(u2)
    home.channel().queue_declare(queue, durable=True)
    publisher = connect(u1)
    consumer = connect(u3)
    try:
        pch = until_declared(publisher, queue)
        cch = until_declared(consumer, queue)
        pch.confirm_delivery()
        for i in range(100):
            # Raises on a nack: confirmed once the home node has it on disk.
            pch.basic_publish(
                "", queue, b"m%d" % i, pika.BasicProperties(delivery_mode=2)
            )
        assert cch.queue_declare(queue, passive=True).method.message_count == 100
        cch.basic_qos(prefetch_count=20)
        got = []
        for method, _props, body in cch.consume(queue, inactivity_timeout=WAIT):
            assert method is not None, "deliveries stopped after %d" % len(got)
            got.append(body)
            cch.basic_ack(method.delivery_tag)
            if len(got) == 100:
                break
        cch.cancel()
        assert got == [b"m%d" % i for i in range(100)]
        hch = home.channel()
        assert hch.queue_declare(queue, passive=True).method.message_count == 0
        hch.queue_delete(queue)
    finally:
        for c in (publisher, consumer, home):
            try:
                c.close()
            except Exception:
                pass


def test_get_and_reject_through_another_node_requeue_at_the_home():
    u1, u2, _u3 = urls()
    queue = unique("forwarded-get")
    home = connect(u1)
    other = connect(u2)
    try:
        hch = home.channel()
        hch.queue_declare(queue, durable=True)
        hch.confirm_delivery()
        hch.basic_publish("", queue, b"one", pika.BasicProperties(delivery_mode=2))
        och = until_declared(other, queue)
        method, _props, body = och.basic_get(queue)
        assert body == b"one" and not method.redelivered
        och.basic_reject(method.delivery_tag, requeue=True)
        method, _props, body = och.basic_get(queue)
        assert body == b"one" and method.redelivered
        och.basic_ack(method.delivery_tag)
        method, _props, _body = och.basic_get(queue)
        assert method is None
        och.queue_delete(queue)
    finally:
        for c in (home, other):
            try:
                c.close()
            except Exception:
                pass
