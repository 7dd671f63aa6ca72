--[[
  release: hand leased jobs back to their queue unfinished, without charging the attempt: the
  worker is leaving (drain on reassignment or scale-down), the job did nothing wrong.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  number of jobs N, then 2 values per job: id, lease token
  Returns  one code per job: C_OK (queued again, at its old place), C_STALE_LEASE,
           C_ALREADY_FINISHED or C_NOT_FOUND
  The lease token stays spent (attempts is not decremented), so a late report from the releasing
  worker is refused; 'released' counts the attempts not charged against max_retries.
  Events   one token on the signal list of every queue that got a job back.
]]
-- @include _common.lua

local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local touched = {}
for i = 0, n - 1 do
  local id, token = ARGV[3 + i * 2], tonumber(ARGV[4 + i * 2])
  local k = jobkey(id)
  local f = redis.call('HMGET', k, 'status', 'attempts', 'queue', 'order')
  local refused = lease_refusal(f[1], f[2], token)
  if refused then
    out[#out + 1] = refused
  else
    redis.call('ZREM', leasedkey(f[3]), id)
    redis.call('HINCRBY', k, 'released', 1)
    push_queued(id, f[3], now, f[4])
    touched[f[3]] = true
    out[#out + 1] = C_OK
  end
end
for q, _ in pairs(touched) do signal_queue(q) end
return out
