-- Token Meter admission: reserve an estimate on every scope of a request's path, all-or-nothing,
-- then on the first pool (in preference order) whose token ceiling has room. One EVALSHA per decision.
--
-- Windows are exact sliding logs: a ZSET per scope and window (score = admission time in ms). Token
-- windows encode the cost in the member ("<cost>|<request id>") and keep a running total in a string
-- key "<zset>:sum"; request windows have member = request id and cost 1 (total = ZCARD).
-- Quotas are one HASH per scope {p = period id, t = tokens, r = requests}, reset when the period changes,
-- expiring at the period's end. Time comes from the server (TIME), so every replica shares one clock.
--
-- KEYS[1]                      reservation record (HASH), deleted by settle.lua
-- per scope i (5 keys)         tpm zset, tpm sum, rpm zset, rph zset, quota hash
-- per pool j (2 keys)          pool tpm zset, pool tpm sum
-- ARGV[1..8]                   request id, tokens, tpm window ms, rpm window ms, rph window ms,
--                              reservation min ttl ms, number of scopes, number of pools
-- per scope (8 args)           name, enforce (1|0), tpm, rpm, rph, quota tokens, quota requests, period (d|m)
--                              (an empty string = no limit)
-- per pool (2 args)            name, tpm ceiling ('' = none)
--
-- Reply: {status, pool, retry_ms, denied_scope, denied_kind,
--         tok_limit, tok_remaining, tok_reset_ms, req_limit, req_remaining, req_reset_ms, alert...}
-- status 1 = admitted, 0 = denied, 2 = the request id already holds a live reservation (nothing written);
-- a limit of -1 means "no window to report".

local rid = ARGV[1]
local cost_s = ARGV[2]
local cost = tonumber(cost_s)
local w_tpm = tonumber(ARGV[3])
local w_rpm = tonumber(ARGV[4])
local w_rph = tonumber(ARGV[5])
local res_ttl = tonumber(ARGV[6])
local nscopes = tonumber(ARGV[7])
local npools = tonumber(ARGV[8])
local SLACK = 1000 -- ms a window key outlives its newest entry

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

-- Evict token entries older than the window; return the window's current total.
local function token_total(zkey, skey, w)
  local cutoff = now - w
  local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', cutoff)
  local total = tonumber(redis.call('GET', skey) or '0')
  if #old > 0 then
    for i = 1, #old do total = total - cost_of(old[i]) end
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', cutoff)
    if redis.call('EXISTS', zkey) == 0 then
      total = 0
      redis.call('DEL', skey)
    else
      redis.call('SET', skey, total, 'KEEPTTL')
    end
  elseif total ~= 0 and redis.call('EXISTS', zkey) == 0 then
    total = 0
    redis.call('DEL', skey)
  end
  return total
end

-- Milliseconds until enough of the oldest entries expire for `c` to fit under `limit`.
local function token_wait(zkey, total, c, limit, w)
  local need = total + c - limit
  local freed = 0
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', zkey, start, start + 63, 'WITHSCORES')
    if #batch == 0 then return w end
    for i = 1, #batch, 2 do
      freed = freed + cost_of(batch[i])
      if freed >= need then return tonumber(batch[i + 1]) + w - now end
    end
    start = start + 64
  end
end

local function request_count(zkey, w)
  redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - w)
  return redis.call('ZCARD', zkey)
end

local function request_wait(zkey, n, limit, w)
  local e = redis.call('ZRANGE', zkey, n - limit, n - limit, 'WITHSCORES')
  return tonumber(e[2]) + w - now
end

local function drained_in(zkey, w)
  local e = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if #e == 0 then return 0 end
  return tonumber(e[2]) + w - now
end

-- Phase 1: read (and evict) every window and quota, collect violations.
local tok_windows = {}   -- {zkey, skey, total}
local req_windows = {}   -- {zkey, w}
local quotas = {}        -- {qkey, period id, period end, same period?}
local alerts = {}
local too_large = nil
local deny_scope, deny_kind, deny_wait = nil, nil, -1
local tt_limit, tt_total, tt_key = nil, 0, nil
local tr_limit, tr_count, tr_key = nil, 0, nil

for i = 0, nscopes - 1 do
  local kb = 1 + i * 5
  local ab = 8 + i * 8
  local name = ARGV[ab + 1]
  local enforce = ARGV[ab + 2] == '1'
  local tpm = tonumber(ARGV[ab + 3])
  local rpm = tonumber(ARGV[ab + 4])
  local rph = tonumber(ARGV[ab + 5])
  local qt = tonumber(ARGV[ab + 6])
  local qr = tonumber(ARGV[ab + 7])
  local violations = {}

  if tpm then
    local zkey, skey = KEYS[kb + 1], KEYS[kb + 2]
    local total = token_total(zkey, skey, w_tpm)
    tok_windows[#tok_windows + 1] = {zkey, skey, total}
    if cost > tpm then
      violations[#violations + 1] = {'too_large', 0}
    elseif total + cost > tpm then
      violations[#violations + 1] = {'tokens', token_wait(zkey, total, cost, tpm, w_tpm)}
    end
    if enforce and (tt_limit == nil or tpm - total < tt_limit - tt_total) then
      tt_limit, tt_total, tt_key = tpm, total, zkey
    end
  end
  for j = 1, 2 do
    local lim, zkey, w
    if j == 1 then lim, zkey, w = rpm, KEYS[kb + 3], w_rpm else lim, zkey, w = rph, KEYS[kb + 4], w_rph end
    if lim then
      local n = request_count(zkey, w)
      req_windows[#req_windows + 1] = {zkey, w}
      if lim < 1 then
        violations[#violations + 1] = {'too_large', 0}
      elseif n + 1 > lim then
        violations[#violations + 1] = {'requests', request_wait(zkey, n, lim, w)}
      end
      if j == 1 and enforce and (tr_limit == nil or lim - n < tr_limit - tr_count) then
        tr_limit, tr_count, tr_key = lim, n, zkey
      end
    end
  end
  if qt or qr then
    local qkey = KEYS[kb + 5]
    local pid, pend = period(ARGV[ab + 8])
    local q = redis.call('HMGET', qkey, 'p', 't', 'r')
    local used_t, used_r, same = 0, 0, false
    if tonumber(q[1]) == pid then
      used_t, used_r, same = tonumber(q[2]) or 0, tonumber(q[3]) or 0, true
    end
    quotas[#quotas + 1] = {qkey, pid, pend, same}
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
    out[8] = admitted and w_tpm or drained_in(tt_key, w_tpm)
  end
  if tr_limit then
    local used = tr_count
    if admitted then used = used + 1 end
    out[9], out[10] = tr_limit, math.max(0, tr_limit - used)
    out[11] = admitted and w_rpm or drained_in(tr_key, w_rpm)
  end
  for i = 1, #alerts do out[11 + i] = alerts[i] end
  return out
end

if too_large then return reply(0, nil, 0, too_large, 'too_large', false) end
if deny_kind then return reply(0, nil, deny_wait, deny_scope, deny_kind, false) end

-- Phase 2: the first pool in preference order with room.
local chosen, chosen_z, chosen_s, chosen_total = nil, nil, nil, 0
if npools > 0 then
  local pool_wait = -1
  local pb = 8 + nscopes * 8
  local kb = 1 + nscopes * 5
  for j = 0, npools - 1 do
    local name = ARGV[pb + j * 2 + 1]
    local ceiling = tonumber(ARGV[pb + j * 2 + 2])
    if not ceiling then
      chosen = name
      break
    end
    local zkey, skey = KEYS[kb + j * 2 + 1], KEYS[kb + j * 2 + 2]
    local total = token_total(zkey, skey, w_tpm)
    if cost <= ceiling then
      if total + cost <= ceiling then
        chosen, chosen_z, chosen_s, chosen_total = name, zkey, skey, total
        break
      end
      local wait = token_wait(zkey, total, cost, ceiling, w_tpm)
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
local ttl = res_ttl
local tok_keys = {}
for _, tw in ipairs(tok_windows) do
  redis.call('ZADD', tw[1], now, member)
  redis.call('PEXPIRE', tw[1], w_tpm + SLACK)
  redis.call('SET', tw[2], tw[3] + cost, 'PX', w_tpm + SLACK)
  tok_keys[#tok_keys + 1] = tw[1]
  if 2 * w_tpm > ttl then ttl = 2 * w_tpm end
end
local req_keys = {}
for _, rw in ipairs(req_windows) do
  redis.call('ZADD', rw[1], now, rid)
  redis.call('PEXPIRE', rw[1], rw[2] + SLACK)
  req_keys[#req_keys + 1] = rw[1]
  if 2 * rw[2] > ttl then ttl = 2 * rw[2] end
end
local quota_refs = {}
for _, q in ipairs(quotas) do
  if q[4] then
    redis.call('HINCRBY', q[1], 't', cost)
    redis.call('HINCRBY', q[1], 'r', 1)
  else
    redis.call('HSET', q[1], 'p', q[2], 't', cost, 'r', 1)
  end
  redis.call('PEXPIREAT', q[1], q[3])
  quota_refs[#quota_refs + 1] = {q[1], q[2]}
end
if chosen_z then
  redis.call('ZADD', chosen_z, now, member)
  redis.call('PEXPIRE', chosen_z, w_tpm + SLACK)
  redis.call('SET', chosen_s, chosen_total + cost, 'PX', w_tpm + SLACK)
  tok_keys[#tok_keys + 1] = chosen_z
end

redis.call('HSET', KEYS[1], 'id', rid, 'c', cost_s,
  'w', cjson.encode(tok_keys), 'rq', cjson.encode(req_keys), 'q', cjson.encode(quota_refs))
redis.call('PEXPIRE', KEYS[1], ttl)

return reply(1, chosen, 0, nil, nil, true)
