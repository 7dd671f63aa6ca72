--[[
  fail: record a failed attempt; retry it after a backoff, or dead-letter it once out of retries.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a finished (dead or cancelled) record (and of a key moved aside)
  ARGV[3]  job id
  ARGV[4]  lease token
  ARGV[5]  error JSON ({type, message, traceback})
  ARGV[6]  '1' if the error may succeed on retry, '0' to dead-letter at once
  ARGV[7]  backoff in ms before the retry (the caller adds the jitter)
  ARGV[8]  optional: max_retries to apply instead of the record's ('' or absent: the record's),
           for a job whose own options left it to its handler's default; it becomes the
           record's, so later lease expiries count against the same budget
  ARGV[9]  optional: TTL in ms of a dead-lettered record and of a key moved aside (absent: ARGV[2])
  ARGV[10] optional: recording cap (see record in _common.lua; absent or 0: do not record)
  ARGV[11] optional: the run microseconds of this attempt the worker measured ('' or absent:
           unknown)
  Returns  {code, notices}:
           C_RETRY_SCHEDULED  back in the delayed set, status retrying
           C_DEAD_LETTERED    out of retries (or not retryable): status dead
           C_OK               the job was cancelled while it ran: status cancelled
           C_STALE_LEASE, C_ALREADY_FINISHED, C_NOT_FOUND as for complete
           C_CORRUPT          the record is not a hash, or its status, attempts, queue, order,
                              maxr or released is missing or garbled: dead-lettered (CorruptJob)
           notices: what was settled (see _common.lua).
  History  one 'failed' entry (attempt, error type and message) appended to the record's history.
  Events   the finish notice when the job finished here, and then one recording entry.
]]
-- @include _common.lua

local now, ttl, id, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local dead_ttl = tonumber(ARGV[9]) or ttl
NOW, DEAD_TTL = now, dead_ttl
RECORD_LEN = tonumber(ARGV[10]) or 0
RUN_US = ARGV[11] or ''
local k = jobkey(id)
local rec, refused = reported(
  id, {'status', 'attempts', 'queue', 'order', 'maxr', 'cancel', 'released'}, token,
  {running = true})
if not rec then return {refused, notices} end
local q = rec.queue
redis.call('HSET', k, 'error', ARGV[5])
add_history(id, failure_entry(tonumber(rec.attempts), ARGV[5]))
local maxr = tonumber(rec.maxr)
if ARGV[8] and is_uint(ARGV[8]) then
  maxr = tonumber(ARGV[8])
  redis.call('HSET', k, 'maxr', ARGV[8])
end
incr(countskey(q), 'failed', 1)
if rec.cancel == '1' then
  detach(id, 'running', q, rec.order)
  finish(id, 'cancelled', now, ttl)
  return {C_OK, notices}
end
-- Attempts handed back by a draining worker (release.lua) are not charged.
local charged = tonumber(rec.attempts) - (tonumber(rec.released) or 0)
if ARGV[6] == '1' and charged <= maxr then
  detach(id, 'running', q, rec.order)
  kcall('ZADD', DELAYED, now + tonumber(ARGV[7]), id)
  redis.call('HSET', k, 'status', 'retrying')
  incr(countskey(q), 'retried', 1)
  return {C_RETRY_SCHEDULED, notices}
end
dead_letter(id, 'running', q, rec.order, ARGV[5], now, dead_ttl)
return {C_DEAD_LETTERED, notices}
