--[[
  lease: take up to N jobs from the head of a queue for one worker, with a lease deadline.

  KEYS[1]  namespace prefix
  ARGV[1]  queue name
  ARGV[2]  now_ms
  ARGV[3]  lease length in ms (the worker renews it by heartbeat)
  ARGV[4]  N, the most jobs to lease
  ARGV[5]  TTL in ms of a dead-lettered record (and of a key moved aside)
  Returns  {leases, notices}: leases is a flat array, 3 entries per leased job: id, lease token
           (the attempt number), spec JSON. notices: what was settled (see _common.lua).
  Settled  a popped member that names no job (its id part, after the order), or whose job is gone
           or really elsewhere: dropped;
           a job key that is not a hash: moved aside, the job dead-lettered in a fresh record; a
           record with a missing or garbled status, queue, order, spec, attempts, started_ms or
           maxr (everything its later transitions need), or whose status puts it somewhere it is
           not: dead-lettered (CorruptJob, with the reason). None of these is returned, and the
           lease goes on past them (up to N members are popped in all). A queue, age, lease-set or
           signal key of the wrong type is moved aside first: its jobs are then not served from
           it, and the notice says so.
  Events   when jobs remain after this lease, one token on the queue's signal list, so the next
           idle worker wakes too; the finish notice of every job dead-lettered here.
]]
-- @include _common.lua

local q, now, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
NOW, DEAD_TTL = now, tonumber(ARGV[5])
-- All scores are 0, so the lowest-scored members are the lexicographically first: the head.
local popped = kcall('ZPOPMIN', qkey(q), n)
if #popped == 0 then
  -- An idle worker blocks on the signal list right after a lease that found nothing.
  kcall('LLEN', qsignalkey(q))
  return {{}, notices}
end
local out, ids, leased = {}, {}, {}
-- A job's second member in one batch is stale (its lease is not in the lease set yet).
local taken = {}
local until_ms = now + lease_ms
local names = {'status', 'queue', 'order', 'spec', 'started_ms', 'attempts', 'maxr'}
for i = 1, #popped, 2 do
  local member = popped[i]
  local id = string.sub(member, ORDER_HEAD + 1)
  local rec = nil
  if taken[id] then
    notice('dropped', qkey(q), member .. ': a second member of a job leased now')
  else
    ids[#ids + 1] = id
    -- Popped already: settling it has nothing left to remove from the queue itself. A member
    -- with a garbled order part still names its job: the record (its own order) decides.
    rec = judge(id, qkey(q), 'queued', q, names)
  end
  if rec then
    taken[id] = true
    local k = jobkey(id)
    local token = (tonumber(rec.attempts) or 0) + 1
    if rec.started_ms then
      redis.call('HSET', k, 'status', 'running', 'attempts', token)
    else
      redis.call('HSET', k, 'status', 'running', 'attempts', token, 'started_ms', now)
    end
    leased[#leased + 1] = until_ms
    leased[#leased + 1] = id
    out[#out + 1] = id
    out[#out + 1] = token
    out[#out + 1] = rec.spec
  end
end
if #ids > 0 then kcall_chunked('ZREM', qagekey(q), ids) end
if #leased > 0 then kcall_chunked('ZADD', leasedkey(q), leased) end
if redis.call('ZCARD', qkey(q)) > 0 then signal_queue(q) end
return {out, notices}
