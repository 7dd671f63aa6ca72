--[[
  complete: record the results of jobs and finish them. Idempotent: the first result stands.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the finished record and its result
  ARGV[3]  number of jobs N, then 3 values per job: id, lease token, result JSON
  Returns  one code per job
           C_OK                result stored, job succeeded
           C_ALREADY_FINISHED  the job finished before (a second completion): refused
           C_STALE_LEASE       another lease of the job is current: refused
           C_NOT_FOUND         no such job (or its record expired)
  A lease that expired is still honoured while the job waits for its next lease (same token):
  the work is done, and running it again would only repeat it.
  Events   the job id in the inbox of every client waiting on it.
]]
-- @include _common.lua

local now, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local released = {}
local completed = {}
for i = 0, n - 1 do
  local b = 4 + i * 3
  local id, token = ARGV[b], tonumber(ARGV[b + 1])
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'attempts', 'queue', 'order', 'w')
  if not f[1] then
    out[#out + 1] = C_NOT_FOUND
  elseif FINISHED[f[1]] then
    out[#out + 1] = C_ALREADY_FINISHED
  elseif tonumber(f[2]) ~= token or f[1] == 'pending' then
    out[#out + 1] = C_STALE_LEASE
  else
    if f[1] == 'running' then
      local r = released[f[3]]
      if not r then r = {}; released[f[3]] = r end
      r[#r + 1] = id
    else
      detach(id, f[1], f[3], f[4])
    end
    completed[f[3]] = (completed[f[3]] or 0) + 1
    finish(id, 'succeeded', now, ttl, f[5], ARGV[b + 2])
    out[#out + 1] = C_OK
  end
end
for q, ids in pairs(released) do call_chunked('ZREM', leasedkey(q), ids) end
for q, c in pairs(completed) do redis.call('HINCRBY', countskey(q), 'completed', c) end
return out
