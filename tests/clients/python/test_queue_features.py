"""Queue features through pika: message TTL, per-message expiration, dead-lettering with
x-death, length limits (drop-head and reject-publish-dlx), queue expiry, single active
consumer, priority queues, delayed messages."""

import time

import pika
import pytest

from amqp_helpers import pump_for, ready_count, wait_until


def get_one(conn, ch, queue, what):
    """The next message of `queue` (basic.get, no-ack), waited for."""
    got = []

    def poll():
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((method, props, body))
        return bool(got)

    wait_until(conn, poll, what=what)
    return got[0]


def dead_letter_pair(ch, names, **arguments):
    """A queue whose dead letters go to a second queue through the default exchange."""
    q, dlq = names.queue("src"), names.queue("dlq")
    ch.queue_declare(dlq)
    args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
    args.update(arguments)
    ch.queue_declare(q, arguments=args)
    return q, dlq


def test_expired_messages_are_dead_lettered_with_x_death(conn, ch, names):
    q, dlq = dead_letter_pair(ch, names, **{"x-message-ttl": 150})
    ch.basic_publish("", q, b"ttl", pika.BasicProperties(message_id="p-1"))
    method, props, body = get_one(conn, ch, dlq, "the expired message in the dead-letter queue")
    assert body == b"ttl"
    assert method.routing_key == dlq
    assert props.message_id == "p-1"
    death = props.headers["x-death"][0]
    assert death["reason"] == "expired"
    assert death["queue"] == q
    assert death["exchange"] == ""
    assert death["count"] == 1
    assert death["routing-keys"] == [q]
    assert props.headers["x-first-death-reason"] == "expired"
    assert props.headers["x-first-death-queue"] == q
    assert ready_count(ch, q) == 0


def test_per_message_expiration_goes_and_is_recorded(conn, ch, names):
    q, dlq = dead_letter_pair(ch, names)
    ch.basic_publish("", q, b"short", pika.BasicProperties(expiration="100"))
    _, props, body = get_one(conn, ch, dlq, "the message past its expiration")
    assert body == b"short"
    assert props.expiration is None
    assert props.headers["x-death"][0]["original-expiration"] == "100"


def test_rejected_messages_are_dead_lettered(conn, ch, names):
    q, dlq = dead_letter_pair(ch, names)
    ch.basic_publish("", q, b"no thanks")
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert body == b"no thanks"
    ch.basic_reject(method.delivery_tag, requeue=False)
    _, props, body = get_one(conn, ch, dlq, "the rejected message")
    assert body == b"no thanks"
    assert props.headers["x-death"][0]["reason"] == "rejected"


def test_max_length_drops_the_oldest_into_the_dead_letter_queue(conn, ch, names):
    q, dlq = dead_letter_pair(ch, names, **{"x-max-length": 2})
    for body in (b"1", b"2", b"3"):
        ch.basic_publish("", q, body)
    _, props, body = get_one(conn, ch, dlq, "the dropped head")
    assert body == b"1"
    assert props.headers["x-death"][0]["reason"] == "maxlen"
    assert ready_count(ch, q) == 2


def test_reject_publish_dlx_nacks_and_dead_letters(conn, ch, names):
    q, dlq = dead_letter_pair(ch, names, **{"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"fits")
    try:
        ch.basic_publish("", q, b"refused")
        raise AssertionError("a publish to a full reject-publish-dlx queue must be nacked")
    except pika.exceptions.NackError:
        pass
    _, props, body = get_one(conn, ch, dlq, "the refused message")
    assert body == b"refused"
    assert props.headers["x-death"][0]["reason"] == "maxlen"


def test_unused_queues_expire(conn, ch, names):
    q = names.queue("expires")
    ch.queue_declare(q, arguments={"x-expires": 200})
    pump_for(conn, 0.6)
    probe = conn.channel()
    try:
        probe.queue_declare(q, passive=True)
        raise AssertionError("the queue should have expired")
    except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as e:
        # RabbitMQ without the plugin: 503 unknown exchange type.
        assert e.reply_code == 404


def test_single_active_consumer_gets_everything_until_it_goes(conn, ch, names):
    q = names.queue("sac")
    ch.queue_declare(q, arguments={"x-single-active-consumer": True})
    first_ch, second_ch = conn.channel(), conn.channel()
    got = {"first": [], "second": []}

    def on(tag):
        def handler(channel, method, props, body):
            got[tag].append(body)
            channel.basic_ack(method.delivery_tag)
        return handler

    first_ch.basic_consume(q, on("first"), consumer_tag="first")
    second_ch.basic_consume(q, on("second"), consumer_tag="second")
    for i in range(5):
        ch.basic_publish("", q, b"m%d" % i)
    wait_until(conn, lambda: len(got["first"]) == 5, what="5 messages to the active consumer")
    pump_for(conn, 0.2)
    assert got["second"] == []
    first_ch.basic_cancel("first")
    ch.basic_publish("", q, b"after")
    wait_until(conn, lambda: got["second"] == [b"after"], what="the next consumer to take over")


def test_priority_queue_delivers_higher_priorities_first(conn, ch, names):
    q = names.queue("prio")
    ch.queue_declare(q, arguments={"x-max-priority": 5})
    ch.confirm_delivery()
    # 9 is above the maximum and counts as 5; no priority counts as 0.
    for body, priority in [(b"a", None), (b"b", 1), (b"c", 5), (b"d", 9), (b"e", 3), (b"f", 1)]:
        ch.basic_publish("", q, body, pika.BasicProperties(priority=priority))
    assert ready_count(ch, q) == 6
    got = []
    while True:
        method, _, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            break
        got.append(body)
    assert got == [b"c", b"d", b"e", b"b", b"f", b"a"]


def test_delayed_exchange_delivers_after_the_delay(conn, ch, names):
    """x-delayed-message (the delayed-message plugin's API): routed by x-delayed-type after
    x-delay milliseconds, with x-delay negated on delivery."""
    x, q = names.exchange("delayed"), names.queue("delayed")
    try:
        ch.exchange_declare(x, exchange_type="x-delayed-message",
                            arguments={"x-delayed-type": "direct"})
    except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as e:
        # RabbitMQ without the plugin: 503 unknown exchange type.
        pytest.skip(f"no delayed-message exchange here: {e}")
    ch.queue_declare(q)
    ch.queue_bind(q, x, routing_key="k")
    ch.confirm_delivery()
    start = time.monotonic()
    ch.basic_publish(x, "k", b"later", pika.BasicProperties(headers={"x-delay": 400}))
    ch.basic_publish(x, "k", b"sooner", pika.BasicProperties(headers={"x-delay": 150}))
    ch.basic_publish(x, "k", b"now")
    _, _, body = get_one(conn, ch, q, "the undelayed message")
    assert body == b"now"
    assert time.monotonic() - start < 0.15
    _, props, body = get_one(conn, ch, q, "the message delayed 150 ms")
    assert body == b"sooner"
    assert time.monotonic() - start >= 0.145
    assert props.headers["x-delay"] == -150
    _, _, body = get_one(conn, ch, q, "the message delayed 400 ms")
    assert body == b"later"
    assert time.monotonic() - start >= 0.395
