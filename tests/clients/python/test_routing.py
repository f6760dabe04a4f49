"""Exchange routing: topic, headers, mandatory returns, e2e bindings, AE."""

import pika

from amqp_helpers import (declare_temp_queue, drain_bodies, pump_for,
                          wait_until)

# pattern -> routing keys (out of ROUTING_KEYS) that it must match.
TOPIC_CASES = {
    "#": ["", "a", "b", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "a..b", "a.", ".a", ".b", "x.b", "A"],
    "*": ["a", "b", "A"],
    "a": ["a"],
    "a.*": ["a.b", "a."],
    "a.#": ["a", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "a..b", "a."],
    "a.#.b": ["a.b", "a.x.b", "a.x.y.b", "a..b"],
    "a.*.b": ["a.x.b", "a..b"],
    "#.b": ["b", "a.b", "a.x.b", "a.x.y.b", "a..b", ".b", "x.b"],
    "*.b": ["a.b", ".b", "x.b"],
    "#.*": ["a", "b", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "a..b", "a.", ".a", ".b", "x.b", "A"],
    "*.*": ["a.b", "a.", ".a", ".b", "x.b"],
    "": [""],
    "a..b": ["a..b"],
}
ROUTING_KEYS = ["", "a", "b", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "a..b", "a.", ".a", ".b", "x.b", "A"]


def test_topic_routing_star_and_hash_patterns_including_edge_cases(conn, ch, names):
    exchange = names.exchange("topic")
    ch.exchange_declare(exchange, exchange_type="topic")
    queues = {}
    for pattern in TOPIC_CASES:
        q = declare_temp_queue(ch)
        ch.queue_bind(q, exchange, routing_key=pattern)
        queues[pattern] = q

    for key in ROUTING_KEYS:
        ch.basic_publish(exchange, key, ("rk=" + key).encode())

    for pattern, q in queues.items():
        got = sorted(drain_bodies(conn, ch, q, settle=0.3 if pattern == "#" else 0))
        expected = sorted(("rk=" + k).encode() for k in TOPIC_CASES[pattern])
        assert got == expected, "pattern %r" % pattern


def test_topic_message_matching_two_bindings_of_one_queue_is_delivered_once(conn, ch, names):
    exchange = names.exchange("topic-dup")
    ch.exchange_declare(exchange, exchange_type="topic")
    q = declare_temp_queue(ch)
    ch.queue_bind(q, exchange, routing_key="a.*")
    ch.queue_bind(q, exchange, routing_key="#")
    ch.queue_bind(q, exchange, routing_key="a.b")
    ch.basic_publish(exchange, "a.b", b"once")
    assert drain_bodies(conn, ch, q, settle=0.3) == [b"once"]


def test_headers_exchange_x_match_all_any_and_with_x(conn, ch, names):
    exchange = names.exchange("headers")
    ch.exchange_declare(exchange, exchange_type="headers")
    bindings = {
        "all": {"x-match": "all", "a": 1, "b": "two"},
        "any": {"x-match": "any", "a": 1, "b": "two"},
        "default-is-all": {"a": 1, "b": "two"},
        # x- prefixed binding keys are ignored by all/any ...
        "all-ignores-x": {"x-match": "all", "a": 1, "x-k": "v"},
        # ... but matched by RabbitMQ 3.10's all-with-x / any-with-x.
        "all-with-x": {"x-match": "all-with-x", "a": 1, "x-k": "v"},
        "any-with-x": {"x-match": "any-with-x", "x-k": "v"},
        # a void (None) binding value only requires the header to be present
        "void-presence": {"x-match": "all", "c": None},
    }
    queues = {}
    for label, args in bindings.items():
        q = declare_temp_queue(ch)
        ch.queue_bind(q, exchange, routing_key="ignored-" + label, arguments=args)
        queues[label] = q

    messages = {
        "m-a1-btwo": {"a": 1, "b": "two"},
        "m-a1": {"a": 1},
        "m-btwo-extra": {"b": "two", "z": "extra"},
        "m-a-string": {"a": "1", "b": "two"},  # type matters: "1" != 1
        "m-a2": {"a": 2, "b": "three"},
        "m-a1-xk": {"a": 1, "x-k": "v"},
        "m-xk": {"x-k": "v"},
        "m-c": {"c": "anything"},
        "m-none": None,
    }
    for label, headers in messages.items():
        ch.basic_publish(exchange, "some.key", label.encode(),
                         pika.BasicProperties(headers=headers))

    expected = {
        "all": ["m-a1-btwo"],
        "any": ["m-a1-btwo", "m-a1", "m-btwo-extra", "m-a-string", "m-a1-xk"],
        "default-is-all": ["m-a1-btwo"],
        "all-ignores-x": ["m-a1-btwo", "m-a1", "m-a1-xk"],
        "all-with-x": ["m-a1-xk"],
        "any-with-x": ["m-a1-xk", "m-xk"],
        "void-presence": ["m-c"],
    }
    pump_for(conn, 0.3)
    for label, q in queues.items():
        got = sorted(b.decode() for b in drain_bodies(conn, ch, q, settle=0))
        assert got == sorted(expected[label]), "binding %r" % label


def test_mandatory_unroutable_message_is_returned_with_no_route(conn, ch, names):
    returned = []
    ch.add_on_return_callback(lambda c, method, props, body: returned.append((method, props, body)))

    # 1. default exchange, no such queue
    missing = names.queue("never-declared")
    ch.basic_publish("", missing, b"r1", pika.BasicProperties(message_id="m1"), mandatory=True)
    # 2. direct exchange with no bindings
    exchange = names.exchange("direct-empty")
    ch.exchange_declare(exchange, exchange_type="direct")
    ch.basic_publish(exchange, "nobody", b"r2", pika.BasicProperties(message_id="m2"), mandatory=True)
    # 3. non-mandatory unroutable messages are dropped silently
    ch.basic_publish(exchange, "nobody", b"dropped", mandatory=False)

    wait_until(conn, lambda: len(returned) >= 2, what="two basic.return frames")
    pump_for(conn, 0.3)
    assert len(returned) == 2
    (m1, p1, b1), (m2, p2, b2) = returned
    assert isinstance(m1, pika.spec.Basic.Return)
    assert (m1.reply_code, m1.reply_text, m1.exchange, m1.routing_key) == (312, "NO_ROUTE", "", missing)
    assert (p1.message_id, b1) == ("m1", b"r1")
    assert (m2.reply_code, m2.reply_text, m2.exchange, m2.routing_key) == (312, "NO_ROUTE", exchange, "nobody")
    assert (p2.message_id, b2) == ("m2", b"r2")
    assert ch.is_open


def test_mandatory_routable_message_is_not_returned(conn, ch):
    returned = []
    ch.add_on_return_callback(lambda *a: returned.append(a))
    q = declare_temp_queue(ch)
    ch.basic_publish("", q, b"ok", mandatory=True)
    assert drain_bodies(conn, ch, q, settle=0.3) == [b"ok"]
    assert returned == []


def test_exchange_to_exchange_binding_routes_through_both(conn, ch, names):
    source = names.exchange("e2e-src")
    dest = names.exchange("e2e-dst")
    ch.exchange_declare(source, exchange_type="topic")
    ch.exchange_declare(dest, exchange_type="direct")
    ch.exchange_bind(destination=dest, source=source, routing_key="orders.*")
    q_created = declare_temp_queue(ch)
    q_direct = declare_temp_queue(ch)
    ch.queue_bind(q_created, dest, routing_key="orders.created")
    ch.queue_bind(q_direct, source, routing_key="orders.#")

    ch.basic_publish(source, "orders.created", b"via-e2e")
    ch.basic_publish(source, "orders.deleted", b"no-dest-binding")
    ch.basic_publish(source, "billing.created", b"unmatched")

    assert drain_bodies(conn, ch, q_created, settle=0.3) == [b"via-e2e"]
    assert sorted(drain_bodies(conn, ch, q_direct, settle=0)) == [b"no-dest-binding", b"via-e2e"]

    ch.exchange_unbind(destination=dest, source=source, routing_key="orders.*")
    ch.basic_publish(source, "orders.created", b"after-unbind")
    assert drain_bodies(conn, ch, q_created, settle=0.3) == []
    assert drain_bodies(conn, ch, q_direct, settle=0) == [b"after-unbind"]


def test_alternate_exchange_receives_unroutable_messages(conn, ch, names):
    returned = []
    ch.add_on_return_callback(lambda *a: returned.append(a))
    ae = names.exchange("ae")
    main = names.exchange("with-ae")
    ch.exchange_declare(ae, exchange_type="fanout")
    ch.exchange_declare(main, exchange_type="direct", arguments={"alternate-exchange": ae})
    q_ae = declare_temp_queue(ch)
    q_main = declare_temp_queue(ch)
    ch.queue_bind(q_ae, ae)
    ch.queue_bind(q_main, main, routing_key="known")

    ch.basic_publish(main, "known", b"routed-normally", mandatory=True)
    ch.basic_publish(main, "unknown", b"to-ae", mandatory=True)

    assert drain_bodies(conn, ch, q_main, settle=0.3) == [b"routed-normally"]
    ae_msgs = []
    for _ in range(2):
        method, _p, body = ch.basic_get(q_ae, auto_ack=True)
        if method is not None:
            ae_msgs.append((method.exchange, method.routing_key, body))
    # The delivery keeps the original exchange and routing key.
    assert ae_msgs == [(main, "unknown", b"to-ae")]
    # Routed via the AE counts as routed: no basic.return for mandatory.
    assert returned == []
