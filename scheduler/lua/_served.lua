-- Shared fragment (included by submit and watch): whether any router host serves this namespace,
-- judged by the health records role hosts publish with a TTL (scheduler/service/health.py). A
-- standby counts too, so a leader failover never looks like "nobody serves". Expired members are
-- dropped from the index on the way. (Needs _common.lua first, for kcall.)
local HEALTH_INDEX = prefix .. 'health'
local ROUTER_HEALTH = prefix .. 'health:router:'
local function router_served()
  local served = false
  for _, k in ipairs(kcall('SMEMBERS', HEALTH_INDEX)) do
    if redis.call('EXISTS', k) == 0 then
      kcall('SREM', HEALTH_INDEX, k)
    elseif string.sub(k, 1, #ROUTER_HEALTH) == ROUTER_HEALTH then
      served = true
    end
  end
  return served
end
