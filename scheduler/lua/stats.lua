--[[
  stats: per-queue depth, oldest wait, in flight and dead; plus ingress and delayed totals, and
  what readers found corrupt. Also drops dead-letter entries whose records have expired.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  dead-letter retention in ms (also the TTL of a key moved aside)
  ARGV[3]  number of queues N, then N names (N = 0: every known queue)
  Returns  {{ingress depth, delayed count, corrupt records dead-lettered, keys moved aside, the
             ingress's jobs per tenant (a flat array of tenant, count), then
             10 values per queue: name, depth, oldest wait ms, in flight, dead, the running
             totals of jobs enqueued, completed and failed attempts, and of jobs refused by
             admission control, and its queued jobs per tenant (a flat array of tenant, count;
             tenant '' for jobs without one)}, notices}
           A counter that is not a whole number reads as 0. Any key of the wrong type is moved
           aside (and reads as empty); a member of the queue set that is not a queue name is
           dropped from it; notices say so (see _common.lua).
]]
-- @include _common.lua

local now, keep_ms, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
NOW, DEAD_TTL = now, keep_ms
local names = {}
if n == 0 then
  for _, q in ipairs(kcall('SMEMBERS', QUEUES)) do
    if is_queue_name(q) then
      names[#names + 1] = q
    else
      redis.call('SREM', QUEUES, q)
      notice('dropped', QUEUES, q .. ': not a queue name')
    end
  end
  table.sort(names)
else
  for i = 1, n do
    if is_queue_name(ARGV[3 + i]) then names[#names + 1] = ARGV[3 + i] end
  end
end

-- Counters are read, never trusted: fifteen digits is far beyond any real total.
local function count(v)
  if is_uint(v) and #v <= 15 then return tonumber(v) end
  return 0
end
local function card(key) return kcall('ZCARD', key) end

local out = {card(INGRESS), card(DELAYED)}
local corrupt_totals = kcall('HMGET', CORRUPT_TOTALS, 'records', 'keys')
out[3] = count(corrupt_totals[1])
out[4] = count(corrupt_totals[2])
out[5] = kcall('HGETALL', tenantskey(INGRESS_QUEUE))
for _, q in ipairs(names) do
  kcall('ZREMRANGEBYSCORE', deadkey(q), '-inf', now - keep_ms)
  local oldest = kcall('ZRANGE', qagekey(q), 0, 0, 'WITHSCORES')
  local wait = 0
  local since = tonumber(oldest[2])
  -- A score of +-inf (never written by the scripts) must not become a wait.
  if since and since > -math.huge and since < math.huge then wait = math.max(0, now - since) end
  out[#out + 1] = q
  out[#out + 1] = card(qkey(q))
  out[#out + 1] = wait
  out[#out + 1] = card(leasedkey(q))
  out[#out + 1] = card(deadkey(q))
  local totals = kcall('HMGET', countskey(q), 'enqueued', 'completed', 'failed', 'rejected')
  out[#out + 1] = count(totals[1])
  out[#out + 1] = count(totals[2])
  out[#out + 1] = count(totals[3])
  out[#out + 1] = count(totals[4])
  out[#out + 1] = kcall('HGETALL', tenantskey(q))
end
return {out, notices}
