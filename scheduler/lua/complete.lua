--[[
  complete: record the results of jobs and finish them. Idempotent: the first result stands.

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of the finished record and its result (and of a key moved aside)
  ARGV[3]  recording cap: about this many entries are kept in the recording (see record in
           _common.lua); 0: do not record
  ARGV[4]  number of jobs N, then 6 values per job: id, lease token, result JSON, and for the
           recording: the run microseconds the worker measured, tokens in, tokens out ('' when
           unknown)
  Returns  {codes, notices}: one code per job
           C_OK                result stored, job succeeded
           C_ALREADY_FINISHED  the job finished before (a second completion): refused
           C_STALE_LEASE       another lease of the job is current: refused
           C_NOT_FOUND         no such job (or its record expired)
           C_CORRUPT           the record is not a hash, or its status, attempts, queue or order
                               is missing or garbled: dead-lettered (CorruptJob) instead
           notices: what was settled (see _common.lua).
  A lease that expired is still honoured while the job waits for its next lease (same token):
  the work is done, and running it again would only repeat it.
  Counts   per queue: 'completed' (Keys.counts); the completion time, queue wait and SLO outcome
           of each job (Keys.timing) and its tenant's usage (Keys.tenant_usage), one HINCRBY per
           distinct field per call.
  Events   the job id in the inbox of every client waiting on it; one recording entry per job
           completed (when ARGV[3] > 0).
]]
-- @include _common.lua

local now, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
NOW, DEAD_TTL = now, ttl
RECORD_LEN = tonumber(ARGV[3]) or 0
local out = {}
local released = {}
local completed = {}
local names = {'status', 'attempts', 'queue', 'order', 'w', 'qt', 'created_ms', 'started_ms', 'rt'}
-- Read in the same call for the counting only; a record missing them still completes.
local counted = {'created_ms', 'started_ms', 'rt'}
local accept = {running = true, queued = true, delayed = true, retrying = true}
for i = 0, n - 1 do
  local b = 5 + i * 6
  local id, token = ARGV[b], tonumber(ARGV[b + 1])
  -- Before the judging: a record found corrupt here is dead-lettered, and recorded as run.
  RUN_US, TOKENS_IN, TOKENS_OUT = ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local rec, refused = reported(id, names, token, accept, counted)
  if not rec then
    out[#out + 1] = refused
  else
    local q = rec.queue
    if rec.status == 'running' then
      local r = released[q]
      if not r then r = {}; released[q] = r end
      r[#r + 1] = id
      end_lease(id, q, rec.qt)
    else
      detach(id, rec.status, q, rec.order)
    end
    completed[q] = (completed[q] or 0) + 1
    observe_succeeded(q, rec, now)
    finish(id, 'succeeded', now, ttl, rec.w, ARGV[b + 2])
    out[#out + 1] = C_OK
  end
end
for q, ids in pairs(released) do
  kcall_chunked('ZREM', leasedkey(q), ids)
end
for q, c in pairs(completed) do incr(countskey(q), 'completed', c) end
flush_observed()
return {out, notices}
