--[[
  watch: register a client as waiting for jobs' results and report their statuses, in one step:
  a completion after this call always reaches the client's inbox, and one before it shows as a
  finished status.

  KEYS[1]  namespace prefix
  ARGV[1]  client id (its inbox is prefix .. 'inbox:' .. client id)
  ARGV[2]  TTL in ms of the registration (a bound on how long a job may stay unfinished and
           still wake this client; also the TTL of a key moved aside)
  ARGV[3]  now_ms
  ARGV[4]  '1': register nothing when a job is unfinished and no router serves the namespace
           (see _served.lua), '0': don't check
  ARGV[5]  number of jobs N, then N job ids
  Returns  {reply, notices}: reply is C_OK then one status per job, false where there is no such
           job; or C_NO_SERVICE then the statuses when refused for want of a router (nothing
           registered). A record that cannot be read is not registered, and has instead of its
           status '!' and the reason (the key is not a hash; the status is missing or not a
           status): the caller dead-letters it. A waiters key of the wrong type is moved aside
           first (notices, see _common.lua).
]]
-- @include _common.lua
-- @include _served.lua

local client, ttl = ARGV[1], tonumber(ARGV[2])
NOW, DEAD_TTL = tonumber(ARGV[3]), ttl
local n = tonumber(ARGV[5])
local out = {C_OK}
local unfinished = false
for i = 1, n do
  local k = jobkey(ARGV[5 + i])
  local status = redis.pcall('HGET', k, 'status')
  if type(status) == 'table' and status.err then
    status = '!job record is a ' .. redis.call('TYPE', k)['ok'] .. ', not a hash'
  elseif status and not STATUSES[status] then
    status = "!job record has an unknown status '" .. printable(status) .. "'"
  elseif not status and redis.call('EXISTS', k) == 1 then
    status = '!job record has no status'
  elseif status and not FINISHED[status] then
    unfinished = true
  end
  out[i + 1] = status
end
if unfinished and ARGV[4] == '1' and not router_served() then
  out[1] = C_NO_SERVICE
  return {out, notices}
end
for i = 1, n do
  local id, status = ARGV[5 + i], out[i + 1]
  if status and not FINISHED[status] and string.sub(status, 1, 1) ~= '!' then
    redis.call('HSET', jobkey(id), 'w', '1')
    kcall('SADD', waiterskey(id), client)
    redis.call('PEXPIRE', waiterskey(id), ttl)
  end
end
return {out, notices}
