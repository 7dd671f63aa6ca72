--[[
  requeue_expired: put jobs whose lease ran out (their worker died or stalled) back in their queue.
  A lease that expires counts as an attempt: a job that kills its workers ends in the dead-letter
  set after max_retries instead of looping. A cancelled job is finished as cancelled instead.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  at most this many jobs per queue
  ARGV[3]  TTL in ms of a finished record
  Returns  {requeued, dead-lettered, cancelled}
  Events   one token on the signal list of every queue that got a job back.
]]
-- @include _common.lua

local now, limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local requeued, dead, cancelled = 0, 0, 0
for _, q in ipairs(redis.call('SMEMBERS', QUEUES)) do
  local ids = redis.call('ZRANGEBYSCORE', leasedkey(q), '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local k = jobkey(id)
    local f = redis.call('HMGET', k, 'status', 'attempts', 'maxr', 'cancel', 'order', 'released')
    if f[1] ~= 'running' then
      redis.call('ZREM', leasedkey(q), id)
    elseif f[4] == '1' then
      detach(id, 'running', q, f[5])
      finish(id, 'cancelled', now, ttl)
      cancelled = cancelled + 1
    elseif tonumber(f[2]) - (tonumber(f[6]) or 0) > (tonumber(f[3]) or 0) then
      dead_letter(id, 'running', q, f[5],
                  error_json('LeaseExpired', 'lease expired on attempt ' .. f[2] ..
                             ', no retries left'), now, ttl)
      dead = dead + 1
    else
      redis.call('ZREM', leasedkey(q), id)
      push_queued(id, q, now, f[5])
      requeued = requeued + 1
    end
  end
  if #ids > 0 then signal_queue(q) end
end
return {requeued, dead, cancelled}
