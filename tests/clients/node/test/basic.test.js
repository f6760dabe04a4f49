'use strict';
// Core publish/consume behaviour as seen through amqplib's promise API.

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const h = require('../lib/helpers');

const { test } = h;

test('publish, consume and ack on a server-named queue', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const ok = await ch.assertQueue('', { exclusive: true });
  const queue = ok.queue;
  // RabbitMQ names server-generated queues "amq.gen-<base64>".
  assert.match(queue, /^amq\.gen-/);
  assert.equal(ok.messageCount, 0);
  assert.equal(ok.consumerCount, 0);

  for (let i = 0; i < 3; i++) assert.equal(ch.sendToQueue(queue, Buffer.from(`hello-${i}`)), true);

  const got = [];
  const { consumerTag } = await ch.consume(queue, (msg) => got.push(msg));
  await h.waitFor(() => got.length === 3, '3 deliveries');
  await h.sleep(200);
  assert.equal(got.length, 3);
  assert.deepEqual(
    got.map((m) => m.content.toString()),
    ['hello-0', 'hello-1', 'hello-2'],
  );
  for (const m of got) {
    assert.equal(m.fields.consumerTag, consumerTag);
    assert.equal(m.fields.exchange, '');
    assert.equal(m.fields.routingKey, queue);
    assert.equal(m.fields.redelivered, false);
  }
  assert.deepEqual(
    got.map((m) => m.fields.deliveryTag),
    [1, 2, 3],
  );
  assert.equal(await h.readyCount(ch, queue), 0, 'unacked messages are not ready');
  for (const m of got) ch.ack(m);
  await ch.cancel(consumerTag);
  await ch.close();

  // Acked messages do not come back when the channel goes away.
  const ch2 = await ctx.channel();
  assert.equal(await h.readyCount(ch2, queue), 0);
  assert.equal(await ch2.get(queue), false);
});

test('unacked messages are requeued when the channel closes', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('keep-me'));
  await h.consumeN(ch, queue, 1, { ack: false });
  await ch.close();

  const ch2 = await ctx.channel();
  const msg = await ch2.get(queue, { noAck: true });
  assert.ok(msg);
  assert.equal(msg.content.toString(), 'keep-me');
  assert.equal(msg.fields.redelivered, true);
});

test('publisher confirms ack every message', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.confirmChannel();
  const queue = await h.tempQueue(ch);
  const N = 200;
  const acks = [];
  const nacks = [];
  ch.on('ack', (f) => acks.push(f));
  ch.on('nack', (f) => nacks.push(f));
  const results = [];
  for (let i = 0; i < N; i++) {
    ch.sendToQueue(queue, Buffer.from(`confirmed-${i}`), { mandatory: true }, (err) => results.push(err));
  }
  await h.withTimeout(ch.waitForConfirms(), h.WAIT_MS, 'waitForConfirms');
  assert.equal(results.length, N, 'every publish callback ran');
  assert.ok(
    results.every((e) => e === null),
    'every message acked',
  );
  assert.equal(nacks.length, 0);
  // Acks may be batched (multiple=true) but must cover tags 1..N exactly.
  assert.ok(acks.length >= 1 && acks.length <= N);
  assert.equal(acks[acks.length - 1].deliveryTag, N);
  let last = 0;
  for (const a of acks) {
    assert.ok(a.deliveryTag > last, 'ack tags increase');
    if (!a.multiple) assert.equal(a.deliveryTag, last + 1, 'single ack for the next tag');
    last = a.deliveryTag;
  }
  assert.equal(await h.readyCount(ch, queue), N);
  const msgs = await h.consumeN(ch, queue, N);
  assert.deepEqual(
    msgs.map((m) => m.content.toString()),
    Array.from({ length: N }, (_, i) => `confirmed-${i}`),
  );
});

test('publisher confirm of unroutable mandatory message comes after its basic.return', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.confirmChannel();
  const events = [];
  ch.on('return', (msg) => events.push(['return', msg]));
  const missing = ctx.queue('never-declared');
  ch.publish('', missing, Buffer.from('lost'), { mandatory: true }, (err) => events.push(['confirm', err]));
  ch.publish('', missing, Buffer.from('dropped'), { mandatory: false }, (err) => events.push(['confirm', err]));
  await h.withTimeout(ch.waitForConfirms(), h.WAIT_MS, 'waitForConfirms');
  assert.deepEqual(
    events.map((e) => e[0]),
    ['return', 'confirm', 'confirm'],
  );
  const returned = events[0][1];
  assert.equal(returned.fields.replyCode, 312);
  assert.equal(returned.fields.replyText, 'NO_ROUTE');
  assert.equal(returned.fields.exchange, '');
  assert.equal(returned.fields.routingKey, missing);
  assert.equal(returned.content.toString(), 'lost');
  assert.equal(events[1][1], null, 'unroutable message is still acked, not nacked');
  assert.equal(events[2][1], null);
});

test('basic.get returns message count then get-empty', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  assert.equal(await ch.get(queue), false);

  for (let i = 0; i < 3; i++) ch.sendToQueue(queue, Buffer.from(`get-${i}`), { messageId: `id-${i}` });
  await h.sleep(100);

  const seen = [];
  let lastMsg;
  for (const remaining of [2, 1, 0]) {
    const msg = await ch.get(queue, { noAck: false });
    assert.ok(msg, 'expected get-ok, got get-empty');
    assert.equal(msg.fields.messageCount, remaining);
    assert.equal(msg.fields.redelivered, false);
    assert.equal(msg.fields.exchange, '');
    assert.equal(msg.fields.routingKey, queue);
    seen.push([msg.fields.deliveryTag, msg.properties.messageId, msg.content.toString()]);
    lastMsg = msg;
  }
  assert.deepEqual(seen, [
    [1, 'id-0', 'get-0'],
    [2, 'id-1', 'get-1'],
    [3, 'id-2', 'get-2'],
  ]);
  assert.equal(await ch.get(queue), false);
  ch.ack(lastMsg, true); // multiple: acks tags 1..3
  await h.sleep(100);
  assert.equal(await h.readyCount(ch, queue), 0);
  await ch.close();
  const ch2 = await ctx.channel();
  assert.equal(await ch2.get(queue), false);
});

test('five megabyte message round-trips intact', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  const payload = crypto.randomBytes(5 * 1024 * 1024);
  const digest = crypto.createHash('sha256').update(payload).digest('hex');
  ch.sendToQueue(queue, payload, { contentType: 'application/octet-stream' });

  const [msg] = await h.consumeN(ch, queue, 1, { ms: 10000 });
  assert.equal(msg.content.length, payload.length);
  assert.equal(crypto.createHash('sha256').update(msg.content).digest('hex'), digest);
  assert.equal(msg.properties.contentType, 'application/octet-stream');

  ch.sendToQueue(queue, payload);
  await h.sleep(200);
  const got = await h.withTimeout(ch.get(queue, { noAck: true }), 10000, 'basic.get of 5 MB');
  assert.ok(got);
  assert.equal(crypto.createHash('sha256').update(got.content).digest('hex'), digest);
});

test('hundred channels on one connection publish and consume', async (t) => {
  const ctx = await h.setup(t);
  const channels = await Promise.all(Array.from({ length: 100 }, () => ctx.channel()));
  const numbers = channels.map((c) => c.ch);
  assert.equal(new Set(numbers).size, 100);
  const queues = await Promise.all(channels.map((c) => h.tempQueue(c)));
  assert.equal(new Set(queues).size, 100);

  const received = channels.map(() => []);
  await Promise.all(channels.map((c, i) => c.consume(queues[i], (msg) => received[i].push(msg))));
  channels.forEach((c, i) => c.sendToQueue(queues[i], Buffer.from(`channel-${i}`)));
  await h.waitFor(() => received.every((r) => r.length === 1), 'one delivery on each of 100 channels', 10000);

  channels.forEach((c, i) => {
    const [msg] = received[i];
    assert.equal(msg.content.toString(), `channel-${i}`);
    assert.equal(msg.fields.deliveryTag, 1, 'delivery tags are per channel');
    c.ack(msg);
  });
  await Promise.all(channels.map((c) => c.close()));
  assert.ok(channels.every((c) => c.closed));
  assert.equal(ctx.conn.errors.length, 0);
  // Connection still fine.
  const extra = await ctx.channel();
  await h.tempQueue(extra);
});

test('all basic properties round-trip', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  const headers = {
    string: 'hello',
    unicode: 'h\u00e9llo \u2713',
    'empty-string': '',
    byte: 7, // amqplib encodes small ints as 'b'
    short: 1000, // 's'
    int: 100000, // 'I'
    long: 2 ** 40, // 'l'
    negative: -100000,
    double: 1.5, // 'd'
    float: { '!': 'float', value: 2.5 },
    'unsigned-byte': { '!': 'unsignedbyte', value: 200 },
    'unsigned-short': { '!': 'unsignedshort', value: 60000 },
    'unsigned-int': { '!': 'unsignedint', value: 4000000000 },
    timestamp: { '!': 'timestamp', value: 1700000000 },
    decimal: { '!': 'decimal', value: { places: 2, digits: 314 } },
    true: true,
    false: false,
    void: null,
    bytes: Buffer.from([0, 1, 255, 98]),
    table: { 'nested-string': 'x', 'nested-int': 1, deeper: { k: 'v' } },
    array: [1, 'two', true, { t: 3 }, [4, 5]],
  };
  ch.sendToQueue(queue, Buffer.from('{"k": 1}'), {
    contentType: 'application/json',
    contentEncoding: 'utf-8',
    headers,
    deliveryMode: 2,
    priority: 7,
    correlationId: 'corr-123',
    replyTo: 'reply-queue-name',
    expiration: 3600000, // amqplib stringifies
    messageId: 'msg-456',
    timestamp: 1700000000,
    type: 'order.created',
    userId: 'guest',
    appId: 'warren-client-tests',
  });
  const [msg] = await h.consumeN(ch, queue, 1);
  const p = msg.properties;
  assert.equal(msg.content.toString(), '{"k": 1}');
  assert.equal(p.contentType, 'application/json');
  assert.equal(p.contentEncoding, 'utf-8');
  assert.equal(p.deliveryMode, 2);
  assert.equal(p.priority, 7);
  assert.equal(p.correlationId, 'corr-123');
  assert.equal(p.replyTo, 'reply-queue-name');
  assert.equal(p.expiration, '3600000');
  assert.equal(p.messageId, 'msg-456');
  assert.equal(p.timestamp, 1700000000);
  assert.equal(p.type, 'order.created');
  assert.equal(p.userId, 'guest');
  assert.equal(p.appId, 'warren-client-tests');
  assert.equal(p.clusterId, undefined);

  const hd = p.headers;
  assert.deepEqual(Object.keys(hd).sort(), Object.keys(headers).sort());
  assert.equal(hd.string, 'hello');
  assert.equal(hd.unicode, 'h\u00e9llo \u2713');
  assert.equal(hd['empty-string'], '');
  assert.equal(hd.byte, 7);
  assert.equal(hd.short, 1000);
  assert.equal(hd.int, 100000);
  assert.equal(hd.long, 2 ** 40);
  assert.equal(hd.negative, -100000);
  assert.equal(hd.double, 1.5);
  assert.equal(hd.float, 2.5);
  assert.equal(hd['unsigned-byte'], 200);
  assert.equal(hd['unsigned-short'], 60000);
  assert.equal(hd['unsigned-int'], 4000000000);
  assert.deepEqual(hd.timestamp, { '!': 'timestamp', value: 1700000000 });
  assert.deepEqual(hd.decimal, { '!': 'decimal', value: { places: 2, digits: 314 } });
  assert.equal(hd.true, true);
  assert.equal(hd.false, false);
  assert.equal(hd.void, null);
  assert.ok(Buffer.isBuffer(hd.bytes));
  assert.deepEqual([...hd.bytes], [0, 1, 255, 98]);
  assert.deepEqual(hd.table, { 'nested-string': 'x', 'nested-int': 1, deeper: { k: 'v' } });
  assert.deepEqual(hd.array, [1, 'two', true, { t: 3 }, [4, 5]]);
});

test('cluster_id property round-trips (sent with the low-level sendMessage)', async (t) => {
  // amqplib's publish() always leaves clusterId unset, so use the channel's
  // own sendMessage with the same codec to put it on the wire.
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  const fields = { exchange: '', routingKey: queue, mandatory: false, immediate: false, ticket: 0 };
  ch.sendMessage(fields, { clusterId: 'cluster-x', messageId: 'with-cluster' }, Buffer.from('c'));
  const [msg] = await h.consumeN(ch, queue, 1);
  assert.equal(msg.properties.clusterId, 'cluster-x');
  assert.equal(msg.properties.messageId, 'with-cluster');
});

test('message without properties arrives with properties unset', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  const fields = { exchange: '', routingKey: queue, mandatory: false, immediate: false, ticket: 0 };
  ch.sendMessage(fields, {}, Buffer.alloc(0));
  const [msg] = await h.consumeN(ch, queue, 1);
  assert.equal(msg.content.length, 0);
  for (const [k, v] of Object.entries(msg.properties)) assert.equal(v, undefined, k);
});

test('user_id not matching the connection user closes channel 406', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('x'), { userId: 'not-guest' });
  await h.waitFor(() => ch.errors.length > 0 && ch.closed, 'channel.close');
  const err = ch.errors[0];
  assert.equal(err.code, 406);
  assert.equal(h.replyText(err), "PRECONDITION_FAILED - user_id property set to 'not-guest' but authenticated user was 'guest'");
});

test('nack with requeue sets redelivered', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('again'));
  const [first] = await h.consumeN(ch, queue, 1, { ack: false });
  assert.equal(first.fields.redelivered, false);
  ch.nack(first, false, true);
  const [second] = await h.consumeN(ch, queue, 1);
  assert.equal(second.content.toString(), 'again');
  assert.equal(second.fields.redelivered, true);
  assert.ok(second.fields.deliveryTag > first.fields.deliveryTag);
});

test('reject with requeue sets redelivered', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('again'));
  const first = await ch.get(queue);
  assert.equal(first.fields.redelivered, false);
  ch.reject(first, true);
  const second = await ch.get(queue, { noAck: true });
  assert.ok(second);
  assert.equal(second.content.toString(), 'again');
  assert.equal(second.fields.redelivered, true);
});

test('nack without requeue discards message', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  for (let i = 0; i < 3; i++) ch.sendToQueue(queue, Buffer.from(`m${i}`));
  const msgs = await h.consumeN(ch, queue, 3, { ack: false });
  ch.nack(msgs[2], true, false); // multiple: all three
  await h.sleep(200);
  assert.equal(await h.readyCount(ch, queue), 0);
  await ch.close();
  const ch2 = await ctx.channel();
  assert.equal(await ch2.get(queue), false);
});

test('reject without requeue discards message', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('bye'));
  const msg = await ch.get(queue);
  ch.reject(msg, false);
  await h.sleep(200);
  assert.equal(await h.readyCount(ch, queue), 0);
  assert.equal(await ch.get(queue), false);
});

test('prefetch one delivers one message until ack', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('first'));
  ch.sendToQueue(queue, Buffer.from('second'));
  await ch.prefetch(1);
  const got = [];
  await ch.consume(queue, (msg) => got.push(msg));
  await h.waitFor(() => got.length >= 1, 'first delivery');
  await h.sleep(500);
  assert.deepEqual(
    got.map((m) => m.content.toString()),
    ['first'],
    'prefetch=1 must hold back the second message',
  );
  const observer = await ctx.channel();
  assert.equal(await h.readyCount(observer, queue), 1);
  ch.ack(got[0]);
  await h.waitFor(() => got.length >= 2, 'second delivery after ack');
  assert.deepEqual(
    got.map((m) => m.content.toString()),
    ['first', 'second'],
  );
  ch.ack(got[1]);
});

// amqplib writes connection.close ahead of publishes still queued in its
// channels, as its own callback-API suite does when it closes a connection
// right after filling a channel's buffer. The broker must answer close-ok and
// ignore what follows until the client drops the socket, as RabbitMQ does;
// dropping it at once left the client writing into a closed socket (EPIPE) and
// waiting forever for its close to complete.
test('closing a connection right after a burst of publishes completes (callback API)', async () => {
  const cb = require('amqplib/callback_api');
  const conn = await new Promise((resolve, reject) => {
    cb.connect(h.AMQP_URL, { timeout: 5000 }, (err, c) => (err ? reject(err) : resolve(c)));
  });
  const errors = [];
  conn.on('error', (err) => errors.push(err));
  try {
    const ch = await new Promise((resolve, reject) => {
      conn.createChannel((err, c) => (err ? reject(err) : resolve(c)));
    });
    const queue = await new Promise((resolve, reject) => {
      ch.assertQueue('', { exclusive: true }, (err, ok) => (err ? reject(err) : resolve(ok.queue)));
    });
    let sent = 0;
    while (sent < 100000 && ch.sendToQueue(queue, Buffer.from('abcdefghij'))) sent++;
    assert.ok(sent > 0);
    const closing = new Promise((resolve, reject) => {
      conn.close((err) => (err ? reject(err) : resolve()));
    });
    await h.withTimeout(closing, h.WAIT_MS, 'connection.close-ok');
    assert.deepEqual(
      errors.map((e) => e.message),
      [],
    );
  } finally {
    conn.connection.stream.destroy();
    if (conn.connection.heartbeater) conn.connection.heartbeater.clear();
  }
});
