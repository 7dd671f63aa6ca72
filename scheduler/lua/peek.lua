--[[
  peek: the oldest jobs of the ingress with what level 1 needs to route them; entries that cannot
  be routed are settled on the way, so one bad record never holds up the jobs behind it.

  KEYS[1]  namespace prefix
  ARGV[1]  at most this many jobs
  ARGV[2]  skip this many sound jobs first (they are still in the ingress: the caller has them)
  ARGV[3]  now_ms
  ARGV[4]  TTL in ms of a record dead-lettered as corrupt (and of a key moved aside)
  Returns  {jobs, notices}: jobs is a flat array, 4 entries per sound pending job: id, routing
           view JSON (false if missing), created_ms, and the spec JSON only when the routing view
           is missing (else false), so the router never carries payloads it does not need.
           notices: (kind, subject, detail) triples of what was settled (see _common.lua).
  Settled  a job key that is not a hash: moved aside, the job dead-lettered in a fresh record; a
           record with a missing or garbled status, order, created_ms, due_ms or maxr, or whose
           status puts it somewhere it is not: dead-lettered (CorruptJob, with the reason) into
           the '~ingress' dead set; an entry whose job is gone or really elsewhere, or that names
           no job: dropped. An ingress key that is not a sorted set, or an ingress signal key that
           is not a list (submit.lua pushes to it, and the router blocks on it), is moved aside.
           The routing view's content is judged by the caller (Store.pending), which dead-letters
           what fails. At most 10 x ARGV[1] entries are looked at per call, bounding its time.
  Events   the finish notice of every job dead-lettered here, to the clients waiting on it.
]]
-- @include _common.lua

local limit, skip = tonumber(ARGV[1]), tonumber(ARGV[2])
NOW, DEAD_TTL = tonumber(ARGV[3]), tonumber(ARGV[4])
local names = {'status', 'queue', 'order', 'rt', 'created_ms', 'due_ms', 'maxr'}
local out = {}
local found, budget = 0, 10 * limit
-- The router blocks on the signal list right after this read.
kcall('LLEN', INGRESS .. ':signal')
while found < limit and budget > 0 do
  local want = math.min(limit - found, budget)
  local ids = kcall('ZRANGE', INGRESS, skip + found, skip + found + want - 1)
  if #ids == 0 then break end
  budget = budget - #ids
  for _, id in ipairs(ids) do
    local rec = judge(id, INGRESS, 'pending', false, names)
    if rec then
      found = found + 1
      out[#out + 1] = id
      out[#out + 1] = rec.rt
      out[#out + 1] = rec.created_ms
      if rec.rt then
        out[#out + 1] = false
      else
        out[#out + 1] = redis.call('HGET', jobkey(id), 'spec')
      end
    else
      redis.call('ZREM', INGRESS, id)
    end
  end
end
return {out, notices}
