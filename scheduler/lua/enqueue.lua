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
  Fair share when the service serves tenants (ADMISSION 'fair' = '1'): each routed job's order
           member is made here, not at submit: its priority and deadline as submitted, then, in
           place of the arrival sequence, its tenant's virtual finish tag in the queue,
           max(queue's virtual time, the tenant's last tag) + the tenant's cost (1000 / weight;
           policies.fairshare.finish_tag), so within a priority band (and deadline) the queue
           serves tenants by weighted fair queueing. A job routed to the delayed set is tagged
           now too, and keeps its tag (as a retried or released job keeps its place).
  Counted  the tenant counts (tenantskey) of the ingress (-1) and of each queue (+1) per job.
  Events   one token on the signal list of every queue that got a job; the finish notice of every
           job dead-lettered here.
]]
-- @include _common.lua

local fconf = kcall('HMGET', ADMISSION, 'fair', 'twd')
local fair = fconf[1] == '1'
local default_cost = tonumber(fconf[2]) or 1000
local costs = {}
local function cost_of(tn)
  local c = costs[tn]
  if not c then
    c = tonumber(kcall('HGET', ADMISSION, 'tw:' .. tn)) or default_cost
    costs[tn] = c
  end
  return c
end
-- Per queue: {v = virtual time, last = {tenant = last tag}} as read, then as advanced here.
local fstate = {}
local MAX_TAG = 999999999999999
local function fair_order(order, id, q, tn)
  local st = fstate[q]
  if not st then
    st = {v = tonumber(kcall('HGET', fairkey(q), '~v')) or 0, last = {}}
    fstate[q] = st
  end
  local last = st.last[tn]
  if last == nil then last = tonumber(redis.call('HGET', fairkey(q), tn)) or 0 end
  local tag = math.min(math.max(st.v, last) + cost_of(tn), MAX_TAG)
  st.last[tn] = tag
  return string.sub(order, 1, 19) .. string.format('%015d', tag) .. ':' .. id
end

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}
local routed = {}
-- Per queue: {order members (score 0 each), age entries} added with one ZADD each at the end.
local members, ages = {}, {}
local names = {'status', 'due_ms', 'order', 'tn'}
-- Jobs leaving the ingress, and entering each queue, per tenant.
local left, entered = {}, {}
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
      local tn = rec.tn
      if tn then left[tn] = (left[tn] or 0) + 1 end
      local order = rec.order
      if fair and is_queue_name(q) then order = fair_order(order, id, q, tn or '') end
      local due = tonumber(rec.due_ms)
      if due > now then
        kcall('ZADD', DELAYED, due, id)
        redis.call('HSET', k, 'status', 'delayed', 'queue', q, 'order', order)
        out[#out + 1] = C_DELAYED
      else
        if not members[q] then members[q], ages[q], entered[q] = {}, {}, {} end
        local m, a, e = members[q], ages[q], entered[q]
        m[#m + 1] = 0
        m[#m + 1] = order
        a[#a + 1] = now
        a[#a + 1] = id
        if tn then e[tn] = (e[tn] or 0) + 1 end
        redis.call('HSET', k, 'status', 'queued', 'queue', q, 'order', order)
        out[#out + 1] = C_OK
      end
    end
  end
end
if #routed > 0 then kcall_chunked('ZREM', INGRESS, routed) end
for tn, c in pairs(left) do count_tenant(INGRESS_QUEUE, tn, -c) end
local known = {}
for q, m in pairs(members) do
  kcall_chunked('ZADD', qkey(q), m)
  kcall_chunked('ZADD', qagekey(q), ages[q])
  incr(countskey(q), 'enqueued', #ages[q] / 2)
  for tn, c in pairs(entered[q]) do count_tenant(q, tn, c) end
  signal_queue(q)
end
for q, st in pairs(fstate) do
  local flat = {}
  for tn, tag in pairs(st.last) do
    flat[#flat + 1] = tn
    flat[#flat + 1] = string.format('%d', tag)
  end
  if #flat > 0 then kcall('HSET', fairkey(q), unpack(flat)) end
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
