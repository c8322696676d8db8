-- Settlement: replace a request's reservation by its actual usage and release its
-- concurrency lease. Idempotent by request id. Called by meterd once per log line.
--
-- KEYS: 1 reservation  (nz:{t:<tenant>}:res:<request id>; the other keys share its prefix)
-- ARGV: 1 request_id 2 prompt_tokens 3 completion_tokens 4 ledger_ms (when the usage was
--       made durable in Postgres) 5 key_id 6 day 7 month 8 request_s (admission second)
-- Returns {1} settled against its reservation, {0} already settled, {2} tenant not
-- loaded (the rebuild will read the ledger), {3} counted by a rebuild already,
-- {4} settled without a reservation (Redis lost it; usage added as is).

local base = string.match(KEYS[1], '^(.-)res:')
local rid = ARGV[1]
local actual = tonumber(ARGV[2]) + tonumber(ARGV[3])
local done = base .. 'done:' .. rid
local MARK_TTL = 172800

if redis.call('EXISTS', done) == 1 then
  return {0}
end

local rec = redis.call('HGETALL', KEYS[1])
local fields = {}
for i = 1, #rec, 2 do fields[rec[i]] = rec[i + 1] end

local key_id, day, month, sec, delta, status
-- Which TPM windows hold the reservation (reservations made before admission recorded
-- this were charged to both).
local charged = {fields['tk'] ~= '0', fields['tt'] ~= '0'}
if fields['tok'] then
  key_id, day, month = fields['k'], fields['day'], fields['mon']
  sec = tonumber(fields['sec'])
  delta = actual - tonumber(fields['tok'])
  redis.call('ZREM', base .. 'conc:k:' .. key_id, rid)
  redis.call('ZREM', base .. 'conc:t', rid)
  redis.call('DEL', KEYS[1])
  status = 1
else
  local loaded = redis.call('GET', base .. 'loaded')
  if not loaded then
    return {2}
  end
  if tonumber(ARGV[4]) < tonumber(loaded) then
    redis.call('SET', done, '1', 'EX', MARK_TTL)
    return {3}
  end
  key_id, day, month = ARGV[5], ARGV[6], ARGV[7]
  sec = tonumber(ARGV[8])
  delta = actual
  status = 4
end

local now_s = tonumber(redis.call('TIME')[1])
if sec > now_s - 60 then
  -- Correct the admission second's bucket and the window's running sum (see admit.lua);
  -- a bucket that is gone (window expired or never charged) is left alone.
  for i, window in ipairs({base .. 'tpm:k:' .. key_id, base .. 'tpm:t'}) do
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
adjust(base .. 'day:k:' .. key_id .. ':' .. day, MARK_TTL)
adjust(base .. 'day:t:' .. day, MARK_TTL)
adjust(base .. 'mon:k:' .. key_id .. ':' .. month, 32 * 86400)
adjust(base .. 'mon:t:' .. month, 32 * 86400)
adjust(base .. 'tot:k:' .. key_id, 0)
adjust(base .. 'tot:t', 0)

redis.call('SET', done, '1', 'EX', MARK_TTL)
return {status}
