"""Protocol errors exactly as a pika application sees them."""

import pika
import pytest

from amqp_helpers import connect, connection_parameters, declare_temp_queue


def sync_call(channel):
    """A round trip on channel; raises ChannelClosedByBroker if the broker
    closed the channel in response to an earlier asynchronous method."""
    channel.basic_qos(prefetch_count=0)


def vhost():
    return connection_parameters().virtual_host


def test_passive_declare_of_missing_queue_closes_channel_with_404(conn, ch, names):
    missing = names.queue("missing")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.queue_declare(missing, passive=True)
    assert info.value.reply_code == 404
    assert info.value.reply_text == "NOT_FOUND - no queue '%s' in vhost '%s'" % (missing, vhost())
    assert ch.is_closed
    # Only the channel died: the connection is still usable.
    assert conn.is_open
    assert conn.channel().queue_declare("", exclusive=True).method.queue


def test_passive_declare_of_missing_exchange_closes_channel_with_404(conn, ch, names):
    missing = names.exchange("missing")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.exchange_declare(missing, passive=True)
    assert info.value.reply_code == 404
    assert info.value.reply_text == "NOT_FOUND - no exchange '%s' in vhost '%s'" % (missing, vhost())
    assert conn.is_open


def test_redeclare_queue_with_different_durable_closes_channel_with_406(conn, ch, names):
    queue = names.queue("durable-mismatch")
    ch.queue_declare(queue, durable=False, auto_delete=True)
    ch.queue_declare(queue, durable=False, auto_delete=True)  # identical redeclare is fine
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.queue_declare(queue, durable=True, auto_delete=True)
    assert info.value.reply_code == 406
    assert info.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '%s' in vhost '%s': "
        "received 'true' but current is 'false'" % (queue, vhost()))
    assert conn.is_open


def test_redeclare_exchange_with_different_type_closes_channel_with_406(conn, ch, names):
    exchange = names.exchange("type-mismatch")
    ch.exchange_declare(exchange, exchange_type="direct")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.exchange_declare(exchange, exchange_type="topic")
    assert info.value.reply_code == 406
    assert info.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '%s' in vhost '%s': "
        "received 'topic' but current is 'direct'" % (exchange, vhost()))


def test_publish_to_missing_exchange_closes_channel_with_404(conn, ch, names):
    missing = names.exchange("missing-publish")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.basic_publish(missing, "rk", b"nowhere")  # async: no reply of its own
        sync_call(ch)  # the channel.close arrives while this waits
    assert info.value.reply_code == 404
    assert info.value.reply_text == "NOT_FOUND - no exchange '%s' in vhost '%s'" % (missing, vhost())
    assert ch.is_closed
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        ch.basic_publish("", "x", b"y")
    assert conn.is_open


def test_ack_of_unknown_delivery_tag_closes_channel_with_406(conn, ch):
    declare_temp_queue(ch)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.basic_ack(delivery_tag=99)
        sync_call(ch)
    assert info.value.reply_code == 406
    assert info.value.reply_text == "PRECONDITION_FAILED - unknown delivery tag 99"
    assert conn.is_open


def test_exclusive_queue_is_locked_to_its_connection(conn, ch):
    queue = declare_temp_queue(ch)
    other = connect()
    try:
        och = other.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            och.basic_consume(queue, lambda *a: None)
        assert info.value.reply_code == 405
        assert info.value.reply_text == (
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '%s' in vhost '%s'. "
            "It could be originally declared on another connection or the exclusive property "
            "value does not match that of the original declaration." % (queue, vhost()))
    finally:
        other.close()
