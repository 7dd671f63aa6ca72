--[[
  enqueue: move routed jobs from the ingress into their task queues (level 1's decision).

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  number of jobs N, then 2 values per job: id, queue name
  Returns  one code per job
           C_OK            queued
           C_DELAYED       held in the delayed set until its due time
           C_NOT_FOUND     no such job
           C_WRONG_STATE   the job is not pending (already routed, or finished)
  Events   one token on the signal list of every queue that got a job.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local out = {}
local touched = {}
for i = 0, n - 1 do
  local id, q = ARGV[3 + i * 2], ARGV[4 + i * 2]
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'due_ms')
  if not f[1] then
    out[#out + 1] = C_NOT_FOUND
  elseif f[1] ~= 'pending' then
    out[#out + 1] = C_WRONG_STATE
  else
    redis.call('ZREM', INGRESS, id)
    redis.call('SADD', QUEUES, q)
    local due = tonumber(f[2]) or 0
    if due > now then
      redis.call('ZADD', DELAYED, due, id)
      redis.call('HSET', k, 'status', 'delayed', 'queue', q)
      out[#out + 1] = C_DELAYED
    else
      push_queued(id, q, now)
      touched[q] = true
      out[#out + 1] = C_OK
    end
  end
end
for q, _ in pairs(touched) do signal_queue(q) end
return out
