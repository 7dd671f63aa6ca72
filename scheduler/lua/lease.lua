--[[
  lease: take up to N jobs from the head of a queue for one worker, with a lease deadline.

  KEYS[1]  namespace prefix
  ARGV[1]  queue name
  ARGV[2]  now_ms
  ARGV[3]  lease length in ms (the worker renews it by heartbeat)
  ARGV[4]  N, the most jobs to lease
  ARGV[5]  TTL in ms of a dead-lettered record
  Returns  a flat array, 3 entries per leased job: id, lease token (the attempt number), spec JSON.
           Records found corrupt on the way are dead-lettered (C_CORRUPT) and not returned.
  Events   when jobs remain after this lease, one token on the queue's signal list, so the next
           idle worker wakes too.
]]
-- @include _common.lua

local q, now, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local dead_ttl = tonumber(ARGV[5])
local members = redis.call('ZRANGE', qkey(q), 0, n - 1)
local out = {}
for _, member in ipairs(members) do
  local id = string.sub(member, ORDER_HEAD + 1)
  redis.call('ZREM', qkey(q), member)
  redis.call('ZREM', qagekey(q), id)
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'spec', 'started_ms')
  if f[1] == 'queued' then
    if not f[2] then
      dead_letter(id, 'queued', q, member, error_json('CorruptJob', 'job record has no spec'),
                  now, dead_ttl)
    else
      local token = redis.call('HINCRBY', k, 'attempts', 1)
      local until_ms = now + lease_ms
      redis.call('HSET', k, 'status', 'running', 'lease_until', until_ms)
      if not f[3] then redis.call('HSET', k, 'started_ms', now) end
      redis.call('ZADD', leasedkey(q), until_ms, id)
      out[#out + 1] = id
      out[#out + 1] = token
      out[#out + 1] = f[2]
    end
  elseif f[1] and not FINISHED[f[1]] then
    -- The record says it is elsewhere: a stale order member. Its true place holds it.
  elseif not f[1] and redis.call('EXISTS', k) == 1 then
    dead_letter(id, 'queued', q, member, error_json('CorruptJob', 'job record has no status'),
                now, dead_ttl)
  end
end
if redis.call('ZCARD', qkey(q)) > 0 then signal_queue(q) end
return out
