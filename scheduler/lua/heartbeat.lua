--[[
  heartbeat: extend the leases of running jobs, and tell the worker which were cancelled.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  lease length in ms from now
  ARGV[3]  number of jobs N, then 2 values per job: id, lease token
  Returns  one code per job
           C_OK                lease extended
           C_CANCEL_REQUESTED  lease extended, but the job was cancelled: stop it and report
           C_STALE_LEASE       this lease is no longer the job's current one: stop, do not report
           C_ALREADY_FINISHED  the job finished already
           C_NOT_FOUND         no such job
]]
-- @include _common.lua

local now, lease_ms, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 0, n - 1 do
  local id, token = ARGV[4 + i * 2], tonumber(ARGV[5 + i * 2])
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'attempts', 'cancel', 'queue')
  local refused = lease_refusal(f[1], f[2], token)
  if refused then
    out[#out + 1] = refused
  else
    local until_ms = now + lease_ms
    redis.call('ZADD', leasedkey(f[4]), until_ms, id)
    if f[3] == '1' then out[#out + 1] = C_CANCEL_REQUESTED else out[#out + 1] = C_OK end
  end
end
return out
