'use strict';
// Direct reply-to RPC and server-initiated consumer cancellation.

const assert = require('node:assert/strict');
const h = require('../lib/helpers');

const { test } = h;
const REPLY_TO = 'amq.rabbitmq.reply-to';

test('direct reply-to RPC round trip', async (t) => {
  const ctx = await h.setup(t);
  const serverCh = await ctx.channel();
  const clientCh = await ctx.channel();
  const requestQueue = await h.tempQueue(serverCh);
  const seenReplyTo = [];
  await serverCh.consume(requestQueue, (msg) => {
    seenReplyTo.push(msg.properties.replyTo);
    serverCh.sendToQueue(msg.properties.replyTo, Buffer.concat([Buffer.from('reply:'), msg.content]), {
      correlationId: msg.properties.correlationId,
    });
    serverCh.ack(msg);
  });

  const replies = [];
  // Direct reply-to requires a no-ack consumer on the pseudo-queue.
  const { consumerTag } = await clientCh.consume(REPLY_TO, (msg) => replies.push(msg), { noAck: true });
  for (let i = 0; i < 3; i++) {
    clientCh.sendToQueue(requestQueue, Buffer.from(`req-${i}`), { replyTo: REPLY_TO, correlationId: `c-${i}` });
  }
  await h.waitFor(() => replies.length === 3, '3 RPC replies');

  assert.deepEqual(replies.map((m) => m.content.toString()).sort(), ['reply:req-0', 'reply:req-1', 'reply:req-2']);
  for (const m of replies) {
    assert.equal(m.properties.correlationId, `c-${m.content.toString().slice(-1)}`);
    assert.equal(m.fields.consumerTag, consumerTag);
    assert.equal(m.fields.exchange, '');
    assert.ok(m.fields.routingKey.startsWith(`${REPLY_TO}.`), m.fields.routingKey);
  }
  // The server saw a per-channel reply address, not the pseudo-queue name.
  assert.equal(seenReplyTo.length, 3);
  for (const r of seenReplyTo) {
    assert.ok(r.startsWith(`${REPLY_TO}.`) && r.length > REPLY_TO.length + 1, r);
  }
  assert.equal(new Set(seenReplyTo).size, 1);
  assert.equal(clientCh.errors.length + serverCh.errors.length, 0);
});

test('direct reply-to without a consumer closes channel 406', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('x'), { replyTo: REPLY_TO });
  await h.waitFor(() => ch.closed, 'channel.close');
  assert.equal(ch.errors[0].code, 406);
  assert.equal(h.replyText(ch.errors[0]), 'PRECONDITION_FAILED - fast reply consumer does not exist');
});

test('server cancels consumer when its queue is deleted', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  const calls = [];
  const cancelFrames = [];
  ch.on('cancel', (fields) => cancelFrames.push(fields));
  const { consumerTag } = await ch.consume(queue, (msg) => calls.push(msg));

  // Delete the (exclusive) queue from another channel of the owning connection.
  const deleter = await ctx.channel();
  const del = await deleter.deleteQueue(queue);
  assert.equal(del.messageCount, 0);

  await h.waitFor(() => calls.length > 0, 'consumer callback with null (server basic.cancel)');
  await h.sleep(200);
  assert.deepEqual(calls, [null], 'amqplib signals server cancel by calling the consumer with null');
  assert.equal(cancelFrames.length, 1);
  assert.equal(cancelFrames[0].consumerTag, consumerTag);
  assert.equal(ch.closed, false, 'basic.cancel must not close the channel');
  assert.equal(ch.errors.length, 0);
  // The channel remains fully usable.
  const q2 = await h.tempQueue(ch);
  ch.sendToQueue(q2, Buffer.from('still-works'));
  assert.deepEqual(await h.drain(ch, q2, 100), ['still-works']);
});
