--[[
  watch: register a client as waiting for a job's result and report the job's status, in one step:
  a completion after this call always reaches the client's inbox, and one before it shows as a
  finished status.

  KEYS[1]  namespace prefix
  ARGV[1]  job id
  ARGV[2]  client id (its inbox is prefix .. 'inbox:' .. client id)
  ARGV[3]  TTL in ms of the registration (a bound on how long a job may stay unfinished and
           still wake this client)
  Returns  the job's status, or false when there is no such job
]]
-- @include _common.lua

local k = jobkey(ARGV[1])
local status = redis.call('HGET', k, 'status')
if status and not FINISHED[status] then
  redis.call('HSET', k, 'w', '1')
  redis.call('SADD', waiterskey(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', waiterskey(ARGV[1]), tonumber(ARGV[3]))
end
return status
