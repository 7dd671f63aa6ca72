// BullMQ's side of bench_e2e: one Worker running a no-op processor, until SIGTERM.
// Usage: node worker.js REDIS_URL QUEUE CONCURRENCY
'use strict';
const { Worker } = require('bullmq');
const IORedis = require('ioredis');

const [url, queueName, concurrency] = process.argv.slice(2);
// BullMQ requires maxRetriesPerRequest null on a worker's connection (blocking commands).
const connection = new IORedis(url, { maxRetriesPerRequest: null });
const worker = new Worker(queueName, async (job) => job.data.x, {
  connection,
  concurrency: Number(concurrency),
});
worker.on('error', (err) => console.error('worker error', err));

let closing = false;
async function shutdown() {
  if (closing) return;
  closing = true;
  await worker.close();
  await connection.quit();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
