"""AMQP transactions (tx.select / tx.commit / tx.rollback)."""

import pika
import pytest

from amqp_helpers import declare_temp_queue, pump_for, ready_count


def test_tx_rollback_discards_publishes_and_commit_delivers(conn, ch):
    queue = declare_temp_queue(ch)
    observer = conn.channel()

    ch.tx_select()
    ch.basic_publish("", queue, b"rolled-back-1")
    ch.basic_publish("", queue, b"rolled-back-2")
    pump_for(conn, 0.2)
    assert ready_count(observer, queue) == 0, "uncommitted publishes must not be visible"
    ch.tx_rollback()
    pump_for(conn, 0.2)
    assert ready_count(observer, queue) == 0
    assert observer.basic_get(queue) == (None, None, None)

    ch.basic_publish("", queue, b"committed-1")
    ch.basic_publish("", queue, b"committed-2")
    pump_for(conn, 0.2)
    assert ready_count(observer, queue) == 0
    ch.tx_commit()
    assert ready_count(observer, queue) == 2
    bodies = [observer.basic_get(queue, auto_ack=True)[2] for _ in range(2)]
    assert bodies == [b"committed-1", b"committed-2"]
    assert observer.basic_get(queue) == (None, None, None)


def test_tx_acks_take_effect_only_on_commit(conn, ch):
    queue = declare_temp_queue(ch)
    for i in range(2):
        ch.basic_publish("", queue, b"m%d" % i)
    pump_for(conn, 0.1)

    ch.tx_select()
    m0, _p, b0 = ch.basic_get(queue)
    m1, _p, b1 = ch.basic_get(queue)
    assert (b0, b1) == (b"m0", b"m1")

    # Ack m0 then roll back: the ack is forgotten but the message stays
    # unacked on this channel (RabbitMQ does not requeue it).
    ch.basic_ack(m0.delivery_tag)
    ch.tx_rollback()
    observer = conn.channel()
    assert ready_count(observer, queue) == 0

    # Ack m1 and commit: m1 is gone for good.
    ch.basic_ack(m1.delivery_tag)
    ch.tx_commit()

    # Closing the channel requeues only what is still unacked: m0.
    ch.close()
    method, _p, body = observer.basic_get(queue, auto_ack=True)
    assert body == b"m0"
    assert method.redelivered is True
    assert observer.basic_get(queue) == (None, None, None)


def test_tx_commit_and_rollback_without_select_close_channel_406(conn):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.tx_commit()
    assert info.value.reply_code == 406
    assert info.value.reply_text == "PRECONDITION_FAILED - channel is not transactional"

    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.tx_rollback()
    assert info.value.reply_code == 406
    assert info.value.reply_text == "PRECONDITION_FAILED - channel is not transactional"
