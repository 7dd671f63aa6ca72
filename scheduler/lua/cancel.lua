--[[
  cancel: cancel a job. A waiting job leaves its queue at once; a running one is flagged, and its
  worker learns of it on the next heartbeat, stops, and reports it through fail.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the finished record
  ARGV[3]  job id
  Returns  C_OK               cancelled now
           C_CANCEL_PENDING   running: flagged for its worker
           C_ALREADY_FINISHED the job finished before; nothing changed
           C_NOT_FOUND        no such job
]]
-- @include _common.lua

local now, ttl, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local k = jobkey(id)
local f = redis.call('HMGET', k, 'status', 'queue', 'order')
if not f[1] then return C_NOT_FOUND end
if FINISHED[f[1]] then return C_ALREADY_FINISHED end
redis.call('HSET', k, 'cancel', '1')
if f[1] == 'running' then return C_CANCEL_PENDING end
detach(id, f[1], f[2], f[3])
finish(id, 'cancelled', now, ttl)
return C_OK
