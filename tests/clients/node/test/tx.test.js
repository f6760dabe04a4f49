'use strict';
// AMQP transactions. amqplib has no tx helpers, so these use the channel's
// generic rpc() with amqplib's own method definitions (same codec/framing).

const assert = require('node:assert/strict');
const h = require('../lib/helpers');

const { test } = h;
const { defs } = h;

const txSelect = (ch) => h.withTimeout(ch.rpc(defs.TxSelect, {}, defs.TxSelectOk), h.WAIT_MS, 'tx.select-ok');
const txCommit = (ch) => h.withTimeout(ch.rpc(defs.TxCommit, {}, defs.TxCommitOk), h.WAIT_MS, 'tx.commit-ok');
const txRollback = (ch) => h.withTimeout(ch.rpc(defs.TxRollback, {}, defs.TxRollbackOk), h.WAIT_MS, 'tx.rollback-ok');

test('tx rollback discards publishes and commit delivers', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const observer = await ctx.channel();
  const queue = await h.tempQueue(ch);

  await txSelect(ch);
  ch.sendToQueue(queue, Buffer.from('rolled-back-1'));
  ch.sendToQueue(queue, Buffer.from('rolled-back-2'));
  await h.sleep(200);
  assert.equal(await h.readyCount(observer, queue), 0, 'uncommitted publishes must not be visible');
  await txRollback(ch);
  await h.sleep(200);
  assert.equal(await h.readyCount(observer, queue), 0);
  assert.equal(await observer.get(queue), false);

  ch.sendToQueue(queue, Buffer.from('committed-1'));
  ch.sendToQueue(queue, Buffer.from('committed-2'));
  await h.sleep(200);
  assert.equal(await h.readyCount(observer, queue), 0);
  await txCommit(ch);
  assert.equal(await h.readyCount(observer, queue), 2);
  assert.deepEqual(await h.drain(observer, queue, 0), ['committed-1', 'committed-2']);
});

test('tx acks take effect only on commit', async (t) => {
  const ctx = await h.setup(t);
  const ch = await ctx.channel();
  const queue = await h.tempQueue(ch);
  ch.sendToQueue(queue, Buffer.from('m0'));
  ch.sendToQueue(queue, Buffer.from('m1'));
  await h.sleep(100);

  await txSelect(ch);
  const m0 = await ch.get(queue);
  const m1 = await ch.get(queue);
  assert.deepEqual([m0.content.toString(), m1.content.toString()], ['m0', 'm1']);

  // Ack m0 then roll back: the ack is forgotten but the message stays
  // unacked on this channel (RabbitMQ does not requeue it).
  ch.ack(m0);
  await txRollback(ch);
  const observer = await ctx.channel();
  assert.equal(await h.readyCount(observer, queue), 0);

  // Ack m1 and commit: m1 is gone for good.
  ch.ack(m1);
  await txCommit(ch);

  // Closing the channel requeues only what is still unacked: m0.
  await ch.close();
  const again = await observer.get(queue, { noAck: true });
  assert.ok(again);
  assert.equal(again.content.toString(), 'm0');
  assert.equal(again.fields.redelivered, true);
  assert.equal(await observer.get(queue), false);
});

test('tx commit and rollback without select close channel 406', async (t) => {
  const ctx = await h.setup(t);
  for (const op of [txCommit, txRollback]) {
    const ch = await ctx.channel();
    await assert.rejects(op(ch), (err) => {
      assert.equal(err.code, 406);
      assert.equal(h.replyText(err), 'PRECONDITION_FAILED - channel is not transactional');
      return true;
    });
  }
});
