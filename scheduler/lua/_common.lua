--[[
  Shared fragment: included by every transition script (scheduler/scripts.py splices it in where a
  script says "-- @include _common.lua"); never run on its own.

  Every script gets KEYS[1] = the namespace prefix ("bilevel:{ns}:"). Per-job and per-queue keys are
  built from it here; they all carry the same hash tag, so they share one Redis Cluster slot.
  Return codes mirror scheduler.codes.Code.

  Corrupt data. A redis.call error aborts a script without undoing what it already wrote, so no
  script may meet one half way: a job's fields are judged before anything is written for it, and
  every command on a key that may hold the wrong type goes through kcall (a command that fails has
  no effect, so the key can be set aside and the command repeated). What each finds:
  - a key of the wrong Redis type (kcall): it is renamed aside to
    prefix .. 'corrupt:' .. now_ms .. ':' .. <its name after the prefix> (Keys.moved_aside), with the
    dead-letter TTL, counted (CORRUPT_TOTALS 'keys') and reported; nothing is deleted, so an operator
    can look at what was there, and serving goes on with the key empty;
  - a job record that is not a hash (read_job): moved aside the same way, and a dead record with the
    reason takes its place (corrupt_key), so the job still ends dead-lettered, visibly;
  - a record with a missing or garbled field its state needs (flaw), or that says it is somewhere it
    is not: dead-lettered as CorruptJob with a reason naming the field (corrupt);
  - an index entry whose job is gone, or is really elsewhere, or that names no job: dropped.
  What was found goes back to the caller as notices (scripts return {reply, notices}), to be logged.
]]
local prefix = KEYS[1]
local INGRESS = prefix .. 'ingress'
local DELAYED = prefix .. 'delayed'
local QUEUES = prefix .. 'queues'
local INGRESS_QUEUE = '~ingress'
-- HASH: how many job records readers found corrupt ('records') and keys they moved aside ('keys').
local CORRUPT_TOTALS = prefix .. 'corrupt:totals'

local C_OK, C_DUPLICATE, C_NOT_FOUND, C_WRONG_STATE, C_STALE_LEASE = 0, 1, 2, 3, 4
local C_ALREADY_FINISHED, C_CANCEL_REQUESTED, C_RETRY_SCHEDULED = 5, 6, 7
local C_DEAD_LETTERED, C_CORRUPT, C_DELAYED, C_CANCEL_PENDING = 8, 9, 10, 11
local C_NO_SERVICE, C_REJECTED = 12, 13

-- Queue order members are "<4 digits 9999-priority><15 digits deadline ms><15 digits seq>:<id>",
-- made once at submit: equal scores make a sorted set order them as strings, that is by priority,
-- then deadline, then arrival, and ZPOPMIN takes the head.
local ORDER_HEAD = 35
local NO_DEADLINE = 999999999999999

-- Set by each script from its ARGV before the helpers below run: the time, and the TTL of a record
-- dead-lettered as corrupt and of a key moved aside.
local NOW, DEAD_TTL = 0, 0

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
-- STREAM of a streaming job's chunks and its terminal entry (Keys.stream; stream_append.lua).
local function streamkey(id) return prefix .. 'stream:' .. id end
-- An inbox whose client stopped reading (it died) is dropped after this long.
local INBOX_TTL_MS = 600000
local INLINE_RESULT_BYTES = 8192
-- HASH of running totals per queue (enqueued, completed, failed): rates come from their deltas.
local function countskey(q) return prefix .. 'counts:' .. q end
-- HASH per queue of what its finished jobs took (Keys.timing): histogram buckets of completion
-- time 'j<i>' and queue wait 'w<i>', their sums in ms 'js' and 'ws', SLO outcomes 'sn' (judged)
-- and 'sm' (met), and the queue's SLO 'slo_ms' (written by the controller).
local function timingkey(q) return prefix .. 'timing:' .. q end
-- HASH of usage per tenant (Keys.tenant_usage): 'c:<tenant>' jobs succeeded, 's:<tenant>' ms leased.
local TENANT_USAGE = prefix .. 'tenant_usage'
-- Bucket upper bounds in ms; mirrors scheduler.keys.TIMING_BUCKETS_MS (one more bucket: +Inf).
local TIMING_BUCKETS_MS = {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                           300000}
-- HASH per queue (and the ingress, INGRESS_QUEUE): jobs waiting there per tenant (field: the
-- tenant, '' for jobs without one). Kept by membership: +1 when a job's order member is added to
-- the queue (or its id to the ingress), -1 when it is removed, so the allocator sees per-tenant
-- demand and submit reads a tenant's queued jobs in O(1). Fields that reach 0 are deleted.
local function tenantskey(q) return prefix .. 'tenants:' .. q end
-- HASH: the same per tenant over the ingress and every queue (what a tenant's cap counts).
local TENANTS_ALL = prefix .. 'tenants:~all'
-- HASH: leased jobs per tenant that has a quota (max in flight); see lease.lua and end_lease.
local INFLIGHT = prefix .. 'inflight'
-- HASH: admission caps and fair-share weights as the service publishes them (scheduler.admission
-- lists the fields); absent: only the default total cap applies (DEFAULT_MAX_QUEUED).
local ADMISSION = prefix .. 'admission'
-- HASH: each queue's recent drain rate (jobs/s, published by the controller every tick, with a TTL
-- so a stopped controller's rates vanish): the wait estimate's denominator.
local DRAIN = prefix .. 'drain'
-- HASH per queue: fair-share state, '~v' the queue's virtual time and, per tenant, the virtual
-- finish tag of its last queued job (policies.fairshare).
local function fairkey(q) return prefix .. 'fair:' .. q end
-- Mirrors scheduler.admission.DEFAULT_MAX_QUEUED: the total cap when nothing is published.
local DEFAULT_MAX_QUEUED = 1000000
-- LIST per queue of jobs that finished succeeded or cancelled, newest first (see index_finished).
local function donekey(q) return prefix .. 'done:' .. q end
-- Mirrors scheduler.keys.FINISHED_INDEX_LEN and FINISHED_TRIM_EVERY.
local DONE_CAP = 10000
local DONE_TRIM_EVERY = 64

local FINISHED = {succeeded = true, dead = true, cancelled = true}
local STATUSES = {
  pending = true, queued = true, delayed = true, retrying = true, running = true,
  succeeded = true, dead = true, cancelled = true,
}

-- -- what the caller is told -------------------------------------------------------------------

-- Text safe to hand back and to log: bytes outside printable ASCII escaped, long values cut.
local function printable(s)
  s = tostring(s)
  if #s > 120 then s = string.sub(s, 1, 120) .. '...' end
  return (string.gsub(s, '[^\32-\126]', function(c)
    return string.format('\\x%02x', string.byte(c))
  end))
end

-- Flat (kind, subject, detail) triples: 'moved_aside' (a key, what it was and where it went),
-- 'dead_lettered' (a job id, the reason), 'dropped' (an index key, the entry and why),
-- 'counter_reset' (a counter hash, the field and the error).
local notices = {}
local function notice(kind, subject, detail)
  notices[#notices + 1] = kind
  notices[#notices + 1] = printable(subject)
  notices[#notices + 1] = printable(detail)
end

-- A JSON error object built without cjson.encode's float quirks.
local function error_json(etype, message)
  return cjson.encode({type = etype, message = message})
end

-- -- keys of the wrong type ----------------------------------------------------------------------

local count_corrupt

-- Rename `key` (holding a `t` where bilevel keeps something else) aside; returns the new name.
local function move_aside(key, t)
  local base = prefix .. 'corrupt:' .. string.format('%d', NOW) .. ':'
    .. string.sub(key, #prefix + 1)
  local dest, i = base, 0
  while redis.call('EXISTS', dest) == 1 do
    i = i + 1
    dest = base .. '~' .. i
  end
  redis.call('RENAME', key, dest)
  if DEAD_TTL > 0 then redis.call('PEXPIRE', dest, DEAD_TTL) end
  count_corrupt('keys')
  notice('moved_aside', key, 'a ' .. t .. ', moved to ' .. dest)
  return dest
end

local function wrong_type(r)
  return type(r) == 'table' and r.err and string.sub(r.err, 1, 9) == 'WRONGTYPE'
end

-- redis.call of command `cmd` on `key` (its first argument), for a key that may hold the wrong
-- type: then it is moved aside and the command runs again on the now empty key. A command that
-- fails does nothing, so nothing is left half done; and on a sound key this costs no more than
-- redis.call. Any other error is raised as redis.call would.
local function kcall(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then
    if not wrong_type(r) then error(r) end
    move_aside(key, redis.call('TYPE', key)['ok'])
    return redis.call(cmd, key, ...)
  end
  return r
end

-- call_chunked through kcall.
local function kcall_chunked(cmd, key, args)
  for i = 1, #args, CHUNK do
    kcall(cmd, key, unpack(args, i, math.min(i + CHUNK - 1, #args)))
  end
end

-- HINCRBY that cannot fail: a field holding a non-integer restarts from `by`, with a notice.
local function incr(key, field, by)
  local r = redis.pcall('HINCRBY', key, field, by)
  if wrong_type(r) then
    move_aside(key, redis.call('TYPE', key)['ok'])
    r = redis.pcall('HINCRBY', key, field, by)
  end
  if type(r) == 'table' and r.err then
    notice('counter_reset', key, field .. ': ' .. r.err)
    redis.call('HSET', key, field, by)
  end
end

count_corrupt = function(field) incr(CORRUPT_TOTALS, field, 1) end

-- -- job records ---------------------------------------------------------------------------------

-- Job id's record as a table of the named fields (false where a field is missing; 'status' must
-- come first): nil when there is no record; false and the key's type when it is not a hash.
local function read_job(id, names)
  local k = jobkey(id)
  local f = redis.pcall('HMGET', k, unpack(names))
  if f.err then return false, redis.call('TYPE', k)['ok'] end
  local rec = {}
  for i, name in ipairs(names) do rec[name] = f[i] end
  if not rec.status and redis.call('EXISTS', k) == 0 then return nil end
  return rec
end

-- A decimal count or ms time as the scripts write them. (tonumber also takes ' 5', '0x10' and
-- '1e400': garbage here.) Thirty digits is far beyond any real value, and always finite.
local function is_uint(v)
  return v and #v <= 30 and string.find(v, '^%d+$') ~= nil
end
-- Mirrors scheduler.keys.validate_name.
local function is_queue_name(q)
  return q and #q <= 64 and string.find(q, '^[%w][%w_.%-]*$') ~= nil
end
-- Ids are printable ASCII without spaces (the client makes hex ids): anything else names no job.
local function is_id(id)
  return id and #id > 0 and #id <= 256 and not string.find(id, '[^\33-\126]')
end
-- "<34 digits>:<id>" (the digits run up to the first ':', so it is at ORDER_HEAD exactly), with
-- no allocation: this runs for every job a reader moves.
local function is_order(o, id)
  if not o or #o ~= ORDER_HEAD + #id then return false end
  local _, colon = string.find(o, '^%d+:')
  return colon == ORDER_HEAD and string.find(o, id, ORDER_HEAD + 1, true) == ORDER_HEAD + 1
end

-- Whole-number fields, and the states that need each (true: every unfinished state).
local UINT_FIELDS = {'attempts', 'maxr', 'released', 'due_ms', 'created_ms', 'started_ms'}
local NEEDED = {
  attempts = {running = true}, maxr = true, released = {}, due_ms = {pending = true},
  created_ms = true, started_ms = {},
}

local function needs(field, status)
  local n = NEEDED[field]
  return n == true or n[status] == true
end

-- Why record `rec` of job id cannot go on in its state, or nil. Only the fields read are judged
-- (nil: not read; false: read and missing); a finished record is only ever read for its outcome.
local function flaw(id, rec)
  local s = rec.status
  if not s then return 'job record has no status' end
  if not STATUSES[s] then return "job record has an unknown status '" .. printable(s) .. "'" end
  if FINISHED[s] then return nil end
  if rec.queue ~= nil and s ~= 'pending' and not is_queue_name(rec.queue) then
    if not rec.queue then return 'job record has no queue' end
    return "job record's queue '" .. printable(rec.queue) .. "' is not a queue name"
  end
  if rec.order ~= nil and not is_order(rec.order, id) then
    if not rec.order then return 'job record has no order' end
    return "job record's order '" .. printable(rec.order) .. "' is not an order of this job"
  end
  for _, name in ipairs(UINT_FIELDS) do
    local v = rec[name]
    if v then
      if not is_uint(v) then
        return "job record's " .. name .. " '" .. printable(v) .. "' is not a whole number"
      end
    elseif v == false and needs(name, s) then
      return 'job record has no ' .. name
    end
  end
  if rec.spec == false then return 'job record has no spec' end
  return nil
end

-- -- moving jobs ---------------------------------------------------------------------------------

-- Wake one waiting worker of queue q (a list holding at most one token).
local function signal_queue(q)
  kcall('LPUSH', qsignalkey(q), '1')
  redis.call('LTRIM', qsignalkey(q), 0, 0)
end

-- Count `by` jobs of tenant tn (its record's 'tn': '' for none; false: a record from before
-- tenants were counted, never counted) in or out of queue q's waiting jobs (q: a queue name or
-- INGRESS_QUEUE). A count never goes below 0 (a record lost to corruption leaves its count).
local function count_tenant(q, tn, by)
  if not tn or by == 0 then return end
  for _, k in ipairs({tenantskey(q), TENANTS_ALL}) do
    local r = redis.pcall('HINCRBY', k, tn, by)
    if type(r) ~= 'number' then
      incr(k, tn, by)
      r = tonumber(redis.call('HGET', k, tn)) or 0
    end
    if r <= 0 then redis.call('HDEL', k, tn) end
  end
end

-- Put job id into queue q now, with its order member (made at submit, or at routing when the
-- queue serves tenants by fair share).
local function push_queued(id, q, now, member)
  local added = kcall('ZADD', qkey(q), 0, member)
  kcall('ZADD', qagekey(q), now, id)
  redis.call('HSET', jobkey(id), 'status', 'queued', 'queue', q)
  if added == 1 then count_tenant(q, redis.call('HGET', jobkey(id), 'tn'), 1) end
end

-- ZREM of one member; returns how many were removed (0 or 1).
local function zrem(key, member) return kcall('ZREM', key, member) end

-- A running job's lease ends (finished, failed, expired or released): a tenant with a quota gets
-- its slot back (the record's 'qt', set by lease.lua, names the tenant counted), and the queue is
-- signalled, since jobs of that tenant may have been held back by the quota.
local function end_lease(id, q, qt)
  if qt == nil then qt = redis.call('HGET', jobkey(id), 'qt') end
  if not qt then return end
  redis.call('HDEL', jobkey(id), 'qt')
  local r = redis.pcall('HINCRBY', INFLIGHT, qt, -1)
  if type(r) ~= 'number' or r <= 0 then redis.call('HDEL', INFLIGHT, qt) end
  if q then signal_queue(q) end
end

-- Remove job id from whichever structure its status says it is in (q: its queue, or false when
-- unknown). A status that is no status at all takes it out of every place it may be.
local function detach(id, status, q, member)
  if status == 'pending' then
    if zrem(INGRESS, id) == 1 then
      count_tenant(INGRESS_QUEUE, redis.call('HGET', jobkey(id), 'tn'), -1)
    end
  elseif status == 'delayed' or status == 'retrying' then
    zrem(DELAYED, id)
  elseif status == 'queued' then
    if q then
      if member and zrem(qkey(q), member) == 1 then
        count_tenant(q, redis.call('HGET', jobkey(id), 'tn'), -1)
      end
      zrem(qagekey(q), id)
    end
  elseif status == 'running' then
    if q then zrem(leasedkey(q), id) end
    end_lease(id, q)
  elseif not STATUSES[status] then
    zrem(INGRESS, id)
    zrem(DELAYED, id)
    if q then
      if member then zrem(qkey(q), member) end
      zrem(qagekey(q), id)
      zrem(leasedkey(q), id)
    end
  end
end

-- End job id's stream with its terminal entry {a = attempt, e = status}, and give the stream the
-- record's TTL, when the job streamed or a reader waits on it (the record's 'sw', set by
-- stream_append.lua and stream_watch.lua): so every reader sees the end, also of a job that never
-- streamed. `f` is what finish read of the record. (A record replaced as corrupt has lost its
-- 'sw'; its readers find it finished when they next check the record, and end by its outcome.)
local function end_stream(id, status, ttl_ms, f)
  if not f.sw then return end
  local sk = streamkey(id)
  kcall('XADD', sk, '*', 'a', f.attempts or '0', 'e', status)
  if ttl_ms > 0 then redis.call('PEXPIRE', sk, ttl_ms) end
end

-- Enter job id, just finished succeeded or cancelled, at the head of its queue's finished index
-- (the ingress's for a job cancelled before routing): the only index of finished jobs, for
-- listing. A list, not a sorted set: at its cap an entry leaves for every one that comes, and a
-- list's tail goes for almost nothing. Bounded: every DONE_TRIM_EVERY entries the list is cut
-- to its newest DONE_CAP, and the oldest entries whose record has expired (their result TTL)
-- are popped from the tail; so a finished job costs one LPUSH more. A listing skips entries
-- whose record is gone in between.
local function index_finished(id, q)
  if not is_queue_name(q) then q = INGRESS_QUEUE end
  local k = donekey(q)
  local n = kcall('LPUSH', k, id)
  if n % DONE_TRIM_EVERY == 0 then
    if n > DONE_CAP then redis.call('LTRIM', k, 0, DONE_CAP - 1) end
    for _ = 1, DONE_TRIM_EVERY do
      local oldest = redis.call('LINDEX', k, -1)
      if not oldest or redis.call('EXISTS', jobkey(oldest)) == 1 then break end
      redis.call('RPOP', k)
    end
  end
end

-- -- recording -----------------------------------------------------------------------------------

-- STREAM of what the service served (Keys.record): one entry per job finished through `finish`
-- while RECORD_LEN > 0, capped at about RECORD_LEN entries. complete.lua, fail.lua and
-- requeue_expired.lua set RECORD_LEN from their ARGV (Settings.record_max_len, 0 when
-- Settings.record is off); every other script leaves it 0, so cancellations and corrupt records
-- found by readers are not recorded. An entry has three fields (scheduler/recording.py reads
-- them): 'id' the job id, 'rt' the routing view as submitted (job type, priority, tags, tenant,
-- deadline), and 'v', nine values joined by spaces ('' where unknown): created_ms, started_ms
-- (first lease), finished_ms, queue, attempts, status, the run microseconds the worker measured,
-- tokens in and out the handler reported. Packed: eleven separate fields made the XADD about a
-- third dearer; 'id' and 'rt' stand alone since they may hold any text.
-- Only the first entry a script call adds trims the stream (XADD MAXLEN ~: whole nodes of up to
-- 100 entries), which costs about a third of an append again: so the stream stays within
-- RECORD_LEN, one call's batch and one node.
local RECORD = prefix .. 'record'
local RECORD_LEN = 0
local RECORDED = 0
-- What the worker reported of the job being finished (complete.lua and fail.lua set them per
-- job); '' when unknown.
local RUN_US, TOKENS_IN, TOKENS_OUT = '', '', ''

local function record(id, status, now, f)
  local v = table.concat({
    f.created_ms or '', f.started_ms or '', string.format('%d', now), f.queue or '',
    f.attempts or '', status, RUN_US, TOKENS_IN, TOKENS_OUT,
  }, ' ')
  local r
  if RECORDED == 0 then
    r = redis.pcall('XADD', RECORD, 'MAXLEN', '~', RECORD_LEN, '*', 'id', id, 'rt', f.rt or '',
                    'v', v)
  else
    r = redis.pcall('XADD', RECORD, '*', 'id', id, 'rt', f.rt or '', 'v', v)
  end
  RECORDED = RECORDED + 1
  -- Never an error: this runs last in finish, with the rest of a batch still to settle. A key
  -- of the wrong type is moved aside as by kcall; any other refusal (a stream whose IDs ran out,
  -- written by hand) costs the entry, with a notice.
  if wrong_type(r) then
    move_aside(RECORD, redis.call('TYPE', RECORD)['ok'])
    r = redis.pcall('XADD', RECORD, '*', 'id', id, 'rt', f.rt or '', 'v', v)
  end
  if type(r) == 'table' and r.err then
    notice('dropped', RECORD, id .. ': not recorded: ' .. r.err)
  end
end

-- The fields of a record that finish reads, in one HMGET.
local FINISH_FIELDS = {'sw', 'w', 'queue', 'attempts', 'created_ms', 'started_ms', 'rt'}

-- Mark a job finished, start its record's TTL, tell every client waiting on it (through its
-- inbox), and record it (when recording). `waiting` is the record's 'w' field, set by watch.lua:
-- a job nobody waits for costs nothing more. Whatever the record's fields hold (a record replaced
-- as corrupt has almost none) is copied, never judged: a reader of the recording judges it.
local function finish(id, status, now, ttl_ms, waiting, result)
  local k = jobkey(id)
  if result then
    redis.call('HSET', k, 'status', status, 'finished_ms', now, 'result', result)
  else
    redis.call('HSET', k, 'status', status, 'finished_ms', now)
  end
  local values = redis.call('HMGET', k, unpack(FINISH_FIELDS))
  local f = {}
  for i, name in ipairs(FINISH_FIELDS) do f[name] = values[i] end
  if ttl_ms > 0 then redis.call('PEXPIRE', k, ttl_ms) end
  end_stream(id, status, ttl_ms, f)
  if waiting == nil then waiting = f.w end
  if waiting then
    -- A small result travels with the notice ("id\nstatus\nresult"), saving the waiter a read.
    local notice_text = id
    if result and #result <= INLINE_RESULT_BYTES then
      notice_text = id .. '\n' .. status .. '\n' .. result
    end
    for _, client in ipairs(kcall('SMEMBERS', waiterskey(id))) do
      kcall('RPUSH', inboxkey(client), notice_text)
      redis.call('PEXPIRE', inboxkey(client), INBOX_TTL_MS)
    end
    redis.call('DEL', waiterskey(id))
  end
  if status ~= 'dead' then index_finished(id, f.queue) end
  if RECORD_LEN > 0 then record(id, status, now, f) end
end

-- Dead-letter a job that is currently in `status` (in queue q, or the ingress when q is false).
local function dead_letter(id, status, q, member, reason, now, ttl_ms)
  detach(id, status, q, member)
  kcall('ZADD', deadkey(q or INGRESS_QUEUE), now, id)
  incr(countskey(q or INGRESS_QUEUE), 'dead', 1)
  redis.call('HSET', jobkey(id), 'error', reason)
  finish(id, 'dead', now, ttl_ms)
end

-- Dead-letter record `rec` (a hash) of job id as CorruptJob for reason `why`. q is the queue of
-- the index it was found in (false for the ingress and the delayed set): with an unusable status
-- the job is taken out of every place it may be, in its own queue and in q.
local function corrupt(id, rec, q, why)
  local s = rec.status
  local own = is_queue_name(rec.queue) and rec.queue or false
  local member = is_order(rec.order, id) and rec.order or false
  if not (s and STATUSES[s]) then
    s = 'unknown'
    if q and q ~= own then detach(id, s, q, false) end
  end
  dead_letter(id, s, own or q, member, error_json('CorruptJob', why), NOW, DEAD_TTL)
  count_corrupt('records')
  notice('dead_lettered', id, why)
end

-- Job id's key holds a `t`, not a hash: move it aside and dead-letter the job in a fresh record
-- (found in queue q, or false). Returns the reason.
local function corrupt_key(id, t, q)
  local dest = move_aside(jobkey(id), t)
  local why = 'job record is a ' .. t .. ', not a hash (moved to ' .. dest .. ')'
  detach(id, 'unknown', q, false)
  kcall('ZADD', deadkey(q or INGRESS_QUEUE), NOW, id)
  if q then redis.call('HSET', jobkey(id), 'queue', q) end
  redis.call('HSET', jobkey(id), 'error', error_json('CorruptJob', why))
  -- Clients may have registered before the record was overwritten: tell them.
  finish(id, 'dead', NOW, DEAD_TTL, '1')
  count_corrupt('records')
  notice('dead_lettered', id, why)
  return why
end

-- -- index entries -------------------------------------------------------------------------------

local function place_text(status, q)
  if status == 'pending' then return 'the ingress' end
  if status == 'delayed' or status == 'retrying' then return 'the delayed set' end
  if status == 'queued' then return "queue '" .. printable(q) .. "'" end
  return "the lease set of queue '" .. printable(q) .. "'"
end

-- Whether job id is where its (sound) record's status says: then an entry elsewhere is stale.
local function placed(id, rec)
  local s, q = rec.status, rec.queue
  if s == 'pending' then
    return kcall('ZSCORE', INGRESS, id) ~= false
  elseif s == 'delayed' or s == 'retrying' then
    return kcall('ZSCORE', DELAYED, id) ~= false
  elseif s == 'queued' then
    return kcall('ZSCORE', qkey(q), rec.order) ~= false
  elseif s == 'running' then
    return kcall('ZSCORE', leasedkey(q), id) ~= false
  end
  return false
end

local function belongs(rec, here, q)
  local s = rec.status
  if here == 'delayed' then return s == 'delayed' or s == 'retrying' end
  return s == here and (here == 'pending' or rec.queue == q)
end

-- Judge the entry of job id found in index `index` (its key), which holds jobs in state `here`
-- ('pending', 'queued', 'running' or 'delayed') of queue q (false for the ingress and the delayed
-- set). Returns the record (fields `names`, 'status', 'queue' and 'order' among them) when the
-- job belongs there and can go on; otherwise settles it and returns nil and what it did: 'dead'
-- (a corrupt record, dead-lettered) or 'dropped' (a stale entry). On nil the caller removes the
-- entry from its index.
local function judge(id, index, here, q, names)
  if not is_id(id) then
    notice('dropped', index, id .. ': not a job id')
    return nil, 'dropped'
  end
  local rec, t = read_job(id, names)
  if rec == nil then
    notice('dropped', index, id .. ': no such job')
    return nil, 'dropped'
  end
  if rec == false then
    corrupt_key(id, t, q)
    return nil, 'dead'
  end
  local why = flaw(id, rec)
  if why then
    corrupt(id, rec, q, why)
    return nil, 'dead'
  end
  if belongs(rec, here, q) then return rec end
  if FINISHED[rec.status] then
    -- The job has ended and this entry is stale; the record stands, and it must be in the one
    -- index of its end (a dead-letter set or a finished list), so listings, replay and purge
    -- find it. Only a damaged store gets here, so the LPOS over a finished list is rare.
    local home = is_queue_name(rec.queue) and rec.queue or INGRESS_QUEUE
    if rec.status == 'dead' then
      if kcall('ZSCORE', deadkey(home), id) == false then
        -- Dead by its record alone, with no reason and in no dead-letter set: dead-lettered
        -- here as corrupt, so it carries a reason and is where replay and purge look.
        corrupt(id, rec, q, 'job record says it is dead, but it is in ' .. place_text(here, q)
                .. ' instead')
        return nil, 'dead'
      end
    elseif kcall('LPOS', donekey(home), id) == false then
      kcall('LPUSH', donekey(home), id)
    end
    notice('dropped', index, id .. ': the job is ' .. rec.status .. ' elsewhere')
    return nil, 'dropped'
  end
  if placed(id, rec) then
    notice('dropped', index, id .. ': the job is ' .. rec.status .. ' elsewhere')
    return nil, 'dropped'
  end
  corrupt(id, rec, q, 'job record says it is ' .. rec.status .. ' in '
          .. place_text(rec.status, rec.queue) .. ', but it is in '
          .. place_text(here, q) .. ' instead')
  return nil, 'dead'
end

-- A worker's report on job id under lease `token`: the record (fields `names`, 'status' and
-- 'attempts' among them) when `accept`s its status and the token is current; else nil and the
-- code: C_NOT_FOUND, C_ALREADY_FINISHED, C_STALE_LEASE, or C_CORRUPT (dead-lettered here).
-- `unjudged` (optional) names fields read in the same call but left out of the judgement (flaw),
-- for what only the counting needs: their values are in the record as read, unchecked.
local function reported(id, names, token, accept, unjudged)
  local rec, t = read_job(id, names)
  if rec == nil then return nil, C_NOT_FOUND end
  if rec == false then
    corrupt_key(id, t, false)
    return nil, C_CORRUPT
  end
  if rec.status and FINISHED[rec.status] then return nil, C_ALREADY_FINISHED end
  local kept = {}
  for _, name in ipairs(unjudged or {}) do
    kept[name] = rec[name]
    rec[name] = nil
  end
  local why = flaw(id, rec)
  if why then
    corrupt(id, rec, false, why)
    return nil, C_CORRUPT
  end
  if not accept[rec.status] or tonumber(rec.attempts) ~= token then return nil, C_STALE_LEASE end
  for name, value in pairs(kept) do rec[name] = value end
  return rec
end

-- -- attempt history ------------------------------------------------------------------------------

-- A job's 'history' field: one JSON object per line, oldest first, the newest HISTORY_LEN kept
-- (mirrors scheduler.keys.HISTORY_LEN). Each failed attempt, expired lease and replay adds one,
-- so 'error' (the latest failure) no longer hides the ones before it.
local HISTORY_LEN = 20
-- Longest error message kept in one history entry (the full latest error stays in 'error').
local HISTORY_MESSAGE_BYTES = 1000

-- The text of one history entry: `event`, the time, the attempt (when given), and `fields`, a
-- flat list of names and values already encoded as JSON. Numbers are formatted here, not by
-- cjson (which writes large integers in exponent form).
local function history_entry(event, attempt, fields)
  local parts = {'"event":' .. cjson.encode(event), '"at_ms":' .. string.format('%d', NOW)}
  if attempt then parts[#parts + 1] = '"attempt":' .. string.format('%d', attempt) end
  for i = 1, #fields, 2 do parts[#parts + 1] = cjson.encode(fields[i]) .. ':' .. fields[i + 1] end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- The entry of a failed attempt, from the error JSON a worker reported (its type and message;
-- the traceback stays in 'error' only).
local function failure_entry(attempt, error_text)
  local ok, e = pcall(cjson.decode, error_text)
  local etype, message = 'UnknownError', ''
  if ok and type(e) == 'table' then
    if type(e.type) == 'string' then etype = e.type end
    if type(e.message) == 'string' then message = e.message end
  end
  return history_entry('failed', attempt, {
    'type', cjson.encode(etype),
    'message', cjson.encode(string.sub(message, 1, HISTORY_MESSAGE_BYTES)),
  })
end

-- Append `entry` to job id's history (its record is a hash), dropping the oldest beyond
-- HISTORY_LEN.
local function add_history(id, entry)
  local k = jobkey(id)
  local h = redis.call('HGET', k, 'history')
  if not h or h == '' then
    h = entry
  else
    h = h .. '\n' .. entry
    local _, lines = string.gsub(h, '\n', '\n')
    for _ = HISTORY_LEN, lines do
      h = string.sub(h, string.find(h, '\n', 1, true) + 1)
    end
  end
  redis.call('HSET', k, 'history', h)
end

-- -- what finished jobs took --------------------------------------------------------------------

-- The histogram bucket (1-based; #TIMING_BUCKETS_MS + 1 is +Inf) of a duration in ms: a binary
-- search, since it runs twice for every job completed.
local N_BUCKETS = #TIMING_BUCKETS_MS + 1
local function bucket_of(ms)
  local lo, hi = 1, N_BUCKETS
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if ms <= TIMING_BUCKETS_MS[mid] then hi = mid else lo = mid + 1 end
  end
  return lo
end
-- Field names per bucket (constants: no string is built per job).
local JCT_FIELD = {'j1', 'j2', 'j3', 'j4', 'j5', 'j6', 'j7', 'j8', 'j9', 'j10', 'j11', 'j12', 'j13',
                   'j14', 'j15'}
local WAIT_FIELD = {'w1', 'w2', 'w3', 'w4', 'w5', 'w6', 'w7', 'w8', 'w9', 'w10', 'w11', 'w12', 'w13',
                    'w14', 'w15'}

-- Increments gathered over one script call, key -> field -> amount, written by flush_observed:
-- a batch of completions costs one HINCRBY per distinct field, not a few per job.
local observed = {}
-- Per queue of this call: its SLO in ms, or false when it has none (read once per call).
local slo_ms_of = {}

local function add(key, field, by)
  local t = observed[key]
  if not t then t = {}; observed[key] = t end
  t[field] = (t[field] or 0) + by
end

local function queue_slo_ms(q)
  local slo = slo_ms_of[q]
  if slo == nil then
    -- pcall: a timing key of the wrong type reads as no SLO here; the flush moves it aside.
    local v = redis.pcall('HGET', timingkey(q), 'slo_ms')
    slo = (type(v) == 'string' and is_uint(v) and tonumber(v)) or false
    slo_ms_of[q] = slo
  end
  return slo
end

-- Count what job `rec` (its sound order, and created_ms, started_ms and rt as read, unjudged)
-- took, succeeding now in queue q: completion time and queue wait into the queue's buckets; met
-- or missed against its own deadline, else its queue's SLO; its tenant's usage. A record without
-- a sound created_ms is not counted (its completion goes on). The script that calls this calls
-- flush_observed before it returns (complete.lua).
local function observe_succeeded(q, rec, now)
  if not is_uint(rec.created_ms) then return end
  local k = timingkey(q)
  local created = tonumber(rec.created_ms)
  local jct = math.max(0, now - created)
  add(k, JCT_FIELD[bucket_of(jct)], 1)
  add(k, 'js', jct)
  local started = is_uint(rec.started_ms) and tonumber(rec.started_ms)
  if started then
    local wait = math.max(0, started - created)
    add(k, WAIT_FIELD[bucket_of(wait)], 1)
    add(k, 'ws', wait)
  end
  -- Characters 5-19 of the order member: the absolute deadline in ms (NO_DEADLINE for none).
  local deadline = tonumber(string.sub(rec.order, 5, 19))
  local met = nil
  if deadline and deadline ~= NO_DEADLINE then
    met = now <= deadline
  else
    local slo = queue_slo_ms(q)
    if slo then met = jct <= slo end
  end
  if met ~= nil then
    add(k, 'sn', 1)
    if met then add(k, 'sm', 1) end
  end
  -- Most jobs name no tenant: their routing view says "n":null. A tenant without quotes or
  -- backslashes is matched in place ('"n":"' cannot occur inside a JSON string, whose quotes are
  -- escaped); any other is decoded.
  local rt = rec.rt
  if rt and not string.find(rt, '"n":null', 1, true) then
    local tenant = string.match(rt, '"n":"([^"\\]*)"')
    if not tenant then
      local ok, view = pcall(cjson.decode, rt)
      if ok and type(view) == 'table' and type(view.n) == 'string' then tenant = view.n end
    end
    if tenant then
      add(TENANT_USAGE, 'c:' .. tenant, 1)
      if started then add(TENANT_USAGE, 's:' .. tenant, math.max(0, now - started)) end
    end
  end
end

-- Write what observe_succeeded gathered.
local function flush_observed()
  for key, fields in pairs(observed) do
    for field, by in pairs(fields) do incr(key, field, by) end
  end
  observed = {}
end
