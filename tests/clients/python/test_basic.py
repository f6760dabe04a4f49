"""Core publish/consume behaviour as seen through pika's BlockingConnection."""

import datetime
import decimal
import hashlib
import os

import pika
import pytest

from amqp_helpers import (Collector, consume_n, declare_temp_queue, pump_for,
                          ready_count, wait_until)


def test_publish_consume_ack_on_server_named_queue(conn, ch):
    declared = ch.queue_declare(queue="", exclusive=True)
    queue = declared.method.queue
    # RabbitMQ names server-generated queues "amq.gen-<base64>".
    assert queue.startswith("amq.gen-")
    assert declared.method.message_count == 0
    assert declared.method.consumer_count == 0

    for i in range(3):
        ch.basic_publish("", queue, b"hello-%d" % i)

    collector = Collector()
    tag = ch.basic_consume(queue, collector)
    wait_until(conn, lambda: len(collector) == 3, what="3 deliveries")
    pump_for(conn, 0.2)
    assert len(collector) == 3

    assert collector.bodies() == [b"hello-0", b"hello-1", b"hello-2"]
    tags = []
    for method, _props, _body in collector.messages:
        assert method.consumer_tag == tag
        assert method.exchange == ""
        assert method.routing_key == queue
        assert method.redelivered is False
        tags.append(method.delivery_tag)
    assert tags == [1, 2, 3]

    # While unacked, nothing is ready.
    assert ready_count(ch, queue) == 0
    for t in tags:
        ch.basic_ack(t)
    ch.basic_cancel(tag)
    ch.close()

    # Acked messages do not come back when the channel goes away.
    ch2 = conn.channel()
    assert ready_count(ch2, queue) == 0
    assert ch2.basic_get(queue) == (None, None, None)


def test_unacked_messages_are_requeued_when_channel_closes(conn, ch):
    queue = declare_temp_queue(ch)
    ch.basic_publish("", queue, b"keep-me")
    consume_n(conn, ch, queue, 1, ack=False)
    ch.close()

    ch2 = conn.channel()
    method, _props, body = ch2.basic_get(queue, auto_ack=True)
    assert body == b"keep-me"
    assert method.redelivered is True


def test_publisher_confirms_ack_every_message(conn, ch):
    queue = declare_temp_queue(ch)
    ch.confirm_delivery()
    # In confirm mode pika's blocking basic_publish waits for the broker's
    # basic.ack and raises NackError/UnroutableError otherwise.
    for i in range(50):
        ch.basic_publish("", queue, b"confirmed-%d" % i, mandatory=True)
    assert ready_count(ch, queue) == 50
    messages = consume_n(conn, ch, queue, 50)
    assert [m[2] for m in messages] == [b"confirmed-%d" % i for i in range(50)]


def test_publisher_confirm_of_unroutable_mandatory_message_reports_return(conn, ch):
    ch.confirm_delivery()
    missing = "warren-test-py-no-such-queue"
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        ch.basic_publish("", missing, b"lost", mandatory=True)
    returned = info.value.messages
    assert len(returned) == 1
    assert returned[0].method.reply_code == 312
    assert returned[0].method.reply_text == "NO_ROUTE"
    assert returned[0].body == b"lost"
    # Unroutable without mandatory is simply acked (no exception).
    ch.basic_publish("", missing, b"dropped", mandatory=False)
    assert ch.is_open


def test_basic_get_returns_message_count_then_get_empty(conn, ch):
    queue = declare_temp_queue(ch)
    assert ch.basic_get(queue) == (None, None, None)

    for i in range(3):
        ch.basic_publish("", queue, b"get-%d" % i,
                         pika.BasicProperties(message_id="id-%d" % i))
    pump_for(conn, 0.1)

    seen = []
    for expected_remaining in (2, 1, 0):
        method, props, body = ch.basic_get(queue, auto_ack=False)
        assert method is not None, "expected get-ok, got get-empty"
        assert isinstance(method, pika.spec.Basic.GetOk)
        assert method.message_count == expected_remaining
        assert method.redelivered is False
        assert method.exchange == ""
        assert method.routing_key == queue
        seen.append((method.delivery_tag, props.message_id, body))
    assert seen == [(1, "id-0", b"get-0"), (2, "id-1", b"get-1"), (3, "id-2", b"get-2")]

    assert ch.basic_get(queue) == (None, None, None)
    ch.basic_ack(delivery_tag=3, multiple=True)
    pump_for(conn, 0.1)
    assert ready_count(ch, queue) == 0
    ch.close()
    ch2 = conn.channel()
    assert ch2.basic_get(queue) == (None, None, None)


def test_five_megabyte_message_round_trips_intact(conn, ch):
    queue = declare_temp_queue(ch)
    payload = os.urandom(5 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    ch.basic_publish("", queue, payload, pika.BasicProperties(content_type="application/octet-stream"))

    messages = consume_n(conn, ch, queue, 1, timeout=10)
    _method, props, body = messages[0]
    assert len(body) == len(payload)
    assert hashlib.sha256(body).hexdigest() == digest
    assert props.content_type == "application/octet-stream"

    # And the same via basic.get.
    ch.basic_publish("", queue, payload)
    pump_for(conn, 0.2)
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert method is not None
    assert hashlib.sha256(body).hexdigest() == digest


def test_hundred_channels_on_one_connection_publish_and_consume(conn):
    channels = [conn.channel() for _ in range(100)]
    numbers = [c.channel_number for c in channels]
    assert len(set(numbers)) == 100
    assert all(1 <= n <= 65535 for n in numbers)

    queues, collectors = [], []
    for i, c in enumerate(channels):
        q = declare_temp_queue(c)
        col = Collector()
        c.basic_consume(q, col)
        queues.append(q)
        collectors.append(col)
    assert len(set(queues)) == 100

    for i, c in enumerate(channels):
        c.basic_publish("", queues[i], b"channel-%d" % i)

    wait_until(conn, lambda: all(len(col) == 1 for col in collectors), timeout=10,
               what="one delivery on each of 100 channels")
    for i, (c, col) in enumerate(zip(channels, collectors)):
        method, _props, body = col.messages[0]
        assert body == b"channel-%d" % i
        assert method.delivery_tag == 1  # delivery tags are per channel
        c.basic_ack(method.delivery_tag)
    for c in channels:
        c.close()
    assert all(c.is_closed for c in channels)
    assert conn.is_open


def test_all_basic_properties_round_trip(conn, ch):
    queue = declare_temp_queue(ch)
    headers = {
        "string": "hello",
        "unicode": "h\u00e9llo \u2713",
        "empty-string": "",
        "int": 42,
        "negative-int": -7,
        "int64": 2 ** 40,
        "negative-int64": -(2 ** 40),
        "true": True,
        "false": False,
        "decimal": decimal.Decimal("3.14"),
        "timestamp": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "bytes": b"\x00\x01\xffbinary",
        "void": None,
        "table": {"nested-string": "x", "nested-int": 1, "deeper": {"k": "v"}},
        "array": [1, "two", True, {"t": 3}, [4, 5]],
    }
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=7,
        correlation_id="corr-123",
        reply_to="reply-queue-name",
        expiration="3600000",
        message_id="msg-456",
        timestamp=1700000000,
        type="order.created",
        user_id="guest",
        app_id="warren-client-tests",
        cluster_id="cluster-x",
    )
    ch.basic_publish("", queue, b'{"k": 1}', props)
    _method, got, body = consume_n(conn, ch, queue, 1)[0]

    assert body == b'{"k": 1}'
    assert got.content_type == "application/json"
    assert got.content_encoding == "utf-8"
    assert got.delivery_mode == 2
    assert got.priority == 7
    assert got.correlation_id == "corr-123"
    assert got.reply_to == "reply-queue-name"
    assert got.expiration == "3600000"
    assert got.message_id == "msg-456"
    assert got.timestamp == 1700000000
    assert got.type == "order.created"
    assert got.user_id == "guest"
    assert got.app_id == "warren-client-tests"
    assert got.cluster_id == "cluster-x"

    h = got.headers
    assert set(h) == set(headers)
    assert h["string"] == "hello"
    assert h["unicode"] == "h\u00e9llo \u2713"
    assert h["empty-string"] == ""
    assert h["int"] == 42
    assert h["negative-int"] == -7
    assert h["int64"] == 2 ** 40
    assert h["negative-int64"] == -(2 ** 40)
    assert h["true"] is True
    assert h["false"] is False
    assert h["decimal"] == decimal.Decimal("3.14")
    assert h["timestamp"] == datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    assert h["bytes"] == b"\x00\x01\xffbinary"
    assert h["void"] is None
    assert h["table"] == {"nested-string": "x", "nested-int": 1, "deeper": {"k": "v"}}
    assert h["array"] == [1, "two", True, {"t": 3}, [4, 5]]


def test_message_without_properties_arrives_with_properties_unset(conn, ch):
    queue = declare_temp_queue(ch)
    ch.basic_publish("", queue, b"")
    _method, props, body = consume_n(conn, ch, queue, 1)[0]
    assert body == b""
    for field in ("content_type", "content_encoding", "headers", "delivery_mode",
                  "priority", "correlation_id", "reply_to", "expiration",
                  "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id"):
        assert getattr(props, field) is None, field


def test_user_id_not_matching_connection_user_closes_channel_406(conn, ch):
    queue = declare_temp_queue(ch)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.basic_publish("", queue, b"x", pika.BasicProperties(user_id="not-guest"))
        ch.basic_qos(prefetch_count=0)  # any synchronous call surfaces the close
    assert info.value.reply_code == 406
    assert info.value.reply_text == (
        "PRECONDITION_FAILED - user_id property set to 'not-guest' "
        "but authenticated user was 'guest'")


def test_nack_with_requeue_sets_redelivered(conn, ch):
    queue = declare_temp_queue(ch)
    ch.basic_publish("", queue, b"again")
    method, _p, body = consume_n(conn, ch, queue, 1, ack=False)[0]
    assert method.redelivered is False
    ch.basic_nack(method.delivery_tag, requeue=True)

    method2, _p, body2 = consume_n(conn, ch, queue, 1, ack=True)[0]
    assert body2 == b"again"
    assert method2.redelivered is True
    assert method2.delivery_tag > method.delivery_tag


def test_reject_with_requeue_sets_redelivered(conn, ch):
    queue = declare_temp_queue(ch)
    ch.basic_publish("", queue, b"again")
    method, _p, _b = ch.basic_get(queue)
    assert method.redelivered is False
    ch.basic_reject(method.delivery_tag, requeue=True)
    method2, _p, body2 = ch.basic_get(queue, auto_ack=True)
    assert body2 == b"again"
    assert method2.redelivered is True


def test_nack_without_requeue_discards_message(conn, ch):
    queue = declare_temp_queue(ch)
    for i in range(3):
        ch.basic_publish("", queue, b"m%d" % i)
    messages = consume_n(conn, ch, queue, 3, ack=False)
    # multiple=True nacks all three at once.
    ch.basic_nack(messages[-1][0].delivery_tag, multiple=True, requeue=False)
    pump_for(conn, 0.2)
    assert ready_count(ch, queue) == 0
    ch.close()
    ch2 = conn.channel()
    assert ch2.basic_get(queue) == (None, None, None)


def test_reject_without_requeue_discards_message(conn, ch):
    queue = declare_temp_queue(ch)
    ch.basic_publish("", queue, b"bye")
    method, _p, _b = ch.basic_get(queue)
    ch.basic_reject(method.delivery_tag, requeue=False)
    pump_for(conn, 0.2)
    assert ready_count(ch, queue) == 0
    assert ch.basic_get(queue) == (None, None, None)


def test_prefetch_one_delivers_one_message_until_ack(conn, ch):
    queue = declare_temp_queue(ch)
    ch.basic_publish("", queue, b"first")
    ch.basic_publish("", queue, b"second")
    ch.basic_qos(prefetch_count=1)

    collector = Collector()
    ch.basic_consume(queue, collector)
    wait_until(conn, lambda: len(collector) >= 1, what="first delivery")
    pump_for(conn, 0.5)
    assert collector.bodies() == [b"first"], "prefetch=1 must hold back the second message"
    ch2 = conn.channel()
    assert ready_count(ch2, queue) == 1

    ch.basic_ack(collector.messages[0][0].delivery_tag)
    wait_until(conn, lambda: len(collector) >= 2, what="second delivery after ack")
    assert collector.bodies() == [b"first", b"second"]
    ch.basic_ack(collector.messages[1][0].delivery_tag)
