-- Release a request's concurrency leases (key and tenant) as soon as its log line is
-- read, before its usage is settled: a lease depends only on the request having ended,
-- never on Postgres. Budgets and the reservation are left for settle.lua. Idempotent:
-- a lease is its request id in the set, so nothing else can be released by mistake.
--
-- KEYS (keyspace.release_call): 1 conc:k 2 conc:t
-- ARGV: 1 request_id
-- Returns how many leases were removed (0 when released already, or never taken).

return redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
