--[[
  cancel: cancel a job. A waiting job leaves its queue at once; a running one is flagged, and its
  worker learns of it on the next heartbeat, stops, and reports it through fail.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the finished record (and of a key moved aside)
  ARGV[3]  job id
  Returns  {code, notices}:
           C_OK               cancelled now
           C_CANCEL_PENDING   running: flagged for its worker
           C_ALREADY_FINISHED the job finished before; nothing changed
           C_NOT_FOUND        no such job
           C_CORRUPT          the record is not a hash, or its status, queue or order is missing
                              or garbled: dead-lettered (CorruptJob, with the reason) instead
           notices: what was settled (see _common.lua).
  Events   the finish notice when the job finished here.
]]
-- @include _common.lua

local now, ttl, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
NOW, DEAD_TTL = now, ttl
local rec, t = read_job(id, {'status', 'queue', 'order'})
if rec == nil then return {C_NOT_FOUND, notices} end
if rec == false then
  corrupt_key(id, t, false)
  return {C_CORRUPT, notices}
end
if rec.status and FINISHED[rec.status] then return {C_ALREADY_FINISHED, notices} end
local why = flaw(id, rec)
if why then
  corrupt(id, rec, false, why)
  return {C_CORRUPT, notices}
end
redis.call('HSET', jobkey(id), 'cancel', '1')
if rec.status == 'running' then return {C_CANCEL_PENDING, notices} end
detach(id, rec.status, rec.queue, rec.order)
finish(id, 'cancelled', now, ttl)
return {C_OK, notices}
