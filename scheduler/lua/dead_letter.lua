--[[
  dead_letter: send jobs straight to the dead-letter set with a reason, from any unfinished state.
  Used for jobs no queue accepts and for records a reader found corrupt.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the dead record
  ARGV[3]  number of jobs N, then 2 values per job: id, error JSON
  Returns  one code per job: C_DEAD_LETTERED, C_ALREADY_FINISHED or C_NOT_FOUND
]]
-- @include _common.lua

local now, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 0, n - 1 do
  local id, reason = ARGV[4 + i * 2], ARGV[5 + i * 2]
  local k = jobkey(id)
  if redis.call('EXISTS', k) == 0 then
    out[#out + 1] = C_NOT_FOUND
  else
    local f = redis.call('HMGET', k, 'status', 'queue', 'order')
    if f[1] and FINISHED[f[1]] then
      out[#out + 1] = C_ALREADY_FINISHED
    else
      -- A record without a status is corrupt: it may sit in the ingress or in its queue.
      if not f[1] then
        redis.call('ZREM', INGRESS, id)
        if f[2] and f[3] then redis.call('ZREM', qkey(f[2]), f[3]) end
        if f[2] then redis.call('ZREM', qagekey(f[2]), id) end
        redis.call('ZREM', DELAYED, id)
      end
      local q = f[2] or false
      if f[1] == 'pending' then q = false end
      dead_letter(id, f[1] or 'unknown', q, f[3], reason, now, ttl)
      out[#out + 1] = C_DEAD_LETTERED
    end
  end
end
return out
