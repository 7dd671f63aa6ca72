--[[
  replay: send dead-lettered jobs back to work: each leaves its dead-letter set and is queued
  again, in one step, in the queue it died in (at its old place in the order: priority, deadline,
  arrival), or in the ingress when it died before it was routed, or in the queue given.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a key moved aside
  ARGV[3]  destination queue, '' for the queue each job died in
  ARGV[4]  '1': reset the retry budget (the job gets max_retries retries again); '0': keep it
           (the next failure dead-letters it again)
  ARGV[5]  replay token, one per replay request: a job this token replayed already is reported
           C_OK again and left alone, so a request repeated after a lost reply changes nothing
  ARGV[6]  number of jobs N, then N job ids
  Returns  {reply, notices}: reply holds 2 values per job, a code and a reason ('' for C_OK):
           C_OK            queued again (status queued, or pending in the ingress)
           C_NOT_FOUND     no such job (never submitted, purged, or its record expired)
           C_WRONG_STATE   not in the dead-letter set (the reason says its status), or the
                           destination queue is not a known queue
           C_CORRUPT       refused, nothing changed: the record is not a hash, was dead-lettered
                           as CorruptJob, or a field it needs to run again is missing or garbled
                           (the reason names it); purge such a job instead
  History  a 'replayed' entry (from, to, reset) appended to each job replayed.
  Cleared  the job's stream (it ended with the death) and its stream fields.
  Kept     attempts (lease tokens only grow: the next lease is a new attempt; a completion under
           the lease before the death is still taken while the job waits, as after any expired
           lease), the latest error and the history. A reset budget sets 'released' to the
           attempts made: those no longer count against max_retries.
  Events   one token on the signal list of every queue that got a job, or on the ingress's.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[2])
local dest, reset, token = ARGV[3], ARGV[4] == '1', ARGV[5]
local n = tonumber(ARGV[6])
local out = {}
local function reply(code, reason)
  out[#out + 1] = code
  out[#out + 1] = reason or ''
end

local dest_known = dest == '' or (is_queue_name(dest) and kcall('SISMEMBER', QUEUES, dest) == 1)
local names = {'status', 'queue', 'order', 'attempts', 'maxr', 'released', 'created_ms',
               'due_ms', 'error', 'rp'}
local signalled, to_ingress = {}, false

-- Why record `rec` of job id cannot run again in state `target` (its queue `q`), or nil. Only
-- what the scripts judge is judged here, cheaply (no field is parsed whole: a spec may be a
-- megabyte); a spec or error that is there but garbled is found by the next reader, which
-- dead-letters the job again with the reason, as it would any record.
local function unfit(id, rec, target, q)
  -- Errors are JSON objects written by the store: their own quotes are never escaped, those
  -- inside a message always are, so this finds the type and nothing a message says.
  if rec.error and string.find(rec.error, '"type":"CorruptJob"', 1, true) then
    local ok, e = pcall(cjson.decode, rec.error)
    local why = ok and type(e) == 'table' and type(e.message) == 'string' and e.message
      or 'no reason recorded'
    return 'it was dead-lettered as corrupt (' .. printable(why) .. ')'
  end
  local candidate = {}
  for _, name in ipairs(names) do candidate[name] = rec[name] end
  candidate.status, candidate.queue = target, q or nil
  local why = flaw(id, candidate)
  if why then return why end
  if redis.call('HEXISTS', jobkey(id), 'spec') == 0 then return 'job record has no spec' end
  return nil
end

for i = 1, n do
  local id = ARGV[6 + i]
  local rec, t = read_job(id, names)
  if rec == nil then
    reply(C_NOT_FOUND, 'no such job')
  elseif rec == false then
    reply(C_CORRUPT, 'job record is a ' .. t .. ', not a hash')
  elseif rec.rp == token then
    reply(C_OK)
  elseif not rec.status or not STATUSES[rec.status] then
    reply(C_CORRUPT, rec.status and ("job record has an unknown status '"
      .. printable(rec.status) .. "'") or 'job record has no status')
  elseif rec.status ~= 'dead' then
    reply(C_WRONG_STATE, 'the job is ' .. rec.status .. ', not in the dead-letter set')
  elseif not dest_known then
    reply(C_WRONG_STATE, "queue '" .. printable(dest) .. "' is not a known queue")
  else
    local died_in = is_queue_name(rec.queue) and rec.queue or INGRESS_QUEUE
    local target_q = dest ~= '' and dest or (died_in ~= INGRESS_QUEUE and died_in or false)
    local target = target_q and 'queued' or 'pending'
    local why = unfit(id, rec, target, target_q)
    if why then
      reply(C_CORRUPT, why)
    elseif kcall('ZSCORE', deadkey(died_in), id) == false then
      reply(C_WRONG_STATE, "the job is dead but not in the dead-letter set of '" .. died_in
        .. "'")
    else
      local k = jobkey(id)
      kcall('ZREM', deadkey(died_in), id)
      redis.call('PERSIST', k)
      redis.call('HDEL', k, 'finished_ms', 'cancel', 'w', 'sa', 'sn', 'sw')
      -- The stream ended with the death; the job streams afresh when it runs again.
      redis.call('DEL', streamkey(id))
      if reset then redis.call('HSET', k, 'released', rec.attempts or '0') end
      redis.call('HSET', k, 'rp', token)
      add_history(id, history_entry('replayed', nil, {
        'from', cjson.encode(died_in),
        'to', cjson.encode(target_q or INGRESS_QUEUE),
        'reset', reset and 'true' or 'false',
      }))
      if target_q then
        kcall('SADD', QUEUES, target_q)
        push_queued(id, target_q, now, rec.order)
        incr(countskey(target_q), 'enqueued', 1)
        signalled[target_q] = true
      else
        -- Back to level 1, behind everything submitted so far.
        local SEQ = prefix .. 'seq'
        local seq = redis.pcall('INCRBY', SEQ, 1)
        if type(seq) == 'table' then
          move_aside(SEQ, redis.call('TYPE', SEQ)['ok'])
          seq = redis.call('INCRBY', SEQ, 1)
        end
        if kcall('ZADD', INGRESS, seq, id) == 1 then
          count_tenant(INGRESS_QUEUE, redis.call('HGET', k, 'tn'), 1)
        end
        redis.call('HSET', k, 'status', 'pending')
        redis.call('HDEL', k, 'queue')
        to_ingress = true
      end
      reply(C_OK)
    end
  end
end
for q in pairs(signalled) do signal_queue(q) end
if to_ingress then
  kcall('LPUSH', prefix .. 'ingress:signal', '1')
  redis.call('LTRIM', prefix .. 'ingress:signal', 0, 0)
end
return {out, notices}
