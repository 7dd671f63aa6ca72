--[[
  promote: move delayed and retrying jobs whose due time has come into their queues.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  at most this many jobs
  Returns  the number of jobs promoted
  Events   one token on the signal list of every queue that got a job.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local touched = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', DELAYED, id)
  local f = redis.call('HMGET', jobkey(id), 'queue', 'order')
  if f[1] and f[2] then
    local q = f[1]
    push_queued(id, q, now, f[2])
    touched[q] = true
  end
end
for q, _ in pairs(touched) do signal_queue(q) end
return #ids
