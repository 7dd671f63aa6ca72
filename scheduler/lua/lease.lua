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
-- All scores are 0, so the lowest-scored members are the lexicographically first: the head.
local popped = redis.call('ZPOPMIN', qkey(q), n)
if #popped == 0 then return {} end
local out, ids, leased = {}, {}, {}
local until_ms = now + lease_ms
for i = 1, #popped, 2 do
  local member = popped[i]
  local id = string.sub(member, ORDER_HEAD + 1)
  ids[#ids + 1] = id
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'spec', 'started_ms', 'attempts')
  if f[1] == 'queued' and f[2] then
    local token = (tonumber(f[4]) or 0) + 1
    if f[3] then
      redis.call('HSET', k, 'status', 'running', 'attempts', token)
    else
      redis.call('HSET', k, 'status', 'running', 'attempts', token, 'started_ms', now)
    end
    leased[#leased + 1] = until_ms
    leased[#leased + 1] = id
    out[#out + 1] = id
    out[#out + 1] = token
    out[#out + 1] = f[2]
  elseif f[1] == 'queued' or (not f[1] and redis.call('EXISTS', k) == 1) then
    -- Popped already, so detach has nothing left to remove from the queue itself.
    dead_letter(id, 'popped', q, false,
                error_json('CorruptJob', 'job record has no ' .. (f[1] and 'spec' or 'status')),
                now, dead_ttl)
  end
  -- Otherwise the member was stale (the record says the job is elsewhere): dropping it is right.
end
call_chunked('ZREM', qagekey(q), ids)
if #leased > 0 then call_chunked('ZADD', leasedkey(q), leased) end
if redis.call('ZCARD', qkey(q)) > 0 then signal_queue(q) end
return out
