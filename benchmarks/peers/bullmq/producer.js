// BullMQ's client side of bench_e2e: one measured round, printed as one JSON line.
// Usage: node producer.js '<json config>' with url, queue and the Load fields of
// benchmarks/peers/base.py. Every job is tracked to its own result with job.waitUntilFinished
// (BullMQ's QueueEvents stream in Redis), and each result is checked against its payload.
'use strict';
const { Queue, QueueEvents } = require('bullmq');
const IORedis = require('ioredis');

const cfg = JSON.parse(process.argv[2]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const range = (from, to) => Array.from({ length: to - from }, (_, k) => from + k);

function check(result, x) {
  if (result !== x) throw new Error(`job with payload ${x} returned ${JSON.stringify(result)}`);
}

async function main() {
  const connection = new IORedis(cfg.url, { maxRetriesPerRequest: null });
  const queue = new Queue(cfg.queue, {
    connection,
    // Completed jobs (and their return values) kept an hour, as a result TTL; BullMQ's guide
    // asks for auto-removal in production rather than keeping every job forever.
    defaultJobOptions: { removeOnComplete: { age: 3600 }, removeOnFail: { age: 86400 } },
  });
  const events = new QueueEvents(cfg.queue, {
    connection: new IORedis(cfg.url, { maxRetriesPerRequest: null }),
  });
  // One listener per awaited job: thousands at once are expected here.
  events.setMaxListeners(0);
  await events.waitUntilReady();
  const ttl = cfg.result_timeout_s * 1000;
  const roundTrip = async (x) => {
    const job = await queue.add('noop', { x });
    check(await job.waitUntilFinished(events, ttl), x);
  };

  const deadline = Date.now() + 90_000;
  for (;;) {
    try {
      await roundTrip(0);
      break;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await sleep(500);
    }
  }

  let started = performance.now();
  const batches = [];
  for (let i = 0; i < cfg.batched_jobs; i += cfg.batch_size) {
    const xs = range(i, Math.min(i + cfg.batch_size, cfg.batched_jobs));
    batches.push([xs, await queue.addBulk(xs.map((x) => ({ name: 'noop', data: { x } })))]);
  }
  for (const [xs, jobs] of batches) {
    const results = await Promise.all(jobs.map((job) => job.waitUntilFinished(events, ttl)));
    results.forEach((result, k) => check(result, xs[k]));
  }
  const batched = cfg.batched_jobs / ((performance.now() - started) / 1000);

  const perClient = cfg.individual_jobs / cfg.clients;
  const client = async (c) => {
    const xs = range(c * perClient, (c + 1) * perClient);
    const jobs = [];
    for (const x of xs) jobs.push(await queue.add('noop', { x }));
    for (let k = 0; k < jobs.length; k++) check(await jobs[k].waitUntilFinished(events, ttl), xs[k]);
  };
  started = performance.now();
  await Promise.all(range(0, cfg.clients).map(client));
  const individual = cfg.individual_jobs / ((performance.now() - started) / 1000);

  const samples = [];
  for (let i = 0; i < cfg.warmup_round_trips + cfg.round_trips; i++) {
    const t0 = performance.now();
    await roundTrip(i);
    if (i >= cfg.warmup_round_trips) samples.push((performance.now() - t0) / 1000);
  }

  console.log(JSON.stringify({
    batched_jobs_per_s: batched,
    individual_jobs_per_s: individual,
    round_trip_samples_s: samples,
  }));
  await events.close();
  await queue.close();
  await connection.quit();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);
