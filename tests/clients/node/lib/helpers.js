'use strict';
// Shared helpers for the amqplib cross-client tests. Every wait is bounded so
// a broken broker fails a test quickly instead of hanging the run.

const crypto = require('node:crypto');
const path = require('node:path');
const { after, test: nodeTest } = require('node:test');
const amqp = require('amqplib');

const AMQP_URL = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const WAIT_MS = 5000; // for any single expected event
const TEST_TIMEOUT_MS = 10000; // hard limit per test
// After this many tests in a row fail by timing out, the broker is taken to be
// unresponsive and the remaining tests in the file fail at once.
const MAX_CONSECUTIVE_TIMEOUTS = 3;
const VHOST = (() => {
  const p = new URL(AMQP_URL).pathname.replace(/^\//, '');
  return p === '' ? '/' : decodeURIComponent(p);
})();

// amqplib's generated protocol definitions (method ids), loaded from the
// package directory because its "exports" map only exposes the API entry.
const defs = require(path.join(path.dirname(require.resolve('amqplib')), 'lib', 'defs.js'));

let consecutiveTimeouts = 0;

// node:test's test() with a hard per-test time limit that we observe
// ourselves (so a run of timeouts can trip the breaker above).
function brokerTest(name, fn) {
  return nodeTest(name, { timeout: TEST_TIMEOUT_MS + 10000 }, async (t) => {
    if (consecutiveTimeouts >= MAX_CONSECUTIVE_TIMEOUTS) {
      throw new Error(`not run: broker stopped responding (${consecutiveTimeouts} tests in a row timed out)`);
    }
    let timer;
    const limit = new Promise((_, reject) => {
      timer = setTimeout(() => reject(timeoutError(`test exceeded ${TEST_TIMEOUT_MS}ms hard timeout`)), TEST_TIMEOUT_MS);
    });
    try {
      await Promise.race([fn(t), limit]);
      consecutiveTimeouts = 0;
    } catch (err) {
      consecutiveTimeouts = err && err.isTimeout ? consecutiveTimeouts + 1 : 0;
      throw err;
    } finally {
      clearTimeout(timer);
    }
  });
}

function unique(kind) {
  return `warren-test-node-${kind}-${crypto.randomBytes(6).toString('hex')}`;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function timeoutError(message) {
  const err = new Error(message);
  err.isTimeout = true;
  return err;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(timeoutError(`timed out after ${ms}ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function waitFor(predicate, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw timeoutError(`timed out after ${ms}ms waiting for ${what}`);
    await sleep(10);
  }
}

// Every connection this process opened, so none can keep it alive.
const openConnections = new Set();
after(() => {
  for (const conn of openConnections) forceClose(conn);
});

// Drop a connection without a handshake (for an unresponsive broker). amqplib
// only notices 'end'/'error' on its socket, so also stop its heartbeat timers,
// which would otherwise keep the process alive for minutes.
function forceClose(conn) {
  const c = conn.connection;
  c.stream.destroy();
  if (c.heartbeater) c.heartbeater.clear();
  openConnections.delete(conn);
}

// If the broker could not be reached once, later connects fail at once, so an
// unreachable or mute broker costs one connect timeout per file, not per test.
let connectFailure = null;

async function connect() {
  if (connectFailure) throw new Error(`broker unreachable earlier in this run: ${connectFailure.message}`);
  let conn;
  try {
    conn = await withTimeout(amqp.connect(AMQP_URL, { timeout: 5000 }), 6000, 'connection handshake');
  } catch (err) {
    connectFailure = err;
    throw err;
  }
  openConnections.add(conn);
  conn.errors = [];
  conn.on('error', (err) => conn.errors.push(err));
  conn.on('close', () => openConnections.delete(conn));
  return conn;
}

// Adds an 'error' listener (amqplib throws on unhandled channel errors) that
// records what the broker said when it closed the channel.
function track(ch) {
  ch.errors = [];
  ch.closed = false;
  ch.on('error', (err) => ch.errors.push(err));
  ch.on('close', () => {
    ch.closed = true;
  });
  return ch;
}

// The reply-text part of amqplib's "Channel closed by server: 404 (NOT-FOUND)
// with message "..."" error message.
function replyText(err) {
  const m = /with message "(.*)"$/s.exec(err.message);
  return m ? m[1] : undefined;
}

// Per-test context: one connection, channel factory, unique names that are
// deleted afterwards (via a fresh connection), everything closed at the end.
async function setup(t) {
  const conn = await connect();
  const exchanges = [];
  const queues = [];
  const ctx = {
    conn,
    async channel() {
      return track(await withTimeout(conn.createChannel(), WAIT_MS, 'channel.open'));
    },
    async confirmChannel() {
      return track(await withTimeout(conn.createConfirmChannel(), WAIT_MS, 'confirm.select'));
    },
    exchange(kind = 'x') {
      const name = unique(`ex-${kind}`);
      exchanges.push(name);
      return name;
    },
    queue(kind = 'q') {
      const name = unique(`q-${kind}`);
      queues.push(name);
      return name;
    },
  };
  t.after(async () => {
    try {
      await withTimeout(conn.close(), 2000, 'connection.close');
    } catch (_) {
      // already closed (or broker unresponsive)
      forceClose(conn);
    }
    if (exchanges.length + queues.length === 0) return;
    await withTimeout(deleteAll(queues, exchanges), 2 * WAIT_MS, 'cleanup of test queues/exchanges');
  });
  return ctx;
}

async function deleteAll(queues, exchanges) {
  const cleaner = await connect();
  try {
    for (const [kind, names] of [
      ['queue', queues],
      ['exchange', exchanges],
    ]) {
      for (const name of names) {
        const ch = track(await cleaner.createChannel());
        try {
          if (kind === 'queue') await ch.deleteQueue(name);
          else await ch.deleteExchange(name);
          await ch.close();
        } catch (_) {
          // did not exist (or channel closed): nothing to clean
        }
      }
    }
  } finally {
    await withTimeout(cleaner.close(), 2000, 'connection.close').catch(() => forceClose(cleaner));
  }
}

// Server-named exclusive queue: the broker removes it when the connection
// closes, so nothing is left behind even if the test fails.
async function tempQueue(ch, options = {}) {
  const ok = await withTimeout(ch.assertQueue('', { exclusive: true, ...options }), WAIT_MS, 'queue.declare');
  return ok.queue;
}

async function readyCount(ch, queue) {
  return (await withTimeout(ch.checkQueue(queue), WAIT_MS, 'passive queue.declare')).messageCount;
}

// Consume exactly n messages, then cancel. Acks them unless noAck/ack=false.
async function consumeN(ch, queue, n, { ack = true, noAck = false, ms = WAIT_MS } = {}) {
  const messages = [];
  const { consumerTag } = await ch.consume(
    queue,
    (msg) => {
      if (msg === null) return;
      messages.push(msg);
      if (ack && !noAck) ch.ack(msg);
    },
    { noAck },
  );
  try {
    await waitFor(() => messages.length >= n, `${n} message(s) on ${queue} (got ${messages.length})`, ms);
  } finally {
    await withTimeout(ch.cancel(consumerTag), WAIT_MS, 'basic.cancel');
  }
  return messages;
}

// Everything currently routed to queue, via basic.get until get-empty.
async function drain(ch, queue, settleMs = 200) {
  await sleep(settleMs);
  const bodies = [];
  for (let i = 0; i < 10000; i++) {
    const msg = await withTimeout(ch.get(queue, { noAck: true }), WAIT_MS, 'basic.get');
    if (msg === false) return bodies;
    bodies.push(msg.content.toString());
  }
  throw new Error(`queue ${queue} did not drain`);
}

module.exports = {
  test: brokerTest,
  AMQP_URL,
  VHOST,
  WAIT_MS,
  TEST_TIMEOUT_MS,
  defs,
  unique,
  sleep,
  withTimeout,
  waitFor,
  connect,
  track,
  replyText,
  setup,
  tempQueue,
  readyCount,
  consumeN,
  drain,
};
