-- Settlement: replace a request's reservation by its actual usage and release its
-- concurrency lease. Idempotent by request id. Called by meterd once per log line.
--
-- KEYS (keyspace.settle_call): 1 reservation 2 settled-marker 3 loaded-sentinel
--       4 conc:k 5 conc:t 6 tpm:k 7 tpm:t 8 day:k 9 day:t 10 mon:k 11 mon:t 12 tot:k 13 tot:t
-- ARGV: 1 request_id 2 prompt_tokens 3 completion_tokens 4 ledger_ms (when the usage was
--       made durable in Postgres) 5 day 6 month (those KEYS name) 7 request_s
-- Returns {1} settled against its reservation, {0} already settled, {2} tenant not
-- loaded (the rebuild will read the ledger), {3} counted by a rebuild already,
-- {4} settled without a reservation (Redis lost it; usage added as is), {5, day, month}
-- nothing done: the reservation was charged to another budget day or month than KEYS
-- name (admitted just after midnight); call again with those.

local rid = ARGV[1]
local actual = tonumber(ARGV[2]) + tonumber(ARGV[3])
local done = KEYS[2]
local MARK_TTL = 172800

if redis.call('EXISTS', done) == 1 then
  return {0}
end

local rec = redis.call('HGETALL', KEYS[1])
local fields = {}
for i = 1, #rec, 2 do fields[rec[i]] = rec[i + 1] end

local sec, delta, status
-- Which TPM windows hold the reservation (reservations made before admission recorded
-- this were charged to both).
local charged = {fields['tk'] ~= '0', fields['tt'] ~= '0'}
if fields['tok'] then
  if fields['day'] ~= ARGV[5] or fields['mon'] ~= ARGV[6] then
    return {5, fields['day'], fields['mon']}
  end
  sec = tonumber(fields['sec'])
  delta = actual - tonumber(fields['tok'])
  redis.call('ZREM', KEYS[4], rid)
  redis.call('ZREM', KEYS[5], rid)
  redis.call('DEL', KEYS[1])
  status = 1
else
  local loaded = redis.call('GET', KEYS[3])
  if not loaded then
    return {2}
  end
  if tonumber(ARGV[4]) < tonumber(loaded) then
    redis.call('SET', done, '1', 'EX', MARK_TTL)
    return {3}
  end
  sec = tonumber(ARGV[7])
  delta = actual
  status = 4
end

local now_s = tonumber(redis.call('TIME')[1])
if sec > now_s - 60 then
  -- Correct the admission second's bucket and the window's running sum (see admit.lua);
  -- a bucket that is gone (window expired or never charged) is left alone.
  for i, window in ipairs({KEYS[6], KEYS[7]}) do
    if charged[i] and redis.call('HEXISTS', window, sec) == 1 then
      redis.call('HINCRBY', window, sec, delta)
      redis.call('HINCRBY', window, 'sum', delta)
    end
  end
end

local function adjust(key, ttl)
  redis.call('INCRBY', key, delta)
  if ttl > 0 and redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ttl)
  end
end
adjust(KEYS[8], MARK_TTL)
adjust(KEYS[9], MARK_TTL)
adjust(KEYS[10], 32 * 86400)
adjust(KEYS[11], 32 * 86400)
adjust(KEYS[12], 0)
adjust(KEYS[13], 0)

redis.call('SET', done, '1', 'EX', MARK_TTL)
return {status}
