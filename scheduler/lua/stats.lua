--[[
  stats: per-queue depth, oldest wait, in flight and dead; plus ingress and delayed totals.
  Also drops dead-letter entries whose records have expired.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  dead-letter retention in ms
  ARGV[3]  number of queues N, then N names (N = 0: every known queue)
  Returns  {ingress depth, delayed count, then 8 values per queue:
            name, depth, oldest wait ms, in flight, dead, and the running totals of jobs
            enqueued, completed and failed attempts}
]]
-- @include _common.lua

local now, keep_ms, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local names = {}
if n == 0 then
  names = redis.call('SMEMBERS', QUEUES)
  table.sort(names)
else
  for i = 1, n do names[i] = ARGV[3 + i] end
end
local out = {redis.call('ZCARD', INGRESS), redis.call('ZCARD', DELAYED)}
for _, q in ipairs(names) do
  redis.call('ZREMRANGEBYSCORE', deadkey(q), '-inf', now - keep_ms)
  local oldest = redis.call('ZRANGE', qagekey(q), 0, 0, 'WITHSCORES')
  local wait = 0
  if oldest[2] then wait = math.max(0, now - tonumber(oldest[2])) end
  out[#out + 1] = q
  out[#out + 1] = redis.call('ZCARD', qkey(q))
  out[#out + 1] = wait
  out[#out + 1] = redis.call('ZCARD', leasedkey(q))
  out[#out + 1] = redis.call('ZCARD', deadkey(q))
  local totals = redis.call('HMGET', countskey(q), 'enqueued', 'completed', 'failed')
  out[#out + 1] = tonumber(totals[1]) or 0
  out[#out + 1] = tonumber(totals[2]) or 0
  out[#out + 1] = tonumber(totals[3]) or 0
end
return out
