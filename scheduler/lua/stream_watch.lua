--[[
  stream_watch: a reader of a job's stream says it waits, and learns the job's status, in one step:
  the job finishing after this call ends its stream with a terminal entry even if it never
  streamed (finish in _common.lua), and one that finished before shows as a finished status.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a key moved aside
  ARGV[3]  '1': mark nothing when the job is unfinished and no router serves the namespace (see
           _served.lua), '0': don't check
  ARGV[4]  job id
  Returns  {reply, notices}: reply is {C_OK, status}, status false when there is no such job; or
           {C_NO_SERVICE, status} when refused for want of a router (nothing marked). A record
           that cannot be read is not marked, and has instead of its status '!' and the reason
           (the key is not a hash; the status is missing or not a status): the caller
           dead-letters it.
  Record   'sw' = '1' on an unfinished job.
]]
-- @include _common.lua
-- @include _served.lua

NOW, DEAD_TTL = tonumber(ARGV[1]), tonumber(ARGV[2])
local id = ARGV[4]
local k = jobkey(id)
local status = redis.pcall('HGET', k, 'status')
if type(status) == 'table' and status.err then
  return {{C_OK, '!job record is a ' .. redis.call('TYPE', k)['ok'] .. ', not a hash'}, notices}
elseif status and not STATUSES[status] then
  return {{C_OK, "!job record has an unknown status '" .. printable(status) .. "'"}, notices}
elseif not status then
  if redis.call('EXISTS', k) == 1 then return {{C_OK, '!job record has no status'}, notices} end
  return {{C_OK, false}, notices}
end
if not FINISHED[status] then
  if ARGV[3] == '1' and not router_served() then return {{C_NO_SERVICE, status}, notices} end
  redis.call('HSET', k, 'sw', '1')
end
return {{C_OK, status}, notices}
