--[[
  purge: delete dead-lettered jobs, each record with its dead-letter entries in one step. Only a
  dead job is deleted (or one whose record cannot be read: not a hash, no usable status); a live
  job is never touched, whatever index names it.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a key moved aside
  ARGV[3]  'ids' or 'all'
  'ids':   ARGV[4] number of jobs N, then N job ids
           Returns {reply, notices}: 2 values per job, a code and a reason ('' for none):
           C_OK            deleted (with every dead-letter entry naming it); also when only a
                           dead-letter entry was left of it (its record had expired)
           C_NOT_FOUND     no record and no dead-letter entry: nothing to delete
           C_WRONG_STATE   not dead-lettered (the reason says its status): nothing deleted
  'all':   ARGV[4] queue, '' for every dead-letter set; ARGV[5] cutoff ms: only jobs that died at
           or before it; ARGV[6] most entries to settle in this call
           Returns {{deleted, dropped, more}, notices}: records deleted, entries dropped whose
           job is gone or alive elsewhere, and 1 when the limit stopped it (call again).
           The oldest entries go first; a job that dies after the cutoff is kept, so a purge
           that runs while jobs die ends.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[2])
local mode = ARGV[3]

local function dead_sets(only)
  if only and only ~= '' then return {deadkey(only)} end
  local keys = {}
  local names = {}
  for _, q in ipairs(kcall('SMEMBERS', QUEUES)) do
    if is_queue_name(q) then names[#names + 1] = q end
  end
  table.sort(names)
  for _, q in ipairs(names) do keys[#keys + 1] = deadkey(q) end
  keys[#keys + 1] = deadkey(INGRESS_QUEUE)
  return keys
end

-- Whether a record (fields status and queue read) may be deleted by a purge: it is dead, or it
-- cannot be read (then only when a dead-letter set names it).
local function deletable(rec)
  if rec == false then return 'unreadable' end
  if rec.status == 'dead' then return 'dead' end
  if not rec.status or not STATUSES[rec.status] then return 'unreadable' end
  return nil
end

local function delete_job(id)
  redis.call('DEL', jobkey(id), waiterskey(id))
end

if mode == 'ids' then
  local n = tonumber(ARGV[4])
  local out = {}
  local all_sets = nil
  for i = 1, n do
    local id = ARGV[4 + i]
    local rec, t = read_job(id, {'status', 'queue'})
    -- The dead-letter sets naming it: its own queue's (or the ingress's) first, else all.
    local holders = {}
    if rec then
      local own = deadkey(is_queue_name(rec.queue) and rec.queue or INGRESS_QUEUE)
      if kcall('ZSCORE', own, id) then holders[1] = own end
    end
    if #holders == 0 then
      all_sets = all_sets or dead_sets(nil)
      for _, key in ipairs(all_sets) do
        if kcall('ZSCORE', key, id) then holders[#holders + 1] = key end
      end
    end
    local kind = rec ~= nil and deletable(rec) or nil
    if rec == nil then
      if #holders == 0 then
        out[#out + 1] = C_NOT_FOUND
        out[#out + 1] = 'no such job'
      else
        for _, key in ipairs(holders) do redis.call('ZREM', key, id) end
        out[#out + 1] = C_OK
        out[#out + 1] = 'only its dead-letter entry was left'
      end
    elseif kind == 'dead' or (kind == 'unreadable' and #holders > 0) then
      for _, key in ipairs(holders) do redis.call('ZREM', key, id) end
      delete_job(id)
      out[#out + 1] = C_OK
      out[#out + 1] = ''
    else
      out[#out + 1] = C_WRONG_STATE
      if kind == 'unreadable' then
        out[#out + 1] = rec == false and ('job record is a ' .. t .. ', not a hash, and no '
          .. 'dead-letter set names it') or 'job record has no usable status, and no '
          .. 'dead-letter set names it'
      else
        out[#out + 1] = 'the job is ' .. rec.status .. ', not in the dead-letter set'
      end
    end
  end
  return {out, notices}
end

-- mode 'all'
local cutoff, limit = ARGV[5], tonumber(ARGV[6])
local deleted, dropped, left = 0, 0, limit
for _, key in ipairs(dead_sets(ARGV[4])) do
  if left <= 0 then break end
  local ids = kcall('ZRANGEBYSCORE', key, '-inf', cutoff, 'LIMIT', 0, left)
  for _, id in ipairs(ids) do
    left = left - 1
    redis.call('ZREM', key, id)
    local rec = nil
    if is_id(id) then rec = read_job(id, {'status', 'queue'}) end
    if rec ~= nil and deletable(rec) then
      delete_job(id)
      deleted = deleted + 1
    else
      dropped = dropped + 1
      notice('dropped', key, id .. (rec and ': the job is alive elsewhere' or ': no such job'))
    end
  end
end
return {{deleted, dropped, left <= 0 and 1 or 0}, notices}
