--[[
  release: hand leased jobs back to their queue unfinished, without charging the attempt: the
  worker is leaving (drain on reassignment or scale-down), the job did nothing wrong.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a record dead-lettered as corrupt (and of a key moved aside)
  ARGV[3]  number of jobs N, then 2 values per job: id, lease token
  Returns  {codes, notices}: one code per job: C_OK (queued again, at its old place),
           C_STALE_LEASE, C_ALREADY_FINISHED, C_NOT_FOUND, or C_CORRUPT (the record is not a
           hash, or its status, attempts, queue, order or released is missing or garbled:
           dead-lettered, CorruptJob, instead). notices: what was settled (see _common.lua).
  The lease token stays spent (attempts is not decremented), so a late report from the releasing
  worker is refused; 'released' counts the attempts not charged against max_retries.
  Events   one token on the signal list of every queue that got a job back.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}
local touched = {}
local names = {'status', 'attempts', 'queue', 'order', 'released'}
local accept = {running = true}
for i = 0, n - 1 do
  local id, token = ARGV[4 + i * 2], tonumber(ARGV[5 + i * 2])
  local rec, refused = reported(id, names, token, accept)
  if not rec then
    out[#out + 1] = refused
  else
    local q = rec.queue
    zrem(leasedkey(q), id)
    end_lease(id, false)
    redis.call('HSET', jobkey(id), 'released', (tonumber(rec.released) or 0) + 1)
    push_queued(id, q, now, rec.order)
    touched[q] = true
    out[#out + 1] = C_OK
  end
end
for q, _ in pairs(touched) do signal_queue(q) end
return {out, notices}
