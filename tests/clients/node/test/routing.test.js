'use strict';
// Exchange routing: topic, headers, mandatory returns, e2e bindings, AE.

const assert = require('node:assert/strict');
const h = require('../lib/helpers');

const { test } = h;

const ROUTING_KEYS = ['', 'a', 'b', 'a.b', 'a.x.b', 'a.x.y.b', 'a.b.c', 'a..b', 'a.', '.a', '.b', 'x.b', 'A'];
// pattern -> routing keys (out of ROUTING_KEYS) that it must match.
const TOPIC_CASES = {
  '#': ROUTING_KEYS,
  '*': ['a', 'b', 'A'],
  a: ['a'],
  'a.*': ['a.b', 'a.'],
  'a.#': ['a', 'a.b', 'a.x.b', 'a.x.y.b', 'a.b.c', 'a..b', 'a.'],
  'a.#.b': ['a.b', 'a.x.b', 'a.x.y.b', 'a..b'],
  'a.*.b': ['a.x.b', 'a..b'],
  '#.b': ['b', 'a.b', 'a.x.b', 'a.x.y.b', 'a..b', '.b', 'x.b'],
  '*.b': ['a.b', '.b', 'x.b'],
  '#.*': ROUTING_KEYS.filter((k) => k !== ''),
  '*.*': ['a.b', 'a.', '.a', '.b', 'x.b'],
  '': [''],
  'a..b': ['a..b'],
};

test('topic routing with * and # patterns including edge cases', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const exchange = ctx.exchange('topic');
  await ch.assertExchange(exchange, 'topic', { durable: false });
  const queues = {};
  for (const pattern of Object.keys(TOPIC_CASES)) {
    const q = await h.tempQueue(ch);
    await ch.bindQueue(q, exchange, pattern);
    queues[pattern] = q;
  }
  for (const key of ROUTING_KEYS) ch.publish(exchange, key, Buffer.from(`rk=${key}`));
  await h.sleep(300);
  for (const [pattern, q] of Object.entries(queues)) {
    const got = (await h.drain(ch, q, 0)).sort();
    const expected = TOPIC_CASES[pattern].map((k) => `rk=${k}`).sort();
    assert.deepEqual(got, expected, `pattern ${JSON.stringify(pattern)}`);
  }
});

test('topic message matching several bindings of one queue is delivered once', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const exchange = ctx.exchange('topic-dup');
  await ch.assertExchange(exchange, 'topic', { durable: false });
  const q = await h.tempQueue(ch);
  for (const p of ['a.*', '#', 'a.b']) await ch.bindQueue(q, exchange, p);
  ch.publish(exchange, 'a.b', Buffer.from('once'));
  assert.deepEqual(await h.drain(ch, q, 300), ['once']);
});

test('headers exchange x-match all, any, all-with-x, any-with-x', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const exchange = ctx.exchange('headers');
  await ch.assertExchange(exchange, 'headers', { durable: false });
  const bindings = {
    all: { 'x-match': 'all', a: 1, b: 'two' },
    any: { 'x-match': 'any', a: 1, b: 'two' },
    'default-is-all': { a: 1, b: 'two' },
    // x- prefixed binding keys are ignored by all/any ...
    'all-ignores-x': { 'x-match': 'all', a: 1, 'x-k': 'v' },
    // ... but matched by RabbitMQ 3.10's all-with-x / any-with-x.
    'all-with-x': { 'x-match': 'all-with-x', a: 1, 'x-k': 'v' },
    'any-with-x': { 'x-match': 'any-with-x', 'x-k': 'v' },
    // a void (null) binding value only requires the header to be present
    'void-presence': { 'x-match': 'all', c: null },
    // numeric equality ignores the integer width: amqplib sends 1 as 'b'
    // in the binding and 100000 as 'I'; the message uses 'l' (long)
    'int-width': { 'x-match': 'all', n: 100000 },
  };
  const queues = {};
  for (const [label, args] of Object.entries(bindings)) {
    const q = await h.tempQueue(ch);
    await ch.bindQueue(q, exchange, `ignored-${label}`, args);
    queues[label] = q;
  }
  const messages = {
    'm-a1-btwo': { a: 1, b: 'two' },
    'm-a1': { a: 1 },
    'm-btwo-extra': { b: 'two', z: 'extra' },
    'm-a-string': { a: '1', b: 'two' }, // type matters: "1" != 1
    'm-a2': { a: 2, b: 'three' },
    'm-a1-xk': { a: 1, 'x-k': 'v' },
    'm-xk': { 'x-k': 'v' },
    'm-c': { c: 'anything' },
    'm-n-long': { n: { '!': 'long', value: 100000 } },
    'm-none': undefined,
  };
  for (const [label, headers] of Object.entries(messages)) {
    ch.publish(exchange, 'some.key', Buffer.from(label), { headers });
  }
  const expected = {
    all: ['m-a1-btwo'],
    any: ['m-a1-btwo', 'm-a1', 'm-btwo-extra', 'm-a-string', 'm-a1-xk'],
    'default-is-all': ['m-a1-btwo'],
    'all-ignores-x': ['m-a1-btwo', 'm-a1', 'm-a1-xk'],
    'all-with-x': ['m-a1-xk'],
    'any-with-x': ['m-a1-xk', 'm-xk'],
    'void-presence': ['m-c'],
    'int-width': ['m-n-long'],
  };
  await h.sleep(300);
  for (const [label, q] of Object.entries(queues)) {
    const got = (await h.drain(ch, q, 0)).sort();
    assert.deepEqual(got, expected[label].sort(), `binding ${label}`);
  }
});

test('mandatory unroutable message is returned with 312 NO_ROUTE', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const returned = [];
  ch.on('return', (msg) => returned.push(msg));

  const missing = ctx.queue('never-declared');
  ch.publish('', missing, Buffer.from('r1'), { mandatory: true, messageId: 'm1' });
  const exchange = ctx.exchange('direct-empty');
  await ch.assertExchange(exchange, 'direct', { durable: false });
  ch.publish(exchange, 'nobody', Buffer.from('r2'), { mandatory: true, messageId: 'm2' });
  ch.publish(exchange, 'nobody', Buffer.from('dropped'), { mandatory: false });

  await h.waitFor(() => returned.length >= 2, 'two basic.return frames');
  await h.sleep(300);
  assert.equal(returned.length, 2);
  const [r1, r2] = returned;
  assert.deepEqual(
    [r1.fields.replyCode, r1.fields.replyText, r1.fields.exchange, r1.fields.routingKey],
    [312, 'NO_ROUTE', '', missing],
  );
  assert.equal(r1.properties.messageId, 'm1');
  assert.equal(r1.content.toString(), 'r1');
  assert.deepEqual(
    [r2.fields.replyCode, r2.fields.replyText, r2.fields.exchange, r2.fields.routingKey],
    [312, 'NO_ROUTE', exchange, 'nobody'],
  );
  assert.equal(r2.properties.messageId, 'm2');
  assert.equal(r2.content.toString(), 'r2');
  assert.equal(ch.closed, false);
  assert.equal(ch.errors.length, 0);
});

test('mandatory routable message is not returned', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const returned = [];
  ch.on('return', (msg) => returned.push(msg));
  const q = await h.tempQueue(ch);
  ch.sendToQueue(q, Buffer.from('ok'), { mandatory: true });
  assert.deepEqual(await h.drain(ch, q, 300), ['ok']);
  assert.equal(returned.length, 0);
});

test('exchange-to-exchange binding routes through both exchanges', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const source = ctx.exchange('e2e-src');
  const dest = ctx.exchange('e2e-dst');
  await ch.assertExchange(source, 'topic', { durable: false });
  await ch.assertExchange(dest, 'direct', { durable: false });
  await ch.bindExchange(dest, source, 'orders.*');
  const qCreated = await h.tempQueue(ch);
  const qDirect = await h.tempQueue(ch);
  await ch.bindQueue(qCreated, dest, 'orders.created');
  await ch.bindQueue(qDirect, source, 'orders.#');

  ch.publish(source, 'orders.created', Buffer.from('via-e2e'));
  ch.publish(source, 'orders.deleted', Buffer.from('no-dest-binding'));
  ch.publish(source, 'billing.created', Buffer.from('unmatched'));
  assert.deepEqual(await h.drain(ch, qCreated, 300), ['via-e2e']);
  assert.deepEqual((await h.drain(ch, qDirect, 0)).sort(), ['no-dest-binding', 'via-e2e']);

  await ch.unbindExchange(dest, source, 'orders.*');
  ch.publish(source, 'orders.created', Buffer.from('after-unbind'));
  assert.deepEqual(await h.drain(ch, qCreated, 300), []);
  assert.deepEqual(await h.drain(ch, qDirect, 0), ['after-unbind']);
});

test('alternate exchange receives unroutable messages', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const returned = [];
  ch.on('return', (msg) => returned.push(msg));
  const ae = ctx.exchange('ae');
  const main = ctx.exchange('with-ae');
  await ch.assertExchange(ae, 'fanout', { durable: false });
  await ch.assertExchange(main, 'direct', { durable: false, alternateExchange: ae });
  const qAe = await h.tempQueue(ch);
  const qMain = await h.tempQueue(ch);
  await ch.bindQueue(qAe, ae, '');
  await ch.bindQueue(qMain, main, 'known');

  ch.publish(main, 'known', Buffer.from('routed-normally'), { mandatory: true });
  ch.publish(main, 'unknown', Buffer.from('to-ae'), { mandatory: true });
  assert.deepEqual(await h.drain(ch, qMain, 300), ['routed-normally']);
  const msg = await ch.get(qAe, { noAck: true });
  assert.ok(msg);
  // The delivery keeps the original exchange and routing key.
  assert.deepEqual(
    [msg.fields.exchange, msg.fields.routingKey, msg.content.toString()],
    [main, 'unknown', 'to-ae'],
  );
  assert.equal(await ch.get(qAe), false);
  // Routed via the AE counts as routed: no basic.return for mandatory.
  assert.equal(returned.length, 0);
});
