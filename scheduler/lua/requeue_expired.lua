--[[
  requeue_expired: put jobs whose lease ran out (their worker died or stalled) back in their queue.
  A lease that expires counts as an attempt: a job that kills its workers ends in the dead-letter
  set after max_retries instead of looping. A cancelled job is finished as cancelled instead.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  at most this many jobs per queue
  ARGV[3]  TTL in ms of a finished record (and of a key moved aside)
  ARGV[4]  optional: TTL in ms of a dead-lettered record and of a key moved aside (absent: ARGV[3])
  ARGV[5]  optional: recording cap (see record in _common.lua; absent or 0: do not record); a
           job dead-lettered or cancelled here is recorded without a run time
  Returns  {{requeued, dead-lettered, cancelled, corrupt}, notices}; notices: what was settled
           (see _common.lua).
  Settled  an entry whose job is gone or really elsewhere, or that names no job: dropped; a job key
           that is not a hash: moved aside, the job dead-lettered in a fresh record; a record with
           a missing or garbled status, queue, order, attempts, maxr or released, or whose status
           puts it somewhere it is not: dead-lettered (CorruptJob, with the reason), counted as
           corrupt. A member of the queue set that is not a queue name is dropped from it; a
           queue-set, lease-set, queue or signal key of the wrong type is moved aside first.
  History  one 'lease_expired' entry (the attempt) appended to each requeued or dead-lettered
           job's history.
  Events   one token on the signal list of every queue that got a job back; the finish notice of
           every job finished here.
]]
-- @include _common.lua

local now, limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dead_ttl = tonumber(ARGV[4]) or ttl
NOW, DEAD_TTL = now, dead_ttl
RECORD_LEN = tonumber(ARGV[5]) or 0
local requeued, dead, cancelled, bad = 0, 0, 0, 0
local names = {'status', 'queue', 'order', 'attempts', 'maxr', 'cancel', 'released'}
for _, q in ipairs(kcall('SMEMBERS', QUEUES)) do
  if not is_queue_name(q) then
    redis.call('SREM', QUEUES, q)
    notice('dropped', QUEUES, q .. ': not a queue name')
  else
    local lk = leasedkey(q)
    local ids = kcall('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, limit)
    local back = false
    for _, id in ipairs(ids) do
      local rec, settled = judge(id, lk, 'running', q, names)
      if not rec then
        redis.call('ZREM', lk, id)
        if settled == 'dead' then bad = bad + 1 end
      elseif rec.cancel == '1' then
        detach(id, 'running', q, rec.order)
        finish(id, 'cancelled', now, ttl)
        cancelled = cancelled + 1
      elseif tonumber(rec.attempts) - (tonumber(rec.released) or 0) > tonumber(rec.maxr) then
        add_history(id, history_entry('lease_expired', tonumber(rec.attempts), {}))
        dead_letter(id, 'running', q, rec.order,
                    error_json('LeaseExpired', 'lease expired on attempt ' .. rec.attempts ..
                               ', no retries left'), now, dead_ttl)
        dead = dead + 1
      else
        redis.call('ZREM', lk, id)
        end_lease(id, false)
        add_history(id, history_entry('lease_expired', tonumber(rec.attempts), {}))
        push_queued(id, q, now, rec.order)
        requeued = requeued + 1
        back = true
      end
    end
    if back then signal_queue(q) end
  end
end
return {{requeued, dead, cancelled, bad}, notices}
