--[[
  move: move queued (or delayed) jobs to another queue, keeping their order keys.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  destination queue
  ARGV[3]  TTL in ms of a record dead-lettered as corrupt (and of a key moved aside)
  ARGV[4]  number of jobs N, then N job ids
  Returns  {codes, notices}: one code per job: C_OK, C_WRONG_STATE (not waiting), C_NOT_FOUND, or
           C_CORRUPT (the record is not a hash, or its status, queue or order is missing or
           garbled: dead-lettered, CorruptJob, instead). notices: see _common.lua.
  Events   one token on the destination's signal list when a job arrived there.
]]
-- @include _common.lua

local now, dest = tonumber(ARGV[1]), ARGV[2]
NOW, DEAD_TTL = now, tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local out = {}
local moved = false
kcall('SADD', QUEUES, dest)
for i = 1, n do
  local id = ARGV[4 + i]
  local rec, t = read_job(id, {'status', 'queue', 'order'})
  if rec == nil then
    out[#out + 1] = C_NOT_FOUND
  elseif rec == false then
    corrupt_key(id, t, false)
    out[#out + 1] = C_CORRUPT
  else
    local why = flaw(id, rec)
    if why then
      corrupt(id, rec, false, why)
      out[#out + 1] = C_CORRUPT
    elseif rec.status == 'queued' then
      detach(id, 'queued', rec.queue, rec.order)
      push_queued(id, dest, now, rec.order)
      moved = true
      out[#out + 1] = C_OK
    elseif rec.status == 'delayed' or rec.status == 'retrying' then
      redis.call('HSET', jobkey(id), 'queue', dest)
      out[#out + 1] = C_OK
    else
      out[#out + 1] = C_WRONG_STATE
    end
  end
end
if moved then signal_queue(dest) end
return {out, notices}
