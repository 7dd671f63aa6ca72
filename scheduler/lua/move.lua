--[[
  move: move queued (or delayed) jobs to another queue, keeping their order keys.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  destination queue
  ARGV[3]  number of jobs N, then N job ids
  Returns  one code per job: C_OK, C_WRONG_STATE (not waiting) or C_NOT_FOUND
  Events   one token on the destination's signal list when a job arrived there.
]]
-- @include _common.lua

local now, dest, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local out = {}
local moved = false
redis.call('SADD', QUEUES, dest)
for i = 1, n do
  local id = ARGV[3 + i]
  local f = redis.call('HMGET', jobkey(id), 'status', 'queue', 'order')
  if not f[1] then
    out[#out + 1] = C_NOT_FOUND
  elseif f[1] == 'queued' then
    detach(id, 'queued', f[2], f[3])
    push_queued(id, dest, now, f[3])
    moved = true
    out[#out + 1] = C_OK
  elseif f[1] == 'delayed' or f[1] == 'retrying' then
    redis.call('HSET', jobkey(id), 'queue', dest)
    out[#out + 1] = C_OK
  else
    out[#out + 1] = C_WRONG_STATE
  end
end
if moved then signal_queue(dest) end
return out
