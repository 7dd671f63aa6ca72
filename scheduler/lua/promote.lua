--[[
  promote: move delayed and retrying jobs whose due time has come into their queues.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  at most this many jobs
  ARGV[3]  TTL in ms of a record dead-lettered as corrupt (and of a key moved aside)
  Returns  {the number of jobs promoted, notices}; notices: what was settled (see _common.lua).
  Settled  an entry whose job is gone or really elsewhere, or that names no job: dropped; a job key
           that is not a hash: moved aside, the job dead-lettered in a fresh record; a record with
           a missing or garbled status, queue or order, or whose status puts it somewhere it is
           not: dead-lettered (CorruptJob, with the reason). A delayed, queue or signal key of the
           wrong type is moved aside first.
  Events   one token on the signal list of every queue that got a job; the finish notice of every
           job dead-lettered here.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[3])
local ids = kcall('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local touched = {}
local promoted = 0
local names = {'status', 'queue', 'order'}
for _, id in ipairs(ids) do
  redis.call('ZREM', DELAYED, id)
  local rec = judge(id, DELAYED, 'delayed', false, names)
  if rec then
    push_queued(id, rec.queue, now, rec.order)
    touched[rec.queue] = true
    promoted = promoted + 1
  end
end
for q, _ in pairs(touched) do signal_queue(q) end
return {promoted, notices}
