-- Rebuild one tenant's budget counters from Postgres after Redis lost them. Runs once:
-- if another policyd loaded the tenant first, its counters (which may already hold
-- new reservations) are kept.
--
-- KEYS: 1 loaded-sentinel, 2.. the counters to set (keyspace.load_call)
-- ARGV: 1 now_ms, then one pair per counter: value, ttl seconds (0 for none)
-- Returns 1 if loaded now, 0 if it already was.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
for i = 2, #KEYS do
  local value, ttl = ARGV[2 * i - 2], tonumber(ARGV[2 * i - 1])
  redis.call('SET', KEYS[i], value)
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
