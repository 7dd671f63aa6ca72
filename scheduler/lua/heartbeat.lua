--[[
  heartbeat: extend the leases of running jobs, and tell the worker which were cancelled.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  lease length in ms from now
  ARGV[3]  TTL in ms of a record dead-lettered as corrupt (and of a key moved aside)
  ARGV[4]  number of jobs N, then 2 values per job: id, lease token
  Returns  {codes, notices}: one code per job
           C_OK                lease extended
           C_CANCEL_REQUESTED  lease extended, but the job was cancelled: stop it and report
           C_STALE_LEASE       this lease is no longer the job's current one: stop, do not report
           C_ALREADY_FINISHED  the job finished already
           C_NOT_FOUND         no such job
           C_CORRUPT           the record is not a hash, or its status, attempts or queue is
                               missing or garbled: dead-lettered (CorruptJob) instead; stop
           notices: what was settled (see _common.lua); a lease set of the wrong type is moved
           aside first.
  Events   the finish notice of every job dead-lettered here.
]]
-- @include _common.lua

local now, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
NOW, DEAD_TTL = now, tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local out = {}
local names = {'status', 'attempts', 'cancel', 'queue'}
local accept = {running = true}
for i = 0, n - 1 do
  local id, token = ARGV[5 + i * 2], tonumber(ARGV[6 + i * 2])
  local rec, refused = reported(id, names, token, accept)
  if not rec then
    out[#out + 1] = refused
  else
    kcall('ZADD', leasedkey(rec.queue), now + lease_ms, id)
    if rec.cancel == '1' then out[#out + 1] = C_CANCEL_REQUESTED else out[#out + 1] = C_OK end
  end
end
return {out, notices}
