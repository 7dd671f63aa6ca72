--[[
  submit: put a batch of new jobs into the ingress for level 1.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  idempotency-key TTL in ms
  ARGV[3]  '1': refuse the batch when no router serves the namespace (see _served.lua), '0': don't
  ARGV[4]  number of jobs N, then 8 values per job:
           id, spec JSON, idempotency key ('' = none), priority, deadline_ms ('' = none),
           due_ms (not before), max_retries, routing view JSON (what level 1 reads: no payload)
  Returns  {reply, notices} (notices: keys of the wrong type moved aside, see _common.lua).
           reply is {C_NO_SERVICE} alone when refused for want of a router (nothing written);
           else a flat array, 2 entries per job: code, job id
           C_OK        created; the id is the given one. Also when a job of that id exists already:
                       ids are random per submission, so that is this submission's own earlier
                       attempt (a retry after a lost reply), which must not make a second job
           C_DUPLICATE the idempotency key is taken; the id is the existing job's
  Events   one token on the ingress signal list, so a blocked router wakes.
]]
-- @include _common.lua
-- @include _served.lua

local now = tonumber(ARGV[1])
local idem_ttl = tonumber(ARGV[2])
NOW, DEAD_TTL = now, idem_ttl
if ARGV[3] == '1' and not router_served() then return {{C_NO_SERVICE}, notices} end
local n = tonumber(ARGV[4])
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
for i = 0, n - 1 do
  local b = 5 + i * 8
  local id, spec, idem = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  -- A retried submit (the reply to the first attempt was lost): that attempt's job stands,
  -- whatever state it has reached since.
  local retried = redis.call('EXISTS', jobkey(id)) == 1
  local existing = false
  if idem ~= '' and not retried then
    local ikey = prefix .. 'idem:' .. idem
    local other = kcall('GET', ikey)
    if other and redis.call('EXISTS', jobkey(other)) == 1 then
      existing = other
    else
      redis.call('SET', ikey, id, 'PX', idem_ttl)
    end
  end
  if retried then
    out[#out + 1] = C_OK
    out[#out + 1] = id
  elseif existing then
    out[#out + 1] = C_DUPLICATE
    out[#out + 1] = existing
  else
    seq = seq + 1
    local deadline = tonumber(ARGV[b + 4]) or NO_DEADLINE
    local order = string.format('%04d%015d%015d', 9999 - tonumber(ARGV[b + 3]), deadline, seq)
    redis.call('HSET', jobkey(id), 'spec', spec, 'status', 'pending', 'created_ms', now,
               'order', order .. ':' .. id, 'due_ms', ARGV[b + 5], 'maxr', ARGV[b + 6],
               'rt', ARGV[b + 7])
    ingress[#ingress + 1] = seq
    ingress[#ingress + 1] = id
    out[#out + 1] = C_OK
    out[#out + 1] = id
  end
end
if #ingress > 0 then
  kcall_chunked('ZADD', INGRESS, ingress)
  kcall('LPUSH', prefix .. 'ingress:signal', '1')
  redis.call('LTRIM', prefix .. 'ingress:signal', 0, 0)
end
return {out, notices}
