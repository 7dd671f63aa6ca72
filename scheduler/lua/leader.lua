--[[
  leader: renew or release a leader lock, but only for the holder (compare-and-pexpire /
  compare-and-delete). Acquiring is a plain SET NX PX from Python; this script covers the two steps
  that must check the token and act in one atomic step, so a holder whose lock lapsed and was taken
  by another process can never extend or delete the new holder's lock.

  KEYS[1]  namespace prefix
  ARGV[1]  role (the lock is KEYS[1] .. 'leader:' .. role)
  ARGV[2]  operation: 'renew' or 'release'
  ARGV[3]  the caller's token
  ARGV[4]  ttl_ms (renew only)
  Returns  C_OK            renewed / released
           C_STALE_LEASE   the lock is not held with this token (lapsed, or taken by another)
  Events   none.
]]
-- @include _common.lua

local key = prefix .. 'leader:' .. ARGV[1]
if redis.call('GET', key) ~= ARGV[3] then
  return C_STALE_LEASE
end
if ARGV[2] == 'renew' then
  redis.call('PEXPIRE', key, tonumber(ARGV[4]))
else
  redis.call('DEL', key)
end
return C_OK
