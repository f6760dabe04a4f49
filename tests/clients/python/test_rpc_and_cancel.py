"""Direct reply-to RPC and server-initiated consumer cancellation."""

import pika
import pytest

from amqp_helpers import Collector, declare_temp_queue, pump_for, unique, wait_until

REPLY_TO = "amq.rabbitmq.reply-to"


def test_direct_reply_to_rpc_round_trip(conn, ch):
    server_ch = conn.channel()
    request_queue = declare_temp_queue(server_ch)
    seen_reply_to = []

    def serve(channel, method, props, body):
        seen_reply_to.append(props.reply_to)
        channel.basic_publish("", props.reply_to, b"reply:" + body,
                              pika.BasicProperties(correlation_id=props.correlation_id))
        channel.basic_ack(method.delivery_tag)

    server_ch.basic_consume(request_queue, serve)

    replies = Collector()
    # Direct reply-to requires a no-ack consumer on the pseudo-queue.
    client_tag = ch.basic_consume(REPLY_TO, replies, auto_ack=True)
    for i in range(3):
        ch.basic_publish("", request_queue, b"req-%d" % i,
                         pika.BasicProperties(reply_to=REPLY_TO, correlation_id="c-%d" % i))
    wait_until(conn, lambda: len(replies) == 3, what="3 RPC replies")

    assert sorted(replies.bodies()) == [b"reply:req-0", b"reply:req-1", b"reply:req-2"]
    for method, props, body in replies.messages:
        assert props.correlation_id == "c-" + body.decode()[-1]
        assert method.consumer_tag == client_tag
        assert method.exchange == ""
        assert method.routing_key.startswith(REPLY_TO + ".")
    # The server saw a per-channel reply address, not the pseudo-queue name.
    assert len(seen_reply_to) == 3
    assert all(r.startswith(REPLY_TO + ".") and len(r) > len(REPLY_TO) + 1 for r in seen_reply_to)
    assert len(set(seen_reply_to)) == 1


def test_direct_reply_to_without_consumer_closes_channel_406(conn, ch):
    queue = declare_temp_queue(ch)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.basic_publish("", queue, b"x", pika.BasicProperties(reply_to=REPLY_TO))
        ch.basic_qos(prefetch_count=0)  # any synchronous call surfaces the close
    assert info.value.reply_code == 406
    assert info.value.reply_text == "PRECONDITION_FAILED - fast reply consumer does not exist"


def test_server_cancels_consumer_when_queue_is_deleted(conn, ch):
    queue = declare_temp_queue(ch)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame))
    collector = Collector()
    tag = ch.basic_consume(queue, collector)

    # Delete the (exclusive) queue from another channel of the owning connection.
    deleter = conn.channel()
    result = deleter.queue_delete(queue)
    assert result.method.message_count == 0

    wait_until(conn, lambda: cancelled, what="server-sent basic.cancel")
    frame = cancelled[0]
    assert isinstance(frame.method, pika.spec.Basic.Cancel)
    assert frame.method.consumer_tag == tag
    pump_for(conn, 0.2)
    assert ch.is_open, "basic.cancel must not close the channel"
    assert collector.messages == []
    assert tag not in ch.consumer_tags
    # The channel remains fully usable.
    q2 = declare_temp_queue(ch)
    ch.basic_publish("", q2, b"still-works")
    pump_for(conn, 0.1)
    assert ch.basic_get(q2, auto_ack=True)[2] == b"still-works"


def test_acks_handed_over_from_worker_threads_keep_the_consumer(conn, ch):
    """A consumer whose callback passes each message to a worker thread, which asks the
    connection's thread to ack it (pika's add_callback_threadsafe), while that thread keeps
    reading: RabbitMQ keeps the consumer, so no server basic.cancel may arrive. Ends, as
    pika's own test of this does, with the consumer cancelling itself on an auto-delete
    queue from inside the callback."""
    import queue as queues
    import threading

    name = unique("q-thread-ack")
    ch.confirm_delivery()
    ch.queue_declare(name, auto_delete=True)
    total = 300
    for i in range(total - 1):
        ch.basic_publish("", name, b"m-%d" % i, mandatory=True)
    ch.basic_publish("", name, b"last", mandatory=True)
    ch.basic_qos(prefetch_count=5)
    cancelled_by_server = []
    ch.add_on_cancel_callback(lambda frame: cancelled_by_server.append(frame))
    acked = []
    work = queues.Queue()

    def worker():
        while True:
            item = work.get()
            if item is None:
                return
            channel, method, body = item

            def ack(channel=channel, method=method, body=body):
                channel.basic_ack(method.delivery_tag)
                acked.append(body)
                if body == b"last":
                    channel.basic_cancel(method.consumer_tag)

            conn.add_callback_threadsafe(ack)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        ch.basic_consume(name, lambda c, m, p, b: work.put((c, m, b)))
        wait_until(conn, lambda: len(acked) == total, what="%d acks from worker threads" % total)
        pump_for(conn, 0.3)
    finally:
        for _ in workers:
            work.put(None)
    assert cancelled_by_server == []
    assert sorted(acked) == sorted([b"m-%d" % i for i in range(total - 1)] + [b"last"])
