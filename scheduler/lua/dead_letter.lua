--[[
  dead_letter: send jobs straight to the dead-letter set with a reason, from any unfinished state.
  Used for jobs no queue accepts and for records a reader found corrupt.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the dead record (and of a key moved aside)
  ARGV[3]  number of jobs N, then 2 values per job: id, error JSON
  Returns  {codes, notices}: one code per job: C_DEAD_LETTERED, C_ALREADY_FINISHED or C_NOT_FOUND
  A record without a usable status is taken out of every place it may be (the ingress, the
  delayed set, and its queue's sets when its queue is a queue name). A job key that is not a hash
  is moved aside and the job dead-lettered in a fresh record, with that reason instead of the
  given one (notices, see _common.lua). An error of type CorruptJob counts as a corrupt record.
  Events   the finish notice of every job dead-lettered, to the clients waiting on it.
]]
-- @include _common.lua

local now, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
NOW, DEAD_TTL = now, ttl
local out = {}
for i = 0, n - 1 do
  local id, reason = ARGV[4 + i * 2], ARGV[5 + i * 2]
  local rec, t = read_job(id, {'status', 'queue', 'order'})
  if rec == nil then
    out[#out + 1] = C_NOT_FOUND
  elseif rec == false then
    corrupt_key(id, t, false)
    out[#out + 1] = C_DEAD_LETTERED
  elseif rec.status and FINISHED[rec.status] then
    out[#out + 1] = C_ALREADY_FINISHED
  else
    local s = rec.status
    if not (s and STATUSES[s]) then s = 'unknown' end
    local q = is_queue_name(rec.queue) and rec.queue or false
    if s == 'pending' then q = false end
    local member = is_order(rec.order, id) and rec.order or false
    dead_letter(id, s, q, member, reason, now, ttl)
    local ok, e = pcall(cjson.decode, reason)
    if ok and type(e) == 'table' and e.type == 'CorruptJob' then count_corrupt('records') end
    out[#out + 1] = C_DEAD_LETTERED
  end
end
return {out, notices}
