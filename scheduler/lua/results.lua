--[[
  results: status, result and error of many jobs in one call (read only).

  KEYS[1]  namespace prefix
  ARGV     job ids
  Returns  a flat array, 3 entries per job: status, result JSON, error JSON (false when absent;
           status false when there is no such job). A record that cannot be read has instead of
           its status '!' and the reason (the key is not a hash; the status is missing or not a
           status), and false for the rest; the caller dead-letters it.
]]
-- @include _common.lua

local out = {}
for i = 1, #ARGV do
  local k = jobkey(ARGV[i])
  local f = redis.pcall('HMGET', k, 'status', 'result', 'error')
  if f.err then
    out[#out + 1] = '!job record is a ' .. redis.call('TYPE', k)['ok'] .. ', not a hash'
    out[#out + 1] = false
    out[#out + 1] = false
  else
    local status = f[1]
    if status and not STATUSES[status] then
      status = "!job record has an unknown status '" .. printable(status) .. "'"
    elseif not status and redis.call('EXISTS', k) == 1 then
      status = '!job record has no status'
    end
    out[#out + 1] = status
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
  end
end
return out
