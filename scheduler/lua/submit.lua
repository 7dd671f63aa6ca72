--[[
  submit: put a batch of new jobs into the ingress for level 1, each one admitted or refused by
  the admission caps the service published (ADMISSION; scheduler/admission.py).

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  idempotency-key TTL in ms
  ARGV[3]  '1': refuse the batch when no router serves the namespace (see _served.lua), '0': don't
  ARGV[4]  number of jobs N, then 10 values per job:
           id, spec JSON, idempotency key ('' = none), priority, deadline_ms ('' = none),
           due_ms (not before), max_retries, routing view JSON (what level 1 reads: no payload),
           job type, tenant ('' = none)
  Returns  {reply, notices} (notices: keys of the wrong type moved aside, see _common.lua).
           reply is {C_NO_SERVICE} alone when refused for want of a router (nothing written);
           else a flat array, 3 entries per job: code, job id, detail ('' unless refused)
           C_OK        created; the id is the given one. Also when a job of that id exists already:
                       ids are random per submission, so that is this submission's own earlier
                       attempt (a retry after a lost reply), which must not make a second job
           C_DUPLICATE the idempotency key is taken; the id is the existing job's
           C_REJECTED  over an admission cap: nothing written for this job (not even its
                       idempotency key); detail is "cap<TAB>current<TAB>limit<TAB>retry_after_ms
                       <TAB>queue" (queue '' when the cap is not a queue's)
  Admission, per job in batch order (jobs admitted earlier in the batch count for later ones):
           max_queued_total   jobs waiting in the ingress, the delayed set and every known queue
                              (one ZCARD each, once per call) must stay below the cap
           tenant_max_queued  the job's tenant's jobs waiting in the ingress and the queues
           queue_max_queued,  the queues the job's type maps to (as published): some queue must
           queue_max_wait_s   have fewer queued jobs than its cap and, when it has a wait limit
                              and a measured drain rate, (queued + 1) / rate within the limit.
                              Jobs still in the ingress count for no queue (routing is later).
           A retried submit (the id exists) and an idempotency duplicate are never refused.
  Counted  a refused job adds 1 to the 'rejected' field of the counts hash of the queue it was
           refused for: the first its type maps to, or INGRESS_QUEUE's when it maps to none.
  Events   one token on the ingress signal list, so a blocked router wakes.
]]
-- @include _common.lua
-- @include _served.lua

local now = tonumber(ARGV[1])
local idem_ttl = tonumber(ARGV[2])
NOW, DEAD_TTL = now, idem_ttl
if ARGV[3] == '1' and not router_served() then return {{C_NO_SERVICE}, notices} end
local n = tonumber(ARGV[4])
local STRIDE = 10

-- -- admission (O(1) per job: HGETs of small hashes and ZCARDs, each once per call) -----------

local conf = kcall('HMGET', ADMISSION, 'v', 'total', 'tcaps', 'qcaps', 'retry_ms')
local published = conf[1] ~= false
local total_cap = published and tonumber(conf[2]) or (not published and DEFAULT_MAX_QUEUED)
local tenant_caps, queue_caps = conf[3] == '1', conf[4] == '1'
-- When no drain rate is known: how long a refused client is told to wait.
local default_retry_ms = tonumber(conf[5]) or 1000

local function fmt(x) return string.format('%d', x) end

local waiting_total = nil
local function total_waiting()
  if not waiting_total then
    waiting_total = kcall('ZCARD', INGRESS) + kcall('ZCARD', DELAYED)
    for _, q in ipairs(kcall('SMEMBERS', QUEUES)) do
      if is_queue_name(q) then waiting_total = waiting_total + kcall('ZCARD', qkey(q)) end
    end
  end
  return waiting_total
end

local rates = {}
local function drain_rate(q)
  local r = rates[q]
  if r == nil then
    r = tonumber(kcall('HGET', DRAIN, q)) or 0
    rates[q] = r
  end
  return r
end
local total_rate = nil
local function drain_rate_total()
  if not total_rate then
    total_rate = 0
    for _, v in ipairs(kcall('HVALS', DRAIN)) do total_rate = total_rate + (tonumber(v) or 0) end
  end
  return total_rate
end

-- How long until `excess` jobs have drained at `rate` jobs/s (the default when nothing drains).
local function retry_after_ms(excess, rate)
  if rate and rate > 0 then return math.max(100, math.ceil(excess * 1000 / rate)) end
  return default_retry_ms
end

local type_queues = {}
local function queues_of(job_type)
  local qs = type_queues[job_type]
  if not qs then
    qs = {}
    local text = kcall('HGET', ADMISSION, 'jt:' .. job_type)
    if text then
      for q in string.gmatch(text, '[^,]+') do qs[#qs + 1] = q end
    end
    type_queues[job_type] = qs
  end
  return qs
end

local queued, qlimits = {}, {}
local function queue_state(q)
  if not queued[q] then
    queued[q] = kcall('ZCARD', qkey(q))
    local c = kcall('HMGET', ADMISSION, 'qc:' .. q, 'qw:' .. q)
    qlimits[q] = {tonumber(c[1]), tonumber(c[2])}
  end
  return queued[q], qlimits[q][1], qlimits[q][2]
end

local tenant_waiting, tenant_limit = {}, {}
local function tenant_state(tn)
  if tenant_waiting[tn] == nil then
    tenant_waiting[tn] = tonumber(kcall('HGET', TENANTS_ALL, tn)) or 0
    local c = kcall('HMGET', ADMISSION, 'tc:' .. tn, 'tcd')
    tenant_limit[tn] = tonumber(c[1]) or tonumber(c[2]) or false
  end
  return tenant_waiting[tn], tenant_limit[tn]
end

-- Admit one job of `job_type` for tenant tn: nil (admitted: the counts are taken) or the refusal
-- detail and the queue whose counts record it.
local function admit(job_type, tn)
  local function home()
    return queues_of(job_type)[1] or INGRESS_QUEUE
  end
  if total_cap then
    local total = total_waiting()
    if total >= total_cap then
      local wait = retry_after_ms(total - total_cap + 1, drain_rate_total())
      return 'max_queued_total\t' .. fmt(total) .. '\t' .. fmt(total_cap) .. '\t' .. fmt(wait)
             .. '\t', home()
    end
  end
  local tcount, tcap = 0, false
  if tenant_caps then
    tcount, tcap = tenant_state(tn)
    if tcap and tcount >= tcap then
      local wait = retry_after_ms(tcount - tcap + 1, drain_rate_total())
      return 'tenant_max_queued\t' .. fmt(tcount) .. '\t' .. fmt(tcap) .. '\t' .. fmt(wait)
             .. '\t', home()
    end
  end
  local chosen, refusal = nil, nil
  for _, q in ipairs(queue_caps and queues_of(job_type) or {}) do
    local count, cap, wait_ms = queue_state(q)
    local rate = drain_rate(q)
    if cap and count >= cap then
      refusal = refusal or ('queue_max_queued\t' .. fmt(count) .. '\t' .. fmt(cap) .. '\t'
                            .. fmt(retry_after_ms(count - cap + 1, rate)) .. '\t' .. q)
    elseif wait_ms and rate > 0 and (count + 1) * 1000 / rate > wait_ms then
      local est = (count + 1) * 1000 / rate
      refusal = refusal or ('queue_max_wait_s\t' .. fmt(est) .. '\t' .. fmt(wait_ms) .. '\t'
                            .. fmt(math.max(100, math.ceil(est - wait_ms))) .. '\t' .. q)
    else
      chosen = q
      break
    end
  end
  if refusal and not chosen then return refusal, home() end
  if chosen then queued[chosen] = queued[chosen] + 1 end
  if total_cap then waiting_total = waiting_total + 1 end
  if tenant_caps then tenant_waiting[tn] = tcount + 1 end
  return nil
end

-- -- the batch ----------------------------------------------------------------------------------

-- Reserve the batch's arrival sequence numbers in one step. A counter that is not a counter is
-- moved aside and starts again (arrival order then restarts with it).
local SEQ = prefix .. 'seq'
local seq = redis.pcall('INCRBY', SEQ, n)
if type(seq) == 'table' then
  move_aside(SEQ, redis.call('TYPE', SEQ)['ok'])
  seq = redis.call('INCRBY', SEQ, n)
end
seq = seq - n
local out = {}
local ingress = {}
local tenants = {}
local rejected = {}
for i = 0, n - 1 do
  local b = 5 + i * STRIDE
  local id, spec, idem = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  local tn = ARGV[b + 9]
  -- A retried submit (the reply to the first attempt was lost): that attempt's job stands,
  -- whatever state it has reached since.
  local retried = redis.call('EXISTS', jobkey(id)) == 1
  local existing = false
  local ikey = nil
  if idem ~= '' and not retried then
    ikey = prefix .. 'idem:' .. idem
    local other = kcall('GET', ikey)
    if other and redis.call('EXISTS', jobkey(other)) == 1 then existing = other end
  end
  local refusal, home = nil, nil
  if not retried and not existing then refusal, home = admit(ARGV[b + 8], tn) end
  if retried then
    out[#out + 1] = C_OK
    out[#out + 1] = id
    out[#out + 1] = ''
  elseif existing then
    out[#out + 1] = C_DUPLICATE
    out[#out + 1] = existing
    out[#out + 1] = ''
  elseif refusal then
    rejected[home] = (rejected[home] or 0) + 1
    out[#out + 1] = C_REJECTED
    out[#out + 1] = id
    out[#out + 1] = refusal
  else
    if ikey then redis.call('SET', ikey, id, 'PX', idem_ttl) end
    seq = seq + 1
    local deadline = tonumber(ARGV[b + 4]) or NO_DEADLINE
    local order = string.format('%04d%015d%015d', 9999 - tonumber(ARGV[b + 3]), deadline, seq)
    redis.call('HSET', jobkey(id), 'spec', spec, 'status', 'pending', 'created_ms', now,
               'order', order .. ':' .. id, 'due_ms', ARGV[b + 5], 'maxr', ARGV[b + 6],
               'rt', ARGV[b + 7], 'tn', tn)
    ingress[#ingress + 1] = seq
    ingress[#ingress + 1] = id
    tenants[tn] = (tenants[tn] or 0) + 1
    out[#out + 1] = C_OK
    out[#out + 1] = id
    out[#out + 1] = ''
  end
end
if #ingress > 0 then
  kcall_chunked('ZADD', INGRESS, ingress)
  for tn, c in pairs(tenants) do count_tenant(INGRESS_QUEUE, tn, c) end
  kcall('LPUSH', prefix .. 'ingress:signal', '1')
  redis.call('LTRIM', prefix .. 'ingress:signal', 0, 0)
end
for q, c in pairs(rejected) do incr(countskey(q), 'rejected', c) end
return {out, notices}
