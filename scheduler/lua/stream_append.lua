--[[
  stream_append: append the chunks a streaming job yielded to its stream, under the worker's lease.
  Idempotent per chunk: a retried call (its reply lost in an outage) skips the chunks of this
  attempt already in the stream, so none is appended twice.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the stream (the result TTL: a stream whose job never finishes expires this
           long after its last append; the finish gives it the record's TTL), and of a record
           dead-lettered as corrupt or a key moved aside
  ARGV[3]  the cap: entries kept, about (XADD MAXLEN ~: whole nodes are trimmed, oldest first)
  ARGV[4]  job id
  ARGV[5]  lease token (the attempt number)
  ARGV[6]  index within this attempt of the first chunk below (0 for an attempt's first)
  ARGV[7]  number of chunks N, then N chunk JSON texts
  Returns  {code, notices}:
           C_OK                appended
           C_CANCEL_REQUESTED  the job was cancelled: nothing appended; stop the generator, report
           C_STALE_LEASE       this lease is no longer the job's current one (it expired and the
                               job moved on): nothing appended; stop, do not report
           C_ALREADY_FINISHED, C_NOT_FOUND  nothing appended; stop, do not report
           C_CORRUPT           the record is not a hash, or its status, attempts or queue is
                               missing or garbled: dead-lettered (CorruptJob), its stream ended
           notices: what was settled (see _common.lua); a stream key of the wrong type is moved
           aside first.
  Entries  fields of each entry of Keys.stream(job id):
           chunk     a = attempt, n = index within the attempt, c = chunk JSON
           restart   a = attempt, r = '1': before the first chunk of an attempt when an earlier
                     attempt had streamed; what a reader had of the earlier one is void
           end       a = attempt, e = status (succeeded, dead, cancelled): written by finish
                     (_common.lua), the stream's last entry
  Record   'sa': the attempt whose chunks the stream holds; 'sn': how many it appended; 'sw' = '1':
           the job has a stream (finish ends it).
]]
-- @include _common.lua

local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
NOW, DEAD_TTL = now, ttl
local id, token, first, n = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rec, refused = reported(
  id, {'status', 'attempts', 'queue', 'cancel', 'sa', 'sn'}, token, {running = true})
if not rec then return {refused, notices} end
if rec.cancel == '1' then return {C_CANCEL_REQUESTED, notices} end
local sk = streamkey(id)
-- The stream fields are the stream's own bookkeeping: garbled, they count as absent (the job
-- itself is sound) and the worst outcome is one restart entry too many.
local sa = is_uint(rec.sa) and tonumber(rec.sa) or nil
local appended = 0
if sa == token then
  appended = is_uint(rec.sn) and tonumber(rec.sn) or 0
elseif rec.sa then
  kcall('XADD', sk, 'MAXLEN', '~', cap, '*', 'a', token, 'r', '1')
end
-- Chunks below `appended` are in the stream already (a retried call); a gap cannot arise from a
-- worker sending in order, and would be appended as sent.
local skip = math.max(0, appended - first)
for i = 1 + skip, n do
  kcall('XADD', sk, 'MAXLEN', '~', cap, '*', 'a', token, 'n', first + i - 1, 'c', ARGV[7 + i])
end
redis.call('HSET', jobkey(id), 'sa', token, 'sn', math.max(appended, first + n), 'sw', '1')
if ttl > 0 then redis.call('PEXPIRE', sk, ttl) end
return {C_OK, notices}
