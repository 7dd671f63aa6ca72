--[[
  watch: register a waiter on a job's result and report its status, in one step, so a completion
  after this call always pushes to the done list and one before it shows as a finished status.

  KEYS[1]  namespace prefix
  ARGV[1]  job id
  Returns  the job's status, or false when there is no such job
]]
-- @include _common.lua

local k = jobkey(ARGV[1])
local status = redis.call('HGET', k, 'status')
if status and not FINISHED[status] then redis.call('HSET', k, 'w', '1') end
return status
