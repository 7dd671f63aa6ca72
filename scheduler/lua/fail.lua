--[[
  fail: record a failed attempt; retry it after a backoff, or dead-letter it once out of retries.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a finished (dead or cancelled) record
  ARGV[3]  job id
  ARGV[4]  lease token
  ARGV[5]  error JSON ({type, message, traceback})
  ARGV[6]  '1' if the error may succeed on retry, '0' to dead-letter at once
  ARGV[7]  backoff in ms before the retry (the caller adds the jitter)
  Returns  C_RETRY_SCHEDULED  back in the delayed set, status retrying
           C_DEAD_LETTERED    out of retries (or not retryable): status dead
           C_OK               the job was cancelled while it ran: status cancelled
           C_STALE_LEASE, C_ALREADY_FINISHED, C_NOT_FOUND as for complete
]]
-- @include _common.lua

local now, ttl, id, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local k = jobkey(id)
local f = redis.call('HMGET', k, 'status', 'attempts', 'queue', 'order', 'maxr', 'cancel', 'released')
local refused = lease_refusal(f[1], f[2], token)
if refused then return refused end
redis.call('HSET', k, 'error', ARGV[5])
redis.call('HINCRBY', countskey(f[3]), 'failed', 1)
if f[6] == '1' then
  detach(id, f[1], f[3], f[4])
  finish(id, 'cancelled', now, ttl)
  return C_OK
end
-- Attempts handed back by a draining worker (release.lua) are not charged.
local charged = tonumber(f[2]) - (tonumber(f[7]) or 0)
if ARGV[6] == '1' and charged <= (tonumber(f[5]) or 0) then
  detach(id, f[1], f[3], f[4])
  redis.call('ZADD', DELAYED, now + tonumber(ARGV[7]), id)
  redis.call('HSET', k, 'status', 'retrying')
  return C_RETRY_SCHEDULED
end
dead_letter(id, f[1], f[3], f[4], ARGV[5], now, ttl)
return C_DEAD_LETTERED
