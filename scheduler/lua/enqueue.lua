--[[
  enqueue: move routed jobs from the ingress into their task queues (level 1's decision).

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a record dead-lettered as corrupt (and of a key moved aside)
  ARGV[3]  number of jobs N, then 2 values per job: id, queue name
  Returns  {codes, notices}: one code per job
           C_OK            queued
           C_DELAYED       held in the delayed set until its due time
           C_NOT_FOUND     no such job
           C_WRONG_STATE   the job is not pending (already routed, or finished)
           C_CORRUPT       the record is not a hash, or its status, due_ms or order is missing or
                           garbled: dead-lettered (CorruptJob, with the reason) instead
           notices: what was settled (see _common.lua); a queue, ingress or delayed key of the
           wrong type is moved aside first.
  Events   one token on the signal list of every queue that got a job; the finish notice of every
           job dead-lettered here.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}
local routed = {}
-- Per queue: {order members (score 0 each), age entries} added with one ZADD each at the end.
local members, ages = {}, {}
local names = {'status', 'due_ms', 'order'}
for i = 0, n - 1 do
  local id, q = ARGV[4 + i * 2], ARGV[5 + i * 2]
  local k = jobkey(id)
  local rec, t = read_job(id, names)
  if rec == nil then
    out[#out + 1] = C_NOT_FOUND
  elseif rec == false then
    corrupt_key(id, t, false)
    out[#out + 1] = C_CORRUPT
  elseif rec.status and STATUSES[rec.status] and rec.status ~= 'pending' then
    out[#out + 1] = C_WRONG_STATE
  else
    local why = flaw(id, rec)
    if why then
      corrupt(id, rec, false, why)
      out[#out + 1] = C_CORRUPT
    else
      routed[#routed + 1] = id
      local due = tonumber(rec.due_ms)
      if due > now then
        kcall('ZADD', DELAYED, due, id)
        redis.call('HSET', k, 'status', 'delayed', 'queue', q)
        out[#out + 1] = C_DELAYED
      else
        if not members[q] then members[q], ages[q] = {}, {} end
        local m, a = members[q], ages[q]
        m[#m + 1] = 0
        m[#m + 1] = rec.order
        a[#a + 1] = now
        a[#a + 1] = id
        redis.call('HSET', k, 'status', 'queued', 'queue', q)
        out[#out + 1] = C_OK
      end
    end
  end
end
if #routed > 0 then kcall_chunked('ZREM', INGRESS, routed) end
local known = {}
for q, m in pairs(members) do
  kcall_chunked('ZADD', qkey(q), m)
  kcall_chunked('ZADD', qagekey(q), ages[q])
  incr(countskey(q), 'enqueued', #ages[q] / 2)
  signal_queue(q)
end
-- Every queue a job was routed to is known, for expiry sweeps and stats.
for i = 0, n - 1 do
  local q = ARGV[5 + i * 2]
  if (out[i + 1] == C_OK or out[i + 1] == C_DELAYED) and not known[q] then
    known[q] = true
    kcall('SADD', QUEUES, q)
  end
end
return {out, notices}
