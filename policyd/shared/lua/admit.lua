-- Admission: check every limit of key and tenant, and only if all pass, record the
-- request, a concurrency lease and a token reservation. One call, atomic.
--
-- Sliding windows (RPM, TPM) and lease sets are kept only while a limit applies to
-- them: for an unlimited dimension they would cost Redis most of the script's time and
-- enforce nothing. Budget counters are always kept (a budget set later needs them).
-- Expiries are set when a bucket or counter is created, not on every call.
--
-- KEYS: 1 rpm:k 2 rpm:t 3 tpm:k 4 tpm:t 5 conc:k 6 conc:t 7 day:k 8 day:t
--       9 mon:k 10 mon:t 11 tot:k 12 tot:t 13 reservation 14 loaded-sentinel
-- ARGV: 1 now_ms 2 request_id 3 reserve 4 lease_ttl_ms 5 record_ttl_s
--       6 day_ttl_s 7 month_ttl_s 8..19 limits (same order as KEYS 1..12, -1 = none)
--       20 key_id 21 tenant_id 22 day 23 month
-- Returns {0} when the tenant's counters are not loaded yet, {3} for a repeated
-- request id, {2, limit_index, limit, used, retry_s} when refused, and
-- {1, req_limit, req_remaining, req_reset_s, tok_limit, tok_remaining, tok_reset_s}
-- when admitted (-1 = no such limit).

local now_ms = tonumber(ARGV[1])
local now_s = math.floor(now_ms / 1000)
local reserve = tonumber(ARGV[3])
local WINDOW = 60

if redis.call('EXISTS', KEYS[14]) == 0 then
  return {0}
end
if redis.call('EXISTS', KEYS[13]) == 1 then
  return {3}
end

-- A window is a hash of one-second buckets ("<second>" -> count) plus two bookkeeping
-- fields, "sum" (of every bucket) and "lo" (the oldest bucket's second), so a check reads
-- two fields instead of up to sixty buckets. A bucket counts while second > now - 60.
local FLOOR = now_s - WINDOW + 1

-- Rebuild sum and lo from the buckets: for a new window, one written without them, or
-- one not looked at for so long (another node's clock) that walking it would cost more.
local function recount(key)
  local flat = redis.call('HGETALL', key)
  local sum, lo, stale = 0, nil, {}
  for i = 1, #flat, 2 do
    local sec = tonumber(flat[i])
    if sec then  -- not 'sum' or 'lo'
      if sec < FLOOR then
        stale[#stale + 1] = flat[i]
      else
        sum = sum + tonumber(flat[i + 1])
        if not lo or sec < lo then lo = sec end
      end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if lo then
    redis.call('HSET', key, 'sum', sum, 'lo', lo)
    return sum, lo
  end
  redis.call('HDEL', key, 'sum', 'lo')
  return 0, -1
end

-- (sum, oldest second) of the buckets inside the window; drops the ones that left it.
local function window(key)
  local head = redis.call('HMGET', key, 'sum', 'lo')
  local sum, lo = tonumber(head[1]), tonumber(head[2])
  if not sum or not lo or FLOOR - lo > WINDOW then
    return recount(key)
  end
  if lo >= FLOOR then
    return sum, lo
  end
  -- Walk from the old oldest bucket to the first one still inside: each second is
  -- walked once in the window's life, so under steady load this is one or two fields.
  local secs = {}
  for sec = lo, now_s do secs[#secs + 1] = sec end
  local counts = redis.call('HMGET', key, unpack(secs))
  local stale, oldest = {}, nil
  for i = 1, #secs do
    if counts[i] then
      if secs[i] >= FLOOR then
        oldest = secs[i]
        break
      end
      stale[#stale + 1] = secs[i]
      sum = sum - tonumber(counts[i])
    end
  end
  if not oldest then
    -- Nothing left up to now: empty, or only buckets ahead of this clock.
    return recount(key)
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  redis.call('HSET', key, 'sum', sum, 'lo', oldest)
  return sum, oldest
end

local function leases(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  return redis.call('ZCARD', key)
end

local function counter(key)
  return tonumber(redis.call('GET', key) or '0')
end

local function limited(i)
  return tonumber(ARGV[7 + i]) >= 0
end

local used, oldest, cost = {}, {}, {}
for i = 1, 4 do
  if limited(i) then
    used[i], oldest[i] = window(KEYS[i])
  else
    used[i], oldest[i] = 0, -1
  end
end
for i = 5, 6 do
  used[i] = limited(i) and leases(KEYS[i]) or 0
end
for i = 7, 12 do
  used[i] = counter(KEYS[i])
end
cost = {1, 1, reserve, reserve, 1, 1, reserve, reserve, reserve, reserve, reserve, reserve}

for i = 1, 12 do
  local limit = tonumber(ARGV[7 + i])
  if limit >= 0 and used[i] + cost[i] > limit then
    local retry = 1
    if i <= 4 and oldest[i] >= 0 then
      retry = math.max(1, oldest[i] + WINDOW - now_s)
    end
    return {2, i, limit, used[i], retry}
  end
end

-- Everything passed: record the request against every window of key and tenant.
for i = 1, 4 do
  -- A new bucket (the first of this second) renews the window's expiry; the key then
  -- outlives every bucket that can still count.
  if limited(i) then
    if redis.call('HINCRBY', KEYS[i], now_s, cost[i]) == cost[i] then
      redis.call('EXPIRE', KEYS[i], WINDOW + 1)
    end
    redis.call('HINCRBY', KEYS[i], 'sum', cost[i])
    if oldest[i] < 0 or now_s < oldest[i] then
      redis.call('HSET', KEYS[i], 'lo', now_s)
    end
  end
end
local lease_until = now_ms + tonumber(ARGV[4])
for i = 5, 6 do
  if limited(i) then
    redis.call('ZADD', KEYS[i], lease_until, ARGV[2])
    -- Relative expiry: the caller's clock, not Redis', defines the lease.
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[4]) + 1000)
  end
end
-- Day and month counters expire once their window is over; a counter that already
-- exists got its expiry from whoever created it (this script, load.lua or settle.lua).
local ttl = {[7] = ARGV[6], [8] = ARGV[6], [9] = ARGV[7], [10] = ARGV[7]}
for i = 7, 12 do
  if redis.call('INCRBY', KEYS[i], reserve) == reserve and ttl[i] then
    redis.call('EXPIRE', KEYS[i], ttl[i])
  end
end
-- tk/tt: whether the key's and the tenant's TPM windows hold this reservation, so that
-- settlement corrects only a window that was charged.
redis.call('HSET', KEYS[13], 'k', ARGV[20], 't', ARGV[21], 'tok', reserve,
  'sec', now_s, 'day', ARGV[22], 'mon', ARGV[23], 'lease', lease_until,
  'tk', limited(3) and 1 or 0, 'tt', limited(4) and 1 or 0)
redis.call('EXPIRE', KEYS[13], ARGV[5])

-- Rate-limit figures for the response headers: the tighter of key and tenant.
local function figures(a, b)
  local limit, remaining, reset = -1, -1, -1
  for _, i in ipairs({a, b}) do
    local l = tonumber(ARGV[7 + i])
    if l >= 0 then
      local rem = math.max(0, l - used[i] - cost[i])
      if limit < 0 or rem < remaining then
        limit, remaining = l, rem
        local first = oldest[i]
        if first < 0 then first = now_s end
        reset = math.max(1, first + WINDOW - now_s)
      end
    end
  end
  return limit, remaining, reset
end
local rl, rr, rs = figures(1, 2)
local tl, tr, ts = figures(3, 4)
return {1, rl, rr, rs, tl, tr, ts}
