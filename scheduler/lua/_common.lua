--[[
  Shared fragment: included by every transition script (scheduler/scripts.py splices it in where a
  script says "-- @include _common.lua"); never run on its own.

  Every script gets KEYS[1] = the namespace prefix ("bilevel:{ns}:"). Per-job and per-queue keys are
  built from it here; they all carry the same hash tag, so they share one Redis Cluster slot.
  Return codes mirror scheduler.codes.Code.
]]
local prefix = KEYS[1]
local INGRESS = prefix .. 'ingress'
local DELAYED = prefix .. 'delayed'
local QUEUES = prefix .. 'queues'
local INGRESS_QUEUE = '~ingress'

local C_OK, C_DUPLICATE, C_NOT_FOUND, C_WRONG_STATE, C_STALE_LEASE = 0, 1, 2, 3, 4
local C_ALREADY_FINISHED, C_CANCEL_REQUESTED, C_RETRY_SCHEDULED = 5, 6, 7
local C_DEAD_LETTERED, C_CORRUPT, C_DELAYED, C_CANCEL_PENDING = 8, 9, 10, 11
local C_NO_SERVICE = 12

-- Queue order members are "<4 digits 9999-priority><15 digits deadline ms><15 digits seq>:<id>",
-- made once at submit: equal scores make a sorted set order them as strings, that is by priority,
-- then deadline, then arrival, and ZPOPMIN takes the head.
local ORDER_HEAD = 35
local NO_DEADLINE = 999999999999999

-- Lua's C stack limits unpack(); longer argument lists go in chunks (even, for score/member pairs).
local CHUNK = 7000
local function call_chunked(cmd, key, args)
  for i = 1, #args, CHUNK do
    redis.call(cmd, key, unpack(args, i, math.min(i + CHUNK - 1, #args)))
  end
end

local function jobkey(id) return prefix .. 'job:' .. id end
local function qkey(q) return prefix .. 'q:' .. q end
local function qagekey(q) return prefix .. 'qage:' .. q end
local function qsignalkey(q) return prefix .. 'qsig:' .. q end
local function leasedkey(q) return prefix .. 'leased:' .. q end
local function deadkey(q) return prefix .. 'dead:' .. q end
local function waiterskey(id) return prefix .. 'waiters:' .. id end
local function inboxkey(c) return prefix .. 'inbox:' .. c end
-- An inbox whose client stopped reading (it died) is dropped after this long.
local INBOX_TTL_MS = 600000
local INLINE_RESULT_BYTES = 8192
-- HASH of running totals per queue (enqueued, completed, failed): rates come from their deltas.
local function countskey(q) return prefix .. 'counts:' .. q end

local FINISHED = {succeeded = true, dead = true, cancelled = true}

-- Why a worker's report under lease `token` cannot be taken, as a code; nil when it can. `status`
-- and `attempts` are the job record's fields (false when the record is missing).
local function lease_refusal(status, attempts, token)
  if not status then return C_NOT_FOUND end
  if FINISHED[status] then return C_ALREADY_FINISHED end
  if status ~= 'running' or tonumber(attempts) ~= token then return C_STALE_LEASE end
  return nil
end

-- Wake one waiting worker of queue q (a list holding at most one token).
local function signal_queue(q)
  redis.call('LPUSH', qsignalkey(q), '1')
  redis.call('LTRIM', qsignalkey(q), 0, 0)
end

-- Put job id into queue q now, with its order member (made at submit).
local function push_queued(id, q, now, member)
  redis.call('ZADD', qkey(q), 0, member)
  redis.call('ZADD', qagekey(q), now, id)
  redis.call('HSET', jobkey(id), 'status', 'queued', 'queue', q)
end

-- Remove job id from whichever structure its status says it is in.
local function detach(id, status, q, member)
  if status == 'pending' then
    redis.call('ZREM', INGRESS, id)
  elseif status == 'queued' then
    if member then redis.call('ZREM', qkey(q), member) end
    redis.call('ZREM', qagekey(q), id)
  elseif status == 'delayed' or status == 'retrying' then
    redis.call('ZREM', DELAYED, id)
  elseif status == 'running' then
    redis.call('ZREM', leasedkey(q), id)
  end
end

-- Mark a job finished, start its record's TTL, and tell every client waiting on it (through its
-- inbox). `waiting` is the record's 'w' field, set by watch.lua: a job nobody waits for costs
-- nothing more.
local function finish(id, status, now, ttl_ms, waiting, result)
  local k = jobkey(id)
  if result then
    redis.call('HSET', k, 'status', status, 'finished_ms', now, 'result', result)
  else
    redis.call('HSET', k, 'status', status, 'finished_ms', now)
  end
  if ttl_ms > 0 then redis.call('PEXPIRE', k, ttl_ms) end
  if waiting == nil then waiting = redis.call('HGET', k, 'w') end
  if waiting then
    -- A small result travels with the notice ("id\nstatus\nresult"), saving the waiter a read.
    local notice = id
    if result and #result <= INLINE_RESULT_BYTES then
      notice = id .. '\n' .. status .. '\n' .. result
    end
    for _, client in ipairs(redis.call('SMEMBERS', waiterskey(id))) do
      redis.call('RPUSH', inboxkey(client), notice)
      redis.call('PEXPIRE', inboxkey(client), INBOX_TTL_MS)
    end
    redis.call('DEL', waiterskey(id))
  end
end

-- Dead-letter a job that is currently in `status` (in queue q, or the ingress when q is false).
local function dead_letter(id, status, q, member, reason, now, ttl_ms)
  detach(id, status, q, member)
  local dq = q or INGRESS_QUEUE
  redis.call('ZADD', deadkey(dq), now, id)
  redis.call('HSET', jobkey(id), 'error', reason)
  finish(id, 'dead', now, ttl_ms)
end

-- A JSON error object built without cjson.encode's float quirks.
local function error_json(etype, message)
  return cjson.encode({type = etype, message = message})
end
