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
local routed = {}
-- Per queue: {order members (score 0 each), age entries} added with one ZADD each at the end.
local members, ages = {}, {}
for i = 0, n - 1 do
  local id, q = ARGV[3 + i * 2], ARGV[4 + i * 2]
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'due_ms', 'order')
  if not f[1] then
    out[#out + 1] = C_NOT_FOUND
  elseif f[1] ~= 'pending' then
    out[#out + 1] = C_WRONG_STATE
  else
    routed[#routed + 1] = id
    local due = tonumber(f[2]) or 0
    if due > now then
      redis.call('ZADD', DELAYED, due, id)
      redis.call('HSET', k, 'status', 'delayed', 'queue', q)
      out[#out + 1] = C_DELAYED
    else
      if not members[q] then members[q], ages[q] = {}, {} end
      local m, a = members[q], ages[q]
      m[#m + 1] = 0
      m[#m + 1] = f[3]
      a[#a + 1] = now
      a[#a + 1] = id
      redis.call('HSET', k, 'status', 'queued', 'queue', q)
      out[#out + 1] = C_OK
    end
  end
end
if #routed > 0 then call_chunked('ZREM', INGRESS, routed) end
local known = {}
for q, m in pairs(members) do
  call_chunked('ZADD', qkey(q), m)
  call_chunked('ZADD', qagekey(q), ages[q])
  redis.call('HINCRBY', countskey(q), 'enqueued', #ages[q] / 2)
  signal_queue(q)
end
-- Every queue a job was routed to is known, for expiry sweeps and stats.
for i = 0, n - 1 do
  local q = ARGV[4 + i * 2]
  if (out[i + 1] == C_OK or out[i + 1] == C_DELAYED) and not known[q] then
    known[q] = true
    redis.call('SADD', QUEUES, q)
  end
end
return out
