--[[
  jobs: one page of a listing of jobs, read from the store's own indexes (never a scan of the
  job keys).

  KEYS[1]  namespace prefix
  ARGV[1]  now_ms
  ARGV[2]  TTL in ms of a key moved aside
  ARGV[3]  'newest' (highest index score first) or 'oldest'
  ARGV[4]  most jobs to return
  ARGV[5]  most index entries to examine (the cost bound of one page when filters skip entries)
  ARGV[6]  status filter, '' for every status
  ARGV[7]  queue filter, '' for every queue ('~ingress': jobs that died or were cancelled before
           they were routed)
  ARGV[8]  tenant filter, '' for any tenant
  ARGV[9]  cursor: the section to start in ('' from the first), then ARGV[10] the index score and
           ARGV[11] the member of the last entry examined (the page starts after it)
  Sections, in this order, each a merge of its indexes by score (ties by member, bytewise):
           1 pending   the ingress                    scored by submit sequence
           2 queued    qage:<q> per queue              by enqueue ms
           3 running   leased:<q> per queue            by lease deadline ms
           4 delayed   the delayed set (delayed and retrying jobs)   by due ms
           5 dead      dead:<q> per queue and ~ingress by the ms the job died
           6 finished  done:<q> per queue and ~ingress (succeeded, cancelled): lists, newest at
                       the head, read one queue after another (by name, ~ingress last)
  Returns  {reply, notices}: reply is {section, score, member} of the last entry examined (the
           cursor of the next page; section false when every section is done; in the finished
           section the score is the queue of the list), then 15 values
           per job: id, section, index score, status, queue, attempts, maxr, released,
           created_ms, started_ms, finished_ms, routing view JSON, error summary JSON (type and
           message, the message cut), cancel flag, and '' or the reason the record is unreadable.
  Judged   an entry is listed when its record is where the entry says (a record that is not a
           hash, or has no usable status, is listed with the reason, so it can be purged). In
           the ingress, queues, lease sets and the delayed set an entry whose job is elsewhere or
           gone is skipped (the transitions settle those); in the dead and finished sets it is
           dropped, as are entries that name no job (notices, see _common.lua).
  Cost     per page: O(k log^2 N) to find the cursor's place in each of the k indexes of its
           section (O(N) in a finished list, N at most keys.FINISHED_INDEX_LEN), then O(log N)
           per entry examined, at most ARGV[5] entries and ARGV[4] rows.
]]
-- @include _common.lua

local now = tonumber(ARGV[1])
NOW, DEAD_TTL = now, tonumber(ARGV[2])
local rev = ARGV[3] == 'newest'
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local status_filter, queue_filter, tenant_filter = ARGV[6], ARGV[7], ARGV[8]
local cursor_section = tonumber(ARGV[9])
local cursor_score, cursor_member = ARGV[10], ARGV[11]

-- Sections: name, the statuses listed from it, whether stale entries are dropped from it.
local SECTIONS = {
  {name = 'pending', statuses = {pending = true}},
  {name = 'queued', statuses = {queued = true}},
  {name = 'running', statuses = {running = true}},
  {name = 'delayed', statuses = {delayed = true, retrying = true}},
  {name = 'dead', statuses = {dead = true}, drop = true},
  {name = 'finished', statuses = {succeeded = true, cancelled = true}, drop = true, list = true},
}

local queues = {}
if queue_filter ~= '' then
  queues[1] = queue_filter
else
  for _, q in ipairs(kcall('SMEMBERS', QUEUES)) do
    if is_queue_name(q) then queues[#queues + 1] = q end
  end
  table.sort(queues)
end

-- The index keys of a section, under the queue filter.
local function section_keys(name)
  local keys = {}
  if name == 'pending' then
    if queue_filter == '' then keys[1] = INGRESS end
  elseif name == 'delayed' then
    if queue_filter ~= INGRESS_QUEUE then keys[1] = DELAYED end
  else
    local build = {queued = qagekey, running = leasedkey, dead = deadkey}
    local with_ingress = name == 'dead'
    for _, q in ipairs(queues) do
      if q ~= INGRESS_QUEUE or with_ingress then keys[#keys + 1] = build[name](q) end
    end
    if with_ingress and queue_filter == '' then keys[#keys + 1] = build[name](INGRESS_QUEUE) end
  end
  return keys
end

-- Bytewise comparison (Lua's own compares by the server's locale; a sorted set by bytes).
local function bytes_cmp(a, b)
  if a == b then return 0 end
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y and -1 or 1 end
  end
  return #a < #b and -1 or 1
end

-- Whether entry (score a, member m) comes before (score b, member n) in the listing's order.
local function before(a, m, b, n)
  local x, y = tonumber(a) or 0, tonumber(b) or 0
  if x ~= y then
    if rev then return x > y end
    return x < y
  end
  local c = bytes_cmp(m, n)
  if rev then return c > 0 end
  return c < 0
end

local function range(key, from, to)
  if rev then return kcall('ZREVRANGE', key, from, to, 'WITHSCORES') end
  return kcall('ZRANGE', key, from, to, 'WITHSCORES')
end

-- The rank (in the listing's direction) of the first entry of `key` after (score, member): the
-- entries of that score are found by count, then the member among them by binary search, so a
-- cursor whose own entry has left the index still finds its place exactly.
local function seek(key, score, member)
  local ahead
  if rev then
    ahead = kcall('ZCOUNT', key, '(' .. score, '+inf')
  else
    ahead = kcall('ZCOUNT', key, '-inf', '(' .. score)
  end
  local lo, hi = ahead, ahead + kcall('ZCOUNT', key, score, score)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local got = range(key, mid, mid)[1]
    if not got or before(score, member, score, got) then hi = mid else lo = mid + 1 end
  end
  return lo
end

-- A buffered reader of one index from a start rank.
local BATCH = 64
local function reader(key, start)
  return {key = key, rank = start, buf = {}, pos = 1, done = false}
end
local function head(r)
  if r.pos > #r.buf and not r.done then
    r.buf = range(r.key, r.rank, r.rank + BATCH - 1)
    r.pos = 1
    r.rank = r.rank + #r.buf / 2
    if #r.buf < BATCH * 2 then r.done = true end
  end
  if r.pos > #r.buf then return nil end
  return r.buf[r.pos], r.buf[r.pos + 1]
end

local FIELDS = {'status', 'queue', 'attempts', 'maxr', 'released', 'created_ms', 'started_ms',
                'finished_ms', 'rt', 'error', 'cancel'}
-- What judging an entry needs; the rest is read only for the rows listed.
local JUDGED = {'status', 'queue', 'rt'}
local REST = {'attempts', 'maxr', 'released', 'created_ms', 'started_ms', 'finished_ms', 'error',
              'cancel'}
local ERROR_MESSAGE_BYTES = 300

-- A short error JSON (type, message cut) for a listing row; false when there is none. The
-- traceback (the bulk of a worker's error, last in what the store writes) is cut off unread.
local function error_summary(text)
  if not text then return false end
  local cut = string.find(text, ',"traceback":', 1, true)
  if cut then text = string.sub(text, 1, cut - 1) .. '}' end
  local ok, e = pcall(cjson.decode, text)
  if not (ok and type(e) == 'table' and type(e.type) == 'string') then
    return '!' .. string.sub(text, 1, ERROR_MESSAGE_BYTES)
  end
  local message = type(e.message) == 'string' and e.message or ''
  return '{"type":' .. cjson.encode(e.type) .. ',"message":'
    .. cjson.encode(string.sub(message, 1, ERROR_MESSAGE_BYTES)) .. '}'
end

local function tenant_of(rt)
  if not rt then return nil end
  local ok, v = pcall(cjson.decode, rt)
  if ok and type(v) == 'table' and type(v.n) == 'string' then return v.n end
  return nil
end

local rows = {}
local listed = 0
local drops = {}

-- Judge entry `id` of index `key` in section `sec`; add its row when it is listed.
local function examine(sec, key, id, score)
  if not is_id(id) then
    if sec.drop then drops[#drops + 1] = {key, id, 'not a job id', sec.list} end
    return
  end
  local k = jobkey(id)
  local f = redis.pcall('HMGET', k, unpack(JUDGED))
  local rec, unreadable = {}, ''
  if f.err then
    unreadable = 'job record is a ' .. redis.call('TYPE', k)['ok'] .. ', not a hash'
    f = {}
  end
  for i, name in ipairs(JUDGED) do rec[name] = f[i] or false end
  local s = rec.status
  if unreadable == '' then
    if not s then
      if redis.call('EXISTS', k) == 0 then
        if sec.drop then drops[#drops + 1] = {key, id, 'no such job', sec.list} end
        return
      end
      unreadable = 'job record has no status'
    elseif not STATUSES[s] then
      unreadable = "job record has an unknown status '" .. printable(s) .. "'"
    elseif not sec.statuses[s] then
      -- The job is elsewhere: listed there, not here.
      if sec.drop then drops[#drops + 1] = {key, id, 'the job is ' .. s .. ' elsewhere', sec.list} end
      return
    end
  end
  if unreadable ~= '' then
    -- Only the dead set lists what cannot be read: that is where such a job ends, to be purged.
    if sec.name ~= 'dead' then return end
  elseif status_filter ~= '' and s ~= status_filter then
    return
  end
  if sec.name == 'delayed' and queue_filter ~= '' and rec.queue ~= queue_filter then return end
  if tenant_filter ~= '' and tenant_of(rec.rt) ~= tenant_filter then return end
  if unreadable == '' then
    local more = redis.call('HMGET', k, unpack(REST))
    for i, name in ipairs(REST) do rec[name] = more[i] end
  else
    for _, name in ipairs(REST) do rec[name] = false end
  end
  local row = {id, sec.name, score, s or false}
  for i = 2, #FIELDS - 2 do row[#row + 1] = rec[FIELDS[i]] end
  row[#row + 1] = error_summary(rec.error)
  row[#row + 1] = rec.cancel
  row[#row + 1] = unreadable
  for _, v in ipairs(row) do rows[#rows + 1] = v end
  listed = listed + 1
end

local wanted = {
  pending = 'pending', queued = 'queued', running = 'running', delayed = 'delayed',
  retrying = 'delayed', dead = 'dead', succeeded = 'finished', cancelled = 'finished',
}
local examined = 0
local last_section, last_score, last_member = false, '', ''
local stopped = false

-- The finished section's lists in reading order: queue names by bytes ('~ingress' sorts last).
local function finished_names()
  local names = {}
  for _, q in ipairs(queues) do names[#names + 1] = q end
  if queue_filter == '' then names[#names + 1] = INGRESS_QUEUE end
  table.sort(names, function(a, b) return bytes_cmp(a, b) < 0 end)
  return names
end

-- Walk the finished lists (section si) from the cursor; returns whether the page filled up,
-- and then whether entries may remain. Newest first walks each list from its head, oldest
-- first from its tail. The cursor's entry is found again by LPOS; when it is gone it was
-- trimmed from the tail, so newest first nothing older is left in that list, and oldest first
-- everything left is newer.
local function walk_finished(sec, si)
  local resume_q, resume_id = nil, nil
  if si == cursor_section then resume_q, resume_id = cursor_score, cursor_member end
  local names = finished_names()
  for ni, qn in ipairs(names) do
    if not resume_q or bytes_cmp(qn, resume_q) >= 0 then
      local key = donekey(qn)
      local len = kcall('LLEN', key)
      local step = rev and 1 or -1
      local i = rev and 0 or len - 1
      if resume_q and qn == resume_q then
        local pos = kcall('LPOS', key, resume_id)
        if pos then
          i = pos + step
        elseif rev then
          i = len
        end
      end
      while i >= 0 and i < len and listed < want and examined < budget do
        local last_i = rev and math.min(i + BATCH - 1, len - 1) or math.max(i - BATCH + 1, 0)
        local ids = kcall('LRANGE', key, math.min(i, last_i), math.max(i, last_i))
        if #ids == 0 then break end
        local from, to = 1, #ids
        if not rev then from, to = #ids, 1 end
        for j = from, to, rev and 1 or -1 do
          if listed >= want or examined >= budget then break end
          examined = examined + 1
          last_section, last_score, last_member = si, qn, ids[j]
          examine(sec, key, ids[j], '')
          i = i + step
        end
      end
      if listed >= want or examined >= budget then
        local more = i >= 0 and i < len
        for later = ni + 1, #names do
          if not more and kcall('LLEN', donekey(names[later])) > 0 then more = true end
        end
        return true, more
      end
    end
  end
  return false, false
end

-- Whether a section has any entry at all (for the last page's "is there more").
local function any_entries(name)
  if name == 'finished' then
    for _, qn in ipairs(finished_names()) do
      if kcall('LLEN', donekey(qn)) > 0 then return true end
    end
    return false
  end
  for _, key in ipairs(section_keys(name)) do
    if kcall('ZCARD', key) > 0 then return true end
  end
  return false
end
for si = cursor_section or 1, #SECTIONS do
  local sec = SECTIONS[si]
  if sec.list and (status_filter == '' or wanted[status_filter] == sec.name) then
    local full, more = walk_finished(sec, si)
    if full then
      stopped = true
      if not more then last_section = false end
      break
    end
  elseif status_filter == '' or wanted[status_filter] == sec.name then
    local readers = {}
    for _, key in ipairs(section_keys(sec.name)) do
      local start = 0
      if si == cursor_section then start = seek(key, cursor_score, cursor_member) end
      readers[#readers + 1] = reader(key, start)
    end
    local function next_entry()
      local best, best_member, best_score = nil, nil, nil
      for _, r in ipairs(readers) do
        local m, sc = head(r)
        if m and (not best or before(sc, m, best_score, best_member)) then
          best, best_member, best_score = r, m, sc
        end
      end
      return best, best_member, best_score
    end
    while listed < want and examined < budget do
      local r, member, score = next_entry()
      if not r then break end
      r.pos = r.pos + 2
      examined = examined + 1
      last_section, last_score, last_member = si, score, member
      examine(sec, r.key, member, score)
    end
    if listed >= want or examined >= budget then
      stopped = true
      -- The next page resumes after the last entry examined; say there is none when this
      -- section and every later one are empty past it.
      local more = next_entry() ~= nil
      for later = si + 1, #SECTIONS do
        local name = SECTIONS[later].name
        if not more and (status_filter == '' or wanted[status_filter] == name) then
          more = any_entries(name)
        end
      end
      if not more then last_section = false end
      break
    end
  end
end
if not stopped then last_section = false end
for _, d in ipairs(drops) do
  if d[4] then
    -- A list entry; the one the cursor resumes from stays, as its anchor.
    if not (last_section and d[2] == last_member) then
      redis.call('LREM', d[1], 0, d[2])
      notice('dropped', d[1], d[2] .. ': ' .. d[3])
    end
  else
    redis.call('ZREM', d[1], d[2])
    notice('dropped', d[1], d[2] .. ': ' .. d[3])
  end
end
local reply = {last_section, last_score, last_member}
for _, v in ipairs(rows) do reply[#reply + 1] = v end
return {reply, notices}
