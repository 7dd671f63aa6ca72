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
  Fair share (ADMISSION 'fair' = '1'): the queue's virtual time advances to the largest tag
           leased (policies.fairshare), and a tenant whose last tag it reaches is forgotten.
  Quotas   (ADMISSION 'quotas' = '1'): a job whose tenant already has its quota of jobs in
           flight (INFLIGHT, namespace-wide) is passed over and stays queued; the lease looks at
           most N + QUOTA_LOOKAHEAD members from the head, so it stays O(N). A leased job of a
           tenant with a quota is counted in INFLIGHT and marked ('qt') until its lease ends
           (end_lease).
  Counted  the tenant counts of the queue, -1 per leased job.
  Events   when jobs remain after a lease that took N jobs (or, without quotas, any), one token
           on the queue's signal list, so the next idle worker wakes too; the finish notice of
           every job dead-lettered here. A lease held back by quotas alone signals nothing: the
           lease end that frees a slot signals the queue.
]]
-- @include _common.lua

local q, now, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
NOW, DEAD_TTL = now, tonumber(ARGV[5])
local QUOTA_LOOKAHEAD = 64
local aconf = kcall('HMGET', ADMISSION, 'fair', 'quotas', 'tqd')
local fair, quotas = aconf[1] == '1', aconf[2] == '1'
local default_quota = tonumber(aconf[3])
-- Members from the head, with the stride of the reply: all scores are 0, so the lowest-scored
-- members are the lexicographically first. Without quotas they are popped at once; with them
-- they are read and removed one by one, since a member may have to stay.
local popped, stride
if quotas then
  popped, stride = kcall('ZRANGE', qkey(q), 0, n + QUOTA_LOOKAHEAD - 1), 1
else
  popped, stride = kcall('ZPOPMIN', qkey(q), n), 2
end
if #popped == 0 then
  -- An idle worker blocks on the signal list right after a lease that found nothing.
  kcall('LLEN', qsignalkey(q))
  return {{}, notices}
end
local quota_of, in_flight = {}, {}
local function over_quota(tn)
  local quota = quota_of[tn]
  if quota == nil then
    quota = tonumber(kcall('HGET', ADMISSION, 'tq:' .. tn)) or default_quota or false
    quota_of[tn] = quota
    in_flight[tn] = quota and (tonumber(kcall('HGET', INFLIGHT, tn)) or 0) or 0
  end
  return quota and in_flight[tn] >= quota
end
local out, ids, leased, removed = {}, {}, {}, {}
-- A job's second member in one batch is stale (its lease is not in the lease set yet).
local taken = {}
local until_ms = now + lease_ms
local names = {'status', 'queue', 'order', 'spec', 'started_ms', 'attempts', 'maxr', 'tn'}
local left, counted = {}, {}
local vmax = 0
local held = false
for i = 1, #popped, stride do
  if #leased >= 2 * n then break end
  local member = popped[i]
  local id = string.sub(member, ORDER_HEAD + 1)
  local rec = nil
  if taken[id] then
    notice('dropped', qkey(q), member .. ': a second member of a job leased now')
    removed[#removed + 1] = member
  else
    -- Popped already: settling it has nothing left to remove from the queue itself. A member
    -- with a garbled order part still names its job: the record (its own order) decides.
    rec = judge(id, qkey(q), 'queued', q, names)
    if not rec then
      ids[#ids + 1] = id
      removed[#removed + 1] = member
    end
  end
  local tn = rec and (rec.tn or '')
  if rec and quotas and over_quota(tn) then
    held = true
    rec = nil
  elseif rec then
    ids[#ids + 1] = id
    removed[#removed + 1] = member
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
    if quotas and quota_of[tn] then
      in_flight[tn] = in_flight[tn] + 1
      counted[tn] = (counted[tn] or 0) + 1
      redis.call('HSET', k, 'qt', tn)
    end
    if rec.tn then left[rec.tn] = (left[rec.tn] or 0) + 1 end
    if fair then vmax = math.max(vmax, tonumber(string.sub(member, 20, ORDER_HEAD - 1)) or 0) end
    leased[#leased + 1] = until_ms
    leased[#leased + 1] = id
    out[#out + 1] = id
    out[#out + 1] = token
    out[#out + 1] = rec.spec
  end
end
if quotas and #removed > 0 then kcall_chunked('ZREM', qkey(q), removed) end
if #ids > 0 then kcall_chunked('ZREM', qagekey(q), ids) end
if #leased > 0 then kcall_chunked('ZADD', leasedkey(q), leased) end
for tn, c in pairs(left) do count_tenant(q, tn, -c) end
for tn, c in pairs(counted) do kcall('HINCRBY', INFLIGHT, tn, c) end
if fair and #leased > 0 then
  local fk = fairkey(q)
  local v = tonumber(kcall('HGET', fk, '~v')) or 0
  if vmax > v then
    v = vmax
    redis.call('HSET', fk, '~v', string.format('%d', v))
  end
  -- A tenant whose last tag the virtual time has reached has nothing queued ahead of it: its
  -- entry would change no future tag (max(v, last) = v), so the hash keeps active tenants only.
  for tn, _ in pairs(left) do
    local last = tonumber(redis.call('HGET', fk, tn))
    if last and last <= v then redis.call('HDEL', fk, tn) end
  end
end
if redis.call('ZCARD', qkey(q)) > 0 and (not held or #leased >= 2 * n) then signal_queue(q) end
return {out, notices}
