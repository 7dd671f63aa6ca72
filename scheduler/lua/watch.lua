--[[
  watch: register a client as waiting for jobs' results and report their statuses, in one step:
  a completion after this call always reaches the client's inbox, and one before it shows as a
  finished status.

  KEYS[1]  namespace prefix
  ARGV[1]  client id (its inbox is prefix .. 'inbox:' .. client id)
  ARGV[2]  TTL in ms of the registration (a bound on how long a job may stay unfinished and
           still wake this client)
  ARGV[3]  number of jobs N, then N job ids
  Returns  one status per job, false where there is no such job
]]
-- @include _common.lua

local client, ttl, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, n do
  local id = ARGV[3 + i]
  local k = jobkey(id)
  local status = redis.call('HGET', k, 'status')
  if status and not FINISHED[status] then
    redis.call('HSET', k, 'w', '1')
    redis.call('SADD', waiterskey(id), client)
    redis.call('PEXPIRE', waiterskey(id), ttl)
  end
  out[i] = status
end
return out
