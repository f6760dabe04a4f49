'use strict';
// Protocol errors exactly as an amqplib application sees them.

const assert = require('node:assert/strict');
const h = require('../lib/helpers');

const { test } = h;

function closedWith(code, text) {
  return (err) => {
    assert.equal(err.code, code, err.message);
    assert.equal(h.replyText(err), text);
    return true;
  };
}

test('passive declare of missing queue closes channel with 404', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const missing = ctx.queue('missing');
  await assert.rejects(ch.checkQueue(missing), closedWith(404, `NOT_FOUND - no queue '${missing}' in vhost '${h.VHOST}'`));
  await h.waitFor(() => ch.closed, 'channel closed');
  assert.equal(ch.errors[0].code, 404);
  // Only the channel died: the connection is still usable.
  const ch2 = await ctx.channel();
  await h.tempQueue(ch2);
  assert.equal(ctx.conn.errors.length, 0);
});

test('passive declare of missing exchange closes channel with 404', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const missing = ctx.exchange('missing');
  await assert.rejects(ch.checkExchange(missing), closedWith(404, `NOT_FOUND - no exchange '${missing}' in vhost '${h.VHOST}'`));
});

test('redeclare queue with different durable closes channel with 406', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = ctx.queue('durable-mismatch');
  await ch.assertQueue(queue, { durable: false, autoDelete: true });
  await ch.assertQueue(queue, { durable: false, autoDelete: true }); // identical is fine
  await assert.rejects(
    ch.assertQueue(queue, { durable: true, autoDelete: true }),
    closedWith(
      406,
      `PRECONDITION_FAILED - inequivalent arg 'durable' for queue '${queue}' in vhost '${h.VHOST}': ` +
        "received 'true' but current is 'false'",
    ),
  );
  const ch2 = await ctx.channel();
  await h.tempQueue(ch2);
});

test('redeclare exchange with different type closes channel with 406', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const exchange = ctx.exchange('type-mismatch');
  await ch.assertExchange(exchange, 'direct', { durable: false });
  await assert.rejects(
    ch.assertExchange(exchange, 'topic', { durable: false }),
    closedWith(
      406,
      `PRECONDITION_FAILED - inequivalent arg 'type' for exchange '${exchange}' in vhost '${h.VHOST}': ` +
        "received 'topic' but current is 'direct'",
    ),
  );
});

test('publish to missing exchange closes channel with 404', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const missing = ctx.exchange('missing-publish');
  assert.equal(ch.publish(missing, 'rk', Buffer.from('nowhere')), true); // async: no error yet
  await h.waitFor(() => ch.closed, 'channel.close after publish to missing exchange');
  assert.equal(ch.errors.length, 1);
  closedWith(404, `NOT_FOUND - no exchange '${missing}' in vhost '${h.VHOST}'`)(ch.errors[0]);
  // amqplib reports which method caused it: basic.publish = class 60, method 40.
  assert.equal(ch.errors[0].classId, 60);
  assert.equal(ch.errors[0].methodId, 40);
  assert.throws(() => ch.publish('', 'x', Buffer.from('y')), /Channel closed/);
  assert.equal(ctx.conn.errors.length, 0);
  const ch2 = await ctx.channel();
  await h.tempQueue(ch2);
});

test('ack of unknown delivery tag closes channel with 406', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  await h.tempQueue(ch);
  ch.ack({ fields: { deliveryTag: 99 } });
  await h.waitFor(() => ch.closed, 'channel.close after bogus ack');
  closedWith(406, 'PRECONDITION_FAILED - unknown delivery tag 99')(ch.errors[0]);
  assert.equal(ctx.conn.errors.length, 0);
});

test('exclusive queue is locked to its connection', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  const other = await h.connect();
  try {
    const och = h.track(await other.createChannel());
    await assert.rejects(
      och.consume(queue, () => {}),
      closedWith(
        405,
        `RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '${queue}' in vhost '${h.VHOST}'. ` +
          'It could be originally declared on another connection or the exclusive property ' +
          'value does not match that of the original declaration.',
      ),
    );
  } finally {
    await other.close();
  }
});
