--[[
  peek: the oldest jobs of the ingress with what level 1 needs to route them (read only).

  KEYS[1]  namespace prefix
  ARGV[1]  at most this many jobs
  Returns  a flat array, 4 entries per job: id, routing view JSON (false if missing), created_ms,
           and the spec JSON only when the routing view is missing (else false), so the router
           never carries payloads it does not need
]]
-- @include _common.lua

local ids = redis.call('ZRANGE', INGRESS, 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', jobkey(id), 'rt', 'created_ms')
  out[#out + 1] = id
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
  if f[1] then
    out[#out + 1] = false
  else
    out[#out + 1] = redis.call('HGET', jobkey(id), 'spec')
  end
end
return out
