'use strict';
// A queue whose home is one node, used through the others (amqplib). Run by
// run.sh --cluster with AMQP_URLS naming three nodes of one cluster.

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { test } = require('node:test');
const amqp = require('amqplib');

const URLS = (process.env.AMQP_URLS || '').split(/\s+/).filter(Boolean);
const WAIT_MS = 10000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A channel on conn once the queue is known there (the cluster's log brings it).
async function untilDeclared(conn, queue) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const ch = await conn.createChannel();
    ch.on('error', () => {});
    try {
      await ch.checkQueue(queue);
      return ch;
    } catch (e) {
      assert.equal(e.code, 404, String(e));
      assert.ok(Date.now() < deadline, `${queue} not on every node in time`);
      await sleep(100);
    }
  }
}

test('publish through one node with confirms, consume through another', { timeout: 60000 }, async () => {
  assert.equal(URLS.length, 3, 'AMQP_URLS must name three nodes');
  const queue = `warren-test-js-forwarded-${crypto.randomBytes(6).toString('hex')}`;
  const [c1, c2, c3] = await Promise.all(URLS.map((u) => amqp.connect(u)));
  try {
    // Its home is the third node.
    const home = await c3.createChannel();
    await home.assertQueue(queue, { durable: true });
    await untilDeclared(c1, queue);
    const pub = await c1.createConfirmChannel();
    for (let i = 0; i < 100; i++) {
      pub.sendToQueue(queue, Buffer.from(`m${i}`), { persistent: true });
    }
    // Rejects on a nack: confirmed once the home node has them on disk.
    await pub.waitForConfirms();
    const con = await untilDeclared(c2, queue);
    await con.prefetch(10);
    const got = [];
    let done;
    const all = new Promise((r) => { done = r; });
    await con.consume(queue, (msg) => {
      got.push(msg.content.toString());
      con.ack(msg);
      if (got.length === 100) done();
    });
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`only ${got.length} delivered`)), WAIT_MS);
    });
    try {
      await Promise.race([all, late]);
    } finally {
      clearTimeout(timer);
    }
    assert.deepEqual(got, Array.from({ length: 100 }, (_, i) => `m${i}`));
    await sleep(200);
    const left = await home.checkQueue(queue);
    assert.equal(left.messageCount, 0);
    assert.equal(left.consumerCount, 1, 'the home counts the consumer of another node');
    await con.close();
    await home.deleteQueue(queue);
  } finally {
    await Promise.all([c1, c2, c3].map((c) => c.close().catch(() => {})));
  }
});
