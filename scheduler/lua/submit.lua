--[[
  submit: put a batch of new jobs into the ingress for level 1.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  idempotency-key TTL in ms
  ARGV[3]  number of jobs N, then 8 values per job:
           id, spec JSON, idempotency key ('' = none), priority, deadline_ms ('' = none),
           due_ms (not before), max_retries, routing view JSON (what level 1 reads: no payload)
  Returns  a flat array, 2 entries per job: code, job id
           C_OK        created; the id is the given one
           C_DUPLICATE the idempotency key is taken; the id is the existing job's
  Events   one token on the ingress signal list, so a blocked router wakes.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
local idem_ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}
local created = 0
for i = 0, n - 1 do
  local b = 4 + i * 8
  local id, spec, idem = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  local existing = false
  if idem ~= '' then
    local ikey = prefix .. 'idem:' .. idem
    local other = redis.call('GET', ikey)
    if other and redis.call('EXISTS', jobkey(other)) == 1 then
      existing = other
    else
      redis.call('SET', ikey, id, 'PX', idem_ttl)
    end
  end
  if existing then
    out[#out + 1] = C_DUPLICATE
    out[#out + 1] = existing
  else
    local seq = redis.call('INCR', prefix .. 'seq')
    local fields = {'spec', spec, 'status', 'pending', 'attempts', 0, 'created_ms', now,
                    'prio', ARGV[b + 3], 'seq', seq, 'due_ms', ARGV[b + 5], 'maxr', ARGV[b + 6],
                    'rt', ARGV[b + 7]}
    if ARGV[b + 4] ~= '' then
      fields[#fields + 1] = 'deadline_ms'
      fields[#fields + 1] = ARGV[b + 4]
    end
    redis.call('HSET', jobkey(id), unpack(fields))
    redis.call('ZADD', INGRESS, seq, id)
    created = created + 1
    out[#out + 1] = C_OK
    out[#out + 1] = id
  end
end
if created > 0 then
  redis.call('LPUSH', prefix .. 'ingress:signal', '1')
  redis.call('LTRIM', prefix .. 'ingress:signal', 0, 0)
end
return out
