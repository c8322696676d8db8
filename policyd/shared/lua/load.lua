-- Rebuild one tenant's budget counters from Postgres after Redis lost them. Runs once:
-- if another policyd loaded the tenant first, its counters (which may already hold
-- new reservations) are kept.
--
-- KEYS: 1 loaded-sentinel (nz:{t:<tenant>}:loaded; counters share its prefix)
-- ARGV: 1 now_ms, then triples (key suffix, value, ttl seconds or 0 for none)
-- Returns 1 if loaded now, 0 if it already was.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local base = string.match(KEYS[1], '^(.-)loaded$')
for i = 2, #ARGV, 3 do
  local key = base .. ARGV[i]
  redis.call('SET', key, ARGV[i + 1])
  local ttl = tonumber(ARGV[i + 2])
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
