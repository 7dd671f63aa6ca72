--[[
  results: status, result and error of many jobs in one call (read only).

  KEYS[1]  namespace prefix
  ARGV     job ids
  Returns  a flat array, 3 entries per job: status, result JSON, error JSON (false when absent;
           status false when there is no such job)
]]
-- @include _common.lua

local out = {}
for i = 1, #ARGV do
  local f = redis.call('HMGET', jobkey(ARGV[i]), 'status', 'result', 'error')
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
  out[#out + 1] = f[3]
end
return out
