-- Token Meter admission: reserve an estimate on every scope of a request's path, all-or-nothing,
-- then on the first pool (in preference order) whose token ceiling has room. One EVALSHA per decision.
--
-- Windows are exact sliding logs (time from the server's TIME, so every replica shares one clock):
--   minute window  ZSET "<prefix>:w:<scope>:1m"  one entry per admitted request, score = admission ms,
--                  member = "<tokens>|<request id>" (pools: "<tokens>|<record key>"); it serves tokens/min (sum of the costs) and
--                  requests/min (number of entries). The running token total is the member "#" whose
--                  score is -1 - total (negative, so it never falls in an eviction range).
--   hour window    ZSET "<prefix>:w:<scope>:1h"  member = request id (requests/hour).
--   quota          HASH "<prefix>:q:<scope>"     {p = period id, t = tokens, r = requests}, reset when the
--                  UTC day/month changes, expiring at the period's end.
--   pools          ZSET "tm:{pool:<name>}:1m"     a minute window like a scope's.
-- Every window key expires one window (+1 s) after its last write, so idle keys vanish.
--
-- KEYS[1]                 reservation record (HASH), deleted by settle.lua
-- per scope (3 keys)      minute zset, hour zset, quota hash
-- per pool (1 key)        pool minute zset
-- ARGV[1..8]              request id, tokens, tokens/requests-per-minute window ms, requests-per-hour window
--                         ms, reservation min ttl ms, number of scopes, number of pools, pools reserved by
--                         a later call (cluster mode: the names of the candidate pools, newline-separated,
--                         kept in the record so that settlement finds the pool's record; '' otherwise)
-- per scope (8 args)      name, enforce (1|0), tpm, rpm, rph, quota tokens, quota requests, period (d|m)
--                         ('' = no limit)
-- per pool (2 args)       name, tpm ceiling ('' = none)
--
-- Reply: {status, pool, retry_ms, denied_scope, denied_kind,
--         tok_limit, tok_remaining, tok_reset_ms, req_limit, req_remaining, req_reset_ms, alert...}
-- status 1 = admitted, 0 = denied, 2 = the request id already holds a live reservation (nothing written);
-- a limit of -1 means "no window to report".

local rid = ARGV[1]
local cost_s = ARGV[2]
local cost = tonumber(cost_s)
local w_min = tonumber(ARGV[3])
local w_hour = tonumber(ARGV[4])
local res_ttl = tonumber(ARGV[5])
local nscopes = tonumber(ARGV[6])
local npools = tonumber(ARGV[7])
local later_pools = ARGV[8]
local SLACK = 1000 -- ms a window key outlives its newest entry
local SUM = '#'

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2}
end

local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Calendar periods (UTC), H. Hinnant's civil-date algorithms; the same as memory.py.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local periods = {}
local function period(kind)
  local p = periods[kind]
  if p then return p[1], p[2] end
  local days = math.floor(sec / 86400)
  local id, ends
  if kind == 'd' then
    id, ends = days, (days + 1) * 86400000
  else
    local y, m = civil_from_days(days)
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    id, ends = y * 12 + m - 1, days_from_civil(ny, nm, 1) * 86400000
  end
  periods[kind] = {id, ends}
  return id, ends
end

local function cost_of(member)
  return tonumber(string.match(member, '^%d+'))
end

local function sum_entries(zkey)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
    if m ~= SUM then total = total + cost_of(m) end
  end
  return total
end

-- A minute window: evict entries older than the window, return (total tokens, entries).
-- `want_count`: the number of entries is needed (a requests/min limit).
-- (Reading the running total with ZSCORE and the stale entries with ZRANGEBYSCORE is ~3x cheaper on the
-- server than one ZRANGE ... WITHSCORES of the window's head: formatting scores dominates.)
local function minute_window(zkey, want_count)
  local cutoff = now - w_min
  local s = redis.call('ZSCORE', zkey, SUM)
  local total, marker
  if s then
    total, marker = -1 - tonumber(s), 1
  else
    total, marker = sum_entries(zkey), 0 -- a new window (or one that lost its total: rebuild it)
  end
  local old = redis.call('ZRANGEBYSCORE', zkey, 0, cutoff)
  if #old > 0 then
    for j = 1, #old do total = total - cost_of(old[j]) end
    redis.call('ZREMRANGEBYSCORE', zkey, 0, cutoff)
  end
  if total < 0 then total = sum_entries(zkey) end -- never expected; self-healing
  local n = 0
  if want_count then
    n = redis.call('ZCARD', zkey) - marker
  end
  return total, n
end

-- Milliseconds until enough of the oldest entries leave a minute window for `c` more tokens to fit.
local function token_wait(zkey, total, c, limit)
  local need = total + c - limit
  local freed = 0
  local start = 1
  while true do
    local batch = redis.call('ZRANGE', zkey, start, start + 63, 'WITHSCORES')
    if #batch == 0 then return w_min end
    for i = 1, #batch, 2 do
      freed = freed + cost_of(batch[i])
      if freed >= need then return tonumber(batch[i + 1]) + w_min - now end
    end
    start = start + 64
  end
end

-- Milliseconds until a window of n entries holds fewer than `limit` (the first entry is at `first`).
local function request_wait(zkey, n, limit, w, first)
  local e = redis.call('ZRANGE', zkey, first + n - limit, first + n - limit, 'WITHSCORES')
  return tonumber(e[2]) + w - now
end

local function drained_in(zkey, w)
  local e = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if #e == 0 or e[1] == SUM then return 0 end
  return tonumber(e[2]) + w - now
end

-- Phase 1: read (and evict) every window and quota, collect violations.
local minutes = {}   -- {zkey, total}
local hours = {}     -- zkey
local quotas = {}    -- {qkey, period id, period end, used tokens, used requests, same period}
local record = {}    -- reservation record fields
local alerts = {}
local too_large = nil
local deny_scope, deny_kind, deny_wait = nil, nil, -1
local tt_limit, tt_total, tt_key = nil, 0, nil
local tr_limit, tr_count, tr_key = nil, 0, nil

for i = 0, nscopes - 1 do
  local kb = 1 + i * 3
  local ab = 8 + i * 8
  local name = ARGV[ab + 1]
  local enforce = ARGV[ab + 2] == '1'
  local tpm = tonumber(ARGV[ab + 3])
  local rpm = tonumber(ARGV[ab + 4])
  local rph = tonumber(ARGV[ab + 5])
  local qt = tonumber(ARGV[ab + 6])
  local qr = tonumber(ARGV[ab + 7])
  local violations = {}
  local flags, pid_s = '', ''

  if tpm or rpm then
    flags = flags .. 'm'
    local zkey = KEYS[kb + 1]
    local total, n = minute_window(zkey, rpm ~= nil)
    minutes[#minutes + 1] = {zkey, total}
    if tpm then
      if cost > tpm then
        violations[#violations + 1] = {'too_large', 0}
      elseif total + cost > tpm then
        violations[#violations + 1] = {'tokens', token_wait(zkey, total, cost, tpm)}
      end
      if enforce and (tt_limit == nil or tpm - total < tt_limit - tt_total) then
        tt_limit, tt_total, tt_key = tpm, total, zkey
      end
    end
    if rpm then
      if rpm < 1 then
        violations[#violations + 1] = {'too_large', 0}
      elseif n + 1 > rpm then
        violations[#violations + 1] = {'requests', request_wait(zkey, n, rpm, w_min, 1)}
      end
      if enforce and (tr_limit == nil or rpm - n < tr_limit - tr_count) then
        tr_limit, tr_count, tr_key = rpm, n, zkey
      end
    end
  end
  if rph then
    flags = flags .. 'h'
    local zkey = KEYS[kb + 2]
    redis.call('ZREMRANGEBYSCORE', zkey, 0, now - w_hour)
    local n = redis.call('ZCARD', zkey)
    hours[#hours + 1] = zkey
    if rph < 1 then
      violations[#violations + 1] = {'too_large', 0}
    elseif n + 1 > rph then
      violations[#violations + 1] = {'requests', request_wait(zkey, n, rph, w_hour, 0)}
    end
  end
  if qt or qr then
    flags = flags .. 'q'
    local qkey = KEYS[kb + 3]
    local pid, pend = period(ARGV[ab + 8])
    pid_s = tostring(pid)
    local q = redis.call('HMGET', qkey, 'p', 't', 'r')
    local used_t, used_r, same = 0, 0, false
    if tonumber(q[1]) == pid then
      used_t, used_r, same = tonumber(q[2]) or 0, tonumber(q[3]) or 0, true
    end
    quotas[#quotas + 1] = {qkey, pid, pend, used_t, used_r, same}
    if qt then
      if cost > qt then
        violations[#violations + 1] = {'too_large', 0}
      elseif used_t + cost > qt then
        violations[#violations + 1] = {'quota_tokens', pend - now}
      end
    end
    if qr then
      if qr < 1 then
        violations[#violations + 1] = {'too_large', 0}
      elseif used_r + 1 > qr then
        violations[#violations + 1] = {'quota_requests', pend - now}
      end
    end
  end
  if flags ~= '' then
    record[#record + 1] = 's' .. i
    record[#record + 1] = flags .. ':' .. pid_s .. ':' .. name
  end

  if #violations > 0 then
    if not enforce then
      alerts[#alerts + 1] = name
    else
      for _, v in ipairs(violations) do
        if v[1] == 'too_large' then
          if too_large == nil then too_large = name end
        elseif v[2] > deny_wait then
          deny_scope, deny_kind, deny_wait = name, v[1], v[2]
        end
      end
    end
  end
end

local function reply(status, pool, wait, scope, kind, admitted)
  local out = {status, pool or '', wait, scope or '', kind or '', -1, 0, 0, -1, 0, 0}
  if tt_limit then
    local used = tt_total
    if admitted then used = used + cost end
    out[6], out[7] = tt_limit, math.max(0, tt_limit - used)
    out[8] = admitted and w_min or drained_in(tt_key, w_min)
  end
  if tr_limit then
    local used = tr_count
    if admitted then used = used + 1 end
    out[9], out[10] = tr_limit, math.max(0, tr_limit - used)
    out[11] = admitted and w_min or drained_in(tr_key, w_min)
  end
  for i = 1, #alerts do out[11 + i] = alerts[i] end
  return out
end

if too_large then return reply(0, nil, 0, too_large, 'too_large', false) end
if deny_kind then return reply(0, nil, deny_wait, deny_scope, deny_kind, false) end

-- Phase 2: the first pool in preference order with room.
local chosen, chosen_key, chosen_total = nil, nil, 0
if npools > 0 then
  local pool_wait = -1
  local pb = 8 + nscopes * 8
  local kb = 1 + nscopes * 3
  for j = 0, npools - 1 do
    local name = ARGV[pb + j * 2 + 1]
    local ceiling = tonumber(ARGV[pb + j * 2 + 2])
    if not ceiling then
      chosen = name
      break
    end
    local zkey = KEYS[kb + j + 1]
    local total = minute_window(zkey, false)
    if cost <= ceiling then
      if total + cost <= ceiling then
        chosen, chosen_key, chosen_total = name, zkey, total
        break
      end
      local wait = token_wait(zkey, total, cost, ceiling)
      if pool_wait < 0 or wait < pool_wait then pool_wait = wait end
    end
  end
  if not chosen then
    if pool_wait < 0 then return reply(0, nil, 0, 'pool', 'too_large', false) end
    return reply(0, nil, pool_wait, 'pool', 'pool', false)
  end
end

-- Phase 3: write everything.
local member = cost_s .. '|' .. rid
local pool_member = cost_s .. '|' .. KEYS[1] -- unique across tenants
local ttl = res_ttl
local win_ttl = w_min + SLACK
for _, mw in ipairs(minutes) do
  redis.call('ZADD', mw[1], now, member, -1 - (mw[2] + cost), SUM)
  redis.call('PEXPIRE', mw[1], win_ttl)
end
if #minutes > 0 and 2 * w_min > ttl then ttl = 2 * w_min end
for _, zkey in ipairs(hours) do
  redis.call('ZADD', zkey, now, rid)
  redis.call('PEXPIRE', zkey, w_hour + SLACK)
end
if #hours > 0 and 2 * w_hour > ttl then ttl = 2 * w_hour end
for _, q in ipairs(quotas) do
  redis.call('HSET', q[1], 'p', q[2], 't', q[4] + cost, 'r', q[5] + 1)
  if not q[6] then redis.call('PEXPIREAT', q[1], q[3]) end
end
if chosen_key then
  redis.call('ZADD', chosen_key, now, pool_member, -1 - (chosen_total + cost), SUM)
  redis.call('PEXPIRE', chosen_key, win_ttl)
  record[#record + 1] = 'p'
  record[#record + 1] = chosen
end
if later_pools ~= '' then
  record[#record + 1] = 'P'
  record[#record + 1] = later_pools
end

redis.call('HSET', KEYS[1], 'id', rid, 'c', cost_s, unpack(record))
redis.call('PEXPIRE', KEYS[1], ttl)

return reply(1, chosen, 0, nil, nil, true)
