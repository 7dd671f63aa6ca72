--[[
  watch: register a client as waiting for jobs' results and report their statuses, in one step:
  a completion after this call always reaches the client's inbox, and one before it shows as a
  finished status.

  KEYS[1]  namespace prefix
  ARGV[1]  client id (its inbox is prefix .. 'inbox:' .. client id)
  ARGV[2]  TTL in ms of the registration (a bound on how long a job may stay unfinished and
           still wake this client)
  ARGV[3]  '1': register nothing when a job is unfinished and no router serves the namespace
           (see _served.lua), '0': don't check
  ARGV[4]  number of jobs N, then N job ids
  Returns  C_OK, then one status per job (false where there is no such job); or C_NO_SERVICE,
           then the statuses, when refused for want of a router (nothing registered)
]]
-- @include _common.lua
-- @include _served.lua

local client, ttl, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local out = {C_OK}
local unfinished = false
for i = 1, n do
  local status = redis.call('HGET', jobkey(ARGV[4 + i]), 'status')
  unfinished = unfinished or (status and not FINISHED[status])
  out[i + 1] = status
end
if unfinished and ARGV[3] == '1' and not router_served() then
  out[1] = C_NO_SERVICE
  return out
end
for i = 1, n do
  local id, status = ARGV[4 + i], out[i + 1]
  if status and not FINISHED[status] then
    redis.call('HSET', jobkey(id), 'w', '1')
    redis.call('SADD', waiterskey(id), client)
    redis.call('PEXPIRE', waiterskey(id), ttl)
  end
end
return out
