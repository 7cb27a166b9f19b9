-- Token Meter admission: reserve a request's input estimate and output reservation on every rule of every
-- scope of its path, all-or-nothing, then on the first pool (in preference order) whose token ceiling has
-- room. One EVALSHA per decision. The same algorithm as memory.py (see README.md in this package).
--
-- Counters (one KEY each; the rules of a scope that share a counter share it):
--   sliding window  ZSET, one entry per admitted request, score = admission ms (Redis TIME: one clock for
--                   every replica), member "<input>|<output>|<request id>" (pools: "...|<record key>"); the
--                   running totals are the members "#i" and "#o" with score -1 - total (negative: never in
--                   an eviction range). Requests = entries. Expires one window (+1 s) after its last write.
--   calendar        HASH {p = period start ms, e = period end ms, i, o, r, a<mark> = threshold marks}; the
--                   period's bounds come from the caller (the tenant's time zone and anchor day, on the
--                   caller's clock); a stored later period is kept (a replica whose clock is behind never
--                   resets it). Waits and resets until a period's end are measured on the caller's clock
--                   (ARGV 4), never on Redis TIME. Expires a day after it ends (on the caller's clock).
--   concurrency     ZSET member = request id, score = lease end ms; settle.lua removes it.
--
-- KEYS[1]  reservation record (HASH), deleted by settle.lua; then one key per counter, then one per pool.
-- ARGV     1 request id, 2 input tokens, 3 output tokens, 4 the caller's wall clock (epoch ms: calendar
--          periods), 5 reservation min ttl ms, 6 lease ms, 7 number of scopes, 8 number of pools, 9 pools
--          reserved by a later call (cluster mode: their names, newline-separated, kept in the record for
--          settlement; '' otherwise), 10 pool window ms,
--          then per scope: name, enforce (1|0), number of counters; per counter: type (w|q|c), p1, p2
--          (w: window ms, ''; q: period start ms, period end ms; c: '', ''), number of rules; per rule:
--          index in the scope, measure (t|i|o|r|c), limit, enforce (1|0), thresholds ("80,100" or '');
--          then per pool: name, ceiling ('' = none), low line, owner, guaranteed, maximum, number of other
--          owners, (owner, guaranteed) each (see Phase 2).
--
-- Reply: {status, pool, retry_ms, denied_scope, denied_kind, denied_rule,
--         tok_limit, tok_remaining, tok_reset_ms, req_limit, req_remaining, req_reset_ms,
--         quota_limit, quota_remaining, quota_reset_ms, n_over, (scope, rule, used with this request) * n_over,
--         (scope, rule, percent, used, limit, period_end_ms) * thresholds}
-- status 1 = admitted, 0 = denied, 2 = the request id already holds a live reservation (nothing written);
-- a limit of -1 means "no window to report"; denied_rule -1: none.

local rid = ARGV[1]
local cin = tonumber(ARGV[2])
local cout = tonumber(ARGV[3])
local wall = tonumber(ARGV[4])
local res_ttl = tonumber(ARGV[5])
local lease = tonumber(ARGV[6])
local nscopes = tonumber(ARGV[7])
local npools = tonumber(ARGV[8])
local later_pools = ARGV[9]
local w_pool = tonumber(ARGV[10])
local SLACK = 1000 -- ms a window key outlives its newest entry
local DAY = 86400000

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function cost_for(m)
  if m == 't' then return cin + cout elseif m == 'i' then return cin elseif m == 'o' then return cout end
  return 1
end

local function parse(member)
  local a, b = string.match(member, '^(%d+)|(%d+)|')
  return tonumber(a), tonumber(b)
end

local function entry_cost(member, m)
  local a, b = parse(member)
  if m == 't' then return a + b elseif m == 'i' then return a elseif m == 'o' then return b end
  return 1
end

-- A sliding window: evict what left it; {key, width, input total, output total, markers, count}
local function window(zkey, w)
  local s = redis.call('ZMSCORE', zkey, '#i', '#o')
  local ti, to, markers = 0, 0, 0
  if s[1] and s[2] then
    ti, to, markers = -1 - tonumber(s[1]), -1 - tonumber(s[2]), 2
  else
    if s[1] then markers = markers + 1 end
    if s[2] then markers = markers + 1 end
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', zkey, 0, '+inf')) do
      local a, b = parse(m)
      ti, to = ti + a, to + b
    end
  end
  local old = redis.call('ZRANGEBYSCORE', zkey, 0, now - w)
  if #old > 0 then
    for j = 1, #old do
      local a, b = parse(old[j])
      ti, to = ti - a, to - b
    end
    redis.call('ZREMRANGEBYSCORE', zkey, 0, now - w)
    -- the stored totals follow the eviction now, whether or not this request is admitted (a denial that
    -- evicted would otherwise leave them counting entries that are gone)
    if markers == 2 then redis.call('ZADD', zkey, -1 - ti, '#i', -1 - to, '#o') end
  end
  local n = redis.call('ZCARD', zkey) - markers
  return {key = zkey, w = w, ti = ti, to = to, markers = markers, n = n}
end

local function used_in(win, m)
  if m == 't' then return win.ti + win.to elseif m == 'i' then return win.ti elseif m == 'o' then return win.to end
  return win.n
end

-- ms until enough of the oldest entries leave the window for `c` more of measure `m` to fit `limit`
local function window_wait(win, m, c, limit)
  if m == 'r' then
    local e = redis.call('ZRANGE', win.key, win.markers + win.n - limit, win.markers + win.n - limit, 'WITHSCORES')
    return tonumber(e[2]) + win.w - now
  end
  local need = used_in(win, m) + c - limit
  local freed = 0
  local start = win.markers
  while true do
    local batch = redis.call('ZRANGE', win.key, start, start + 63, 'WITHSCORES')
    if #batch == 0 then return win.w end
    for i = 1, #batch, 2 do
      freed = freed + entry_cost(batch[i], m)
      if freed >= need then return tonumber(batch[i + 1]) + win.w - now end
    end
    start = start + 64
  end
end

local function drained_in(win)
  local e = redis.call('ZRANGE', win.key, -1, -1, 'WITHSCORES')
  if #e == 0 or string.sub(e[1], 1, 1) == '#' then return 0 end
  return tonumber(e[2]) + win.w - now
end

local function quota_used(q, m)
  if m == 't' then return q.i + q.o elseif m == 'i' then return q.i elseif m == 'o' then return q.o end
  return q.r
end

-- The enforced rule with the least room, per header family:
-- {limit, used, cost, reset (-1: until its window drains), reset once admitted, its window}
local tight = {}
local function offer(family, limit, used, c, reset, reset_admitted, win)
  local b = tight[family]
  if b == nil or limit - used < b[1] - b[2] then tight[family] = {limit, used, c, reset, reset_admitted, win} end
end

-- Phase 1: read every counter, collect violations.
local windows, quotas, slots, seen = {}, {}, {}, {}
local watch = {}      -- {scope, rule index, measure, limit, quota, percents string, mark}
local over = {}
local scope_alert = {}
local too_large, too_large_rule = nil, -1
local deny_scope, deny_kind, deny_rule, deny_wait, deny_q = nil, nil, -1, -1, nil
local kinds = {t = 'tokens', i = 'input_tokens', o = 'output_tokens', r = 'requests'}
local a = 11
local k = 2
for _ = 1, nscopes do
  local name = ARGV[a]
  local scope_enforce = ARGV[a + 1] == '1'
  local ncounters = tonumber(ARGV[a + 2])
  a = a + 3
  local scope_over = false
  for _ = 1, ncounters do
    local typ, p1, p2, nrules = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
    a = a + 4
    local key = KEYS[k]
    k = k + 1
    local win, q, c_n
    if typ == 'w' then
      win = seen[key]
      if not win then
        win = window(key, tonumber(p1))
        seen[key] = win
        windows[#windows + 1] = win
      end
    elseif typ == 'q' then
      q = seen[key]
      if not q then
        local start, ends = tonumber(p1), tonumber(p2)
        local h = redis.call('HMGET', key, 'p', 'i', 'o', 'r', 'e')
        local stored = tonumber(h[1])
        q = {key = key, p = start, ends = ends, i = 0, o = 0, r = 0, same = false}
        if stored and stored >= start then
          q.p, q.same = stored, true
          q.i, q.o, q.r = tonumber(h[2]) or 0, tonumber(h[3]) or 0, tonumber(h[4]) or 0
          if stored > start then q.ends = tonumber(h[5]) or ends end -- a later period: its own end
        end
        seen[key] = q
        quotas[#quotas + 1] = q
      end
    else
      c_n = seen[key]
      if not c_n then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        c_n = {key = key, n = redis.call('ZCARD', key)}
        seen[key] = c_n
        slots[#slots + 1] = c_n
      end
    end
    for _ = 1, nrules do
      local idx, m, limit, enforce, pcts = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3] == '1', ARGV[a + 4]
      a = a + 5
      enforce = enforce and scope_enforce
      local c = cost_for(m)
      local large, wait, kind, used = false, nil, nil, 0
      if typ == 'w' then
        used = used_in(win, m)
        kind = kinds[m]
        if c > limit or limit < 1 then
          large = true
        elseif used + c > limit then
          wait = window_wait(win, m, c, limit)
        end
        if enforce then
          local fam = 'tok'
          if m == 'r' then fam = 'req' end
          offer(fam, limit, used, c, -1, win.w, win)
        end
      elseif typ == 'q' then
        used = quota_used(q, m)
        kind = 'quota_' .. kinds[m]
        if c > limit or limit < 1 then
          large = true
        elseif used + c > limit then
          wait = q.ends - wall
          if wait < 0 then wait = 0 end
        end
        local left = q.ends - wall
        if left < 0 then left = 0 end
        if enforce and m ~= 'r' then offer('quota', limit, used, c, left, left, nil) end
        if pcts ~= '' then watch[#watch + 1] = {name, idx, m, limit, q, pcts} end
      else
        kind = 'concurrent'
        used = c_n.n
        if limit < 1 then
          large = true
        elseif c_n.n + 1 > limit then
          wait = 1000 -- a slot frees when a request in flight ends: unknown, so soon
        end
      end
      if large or wait then
        if not enforce then
          scope_over = true
          over[#over + 1] = name
          over[#over + 1] = idx
          over[#over + 1] = used + c
        elseif large then
          if too_large == nil then too_large, too_large_rule = name, idx end
        elseif deny_kind == nil or wait > deny_wait then
          deny_scope, deny_kind, deny_rule, deny_wait = name, kind, idx, wait
          deny_q = nil
          if typ == 'q' then deny_q = {name, idx, m, limit, q, pcts} end
        end
      end
    end
  end
  if scope_over then scope_alert[#scope_alert + 1] = name end
end

local function status(family, admitted)
  local b = tight[family]
  if b == nil then return -1, 0, 0 end
  local used, reset = b[2], b[4]
  if admitted then
    used, reset = used + b[3], b[5]
  elseif reset == -1 then
    reset = drained_in(b[6])
  end
  local rem = b[1] - used
  if rem < 0 then rem = 0 end
  return b[1], rem, reset
end

local function mark(m, limit, pct)
  return 'a' .. m .. limit .. ':' .. pct
end

local function reply(st, pool, wait, scope, kind, rule, admitted, crossed)
  local out = {st, pool or '', wait, scope or '', kind or '', rule}
  for _, fam in ipairs({'tok', 'req', 'quota'}) do
    local l, r, s = status(fam, admitted)
    out[#out + 1] = l
    out[#out + 1] = r
    out[#out + 1] = s
  end
  out[#out + 1] = #over / 3
  for _, v in ipairs(over) do out[#out + 1] = v end
  for _, v in ipairs(crossed) do out[#out + 1] = v end
  return out
end

if too_large then return reply(0, nil, 0, too_large, 'too_large', too_large_rule, false, {}) end
if deny_kind then
  -- a billing-period quota that refuses a request has reached its line: its 100 % threshold
  local crossed = {}
  if deny_q and deny_q[5].same then
    for pct in string.gmatch(deny_q[6], '%d+') do
      if pct == '100' and redis.call('HSETNX', deny_q[5].key, mark(deny_q[3], deny_q[4], 100), 1) == 1 then
        crossed = {deny_q[1], deny_q[2], 100, quota_used(deny_q[5], deny_q[3]), deny_q[4], deny_q[5].ends}
      end
    end
  end
  return reply(0, nil, deny_wait, deny_scope, deny_kind, deny_rule, false, crossed)
end

-- Phase 2: the first pool in preference order with room (memory.py's _pool_fit, line for line).
-- Per pool, ARGV: name, ceiling ('' = none), low line, owner ('' = none), guaranteed, maximum, number of
-- other owners, then (owner, guaranteed) each; KEYS: window, spill flag, owner's window, owner's demand
-- flag, then (window, demand flag) of each other owner.
local total = cin + cout
local chosen, chosen_win, chosen_own = nil, nil, nil
if npools > 0 then
  local pool_wait = -1
  for _ = 1, npools do
    local name, ceiling, low = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local owner, guaranteed, maximum = ARGV[a + 3], tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    local nothers = tonumber(ARGV[a + 6])
    local wkey, spill_key, own_key, demand_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
    local others_a, others_k = a + 7, k + 4
    a = a + 7 + 2 * nothers
    k = k + 4 + 2 * nothers
    if not ceiling then
      chosen = name
      break
    end
    local win = window(wkey, w_pool)
    local used = win.ti + win.to
    local own = nil
    local cap = ceiling
    if owner ~= '' then
      own = window(own_key, w_pool)
      if maximum and maximum < cap then cap = maximum end
    end
    local wait = -1
    local fits = false
    if total <= cap then
      if own and own.ti + own.to + total > cap then
        wait = window_wait(own, 't', total, cap)
      else
        local within = own ~= nil and own.ti + own.to + total <= guaranteed
        local held = 0
        if not within then
          for j = 0, nothers - 1 do
            local theirs = window(KEYS[others_k + 2 * j], w_pool)
            local their_used = theirs.ti + theirs.to
            if their_used > 0 or redis.call('EXISTS', KEYS[others_k + 2 * j + 1]) == 1 then
              local g = tonumber(ARGV[others_a + 2 * j + 1])
              if g > their_used then held = held + g - their_used end
            end
          end
        end
        local spilling = redis.call('EXISTS', spill_key) == 1
        -- an owner within its guarantee is not held back by the hysteresis line: only the ceiling
        local line = ceiling
        if spilling and not within then line = low end
        if used + total + held <= line then
          fits = true
          if spilling and used + total <= low then redis.call('DEL', spill_key) end
        else
          if used + total > ceiling then redis.call('SET', spill_key, 1, 'PX', w_pool) end
          -- an owner refused within its guarantee: borrowers give way from now on
          if within then redis.call('SET', demand_key, 1, 'PX', w_pool) end
          local need = line - held
          if need < total then
            wait = w_pool
          else
            wait = window_wait(win, 't', total, need)
          end
        end
      end
    end
    if fits then
      chosen, chosen_win, chosen_own = name, win, own
      break
    end
    if wait >= 0 and (pool_wait < 0 or wait < pool_wait) then pool_wait = wait end
  end
  if not chosen then
    if pool_wait < 0 then return reply(0, nil, 0, 'pool', 'too_large', -1, false, {}) end
    return reply(0, nil, pool_wait, 'pool', 'pool', -1, false, {})
  end
end

-- Phase 3: write everything.
local record = {}
local function add(win, id)
  redis.call('ZADD', win.key, now, cin .. '|' .. cout .. '|' .. id,
             -1 - (win.ti + cin), '#i', -1 - (win.to + cout), '#o')
  redis.call('PEXPIRE', win.key, win.w + SLACK)
end
local ttl = res_ttl
if lease > ttl then ttl = lease end
for n, win in ipairs(windows) do
  add(win, rid)
  if 2 * win.w > ttl then ttl = 2 * win.w end
  record[#record + 1] = 'k' .. n
  record[#record + 1] = 'w||' .. win.key
end
for n, q in ipairs(quotas) do
  if q.same then
    redis.call('HSET', q.key, 'i', q.i + cin, 'o', q.o + cout, 'r', q.r + 1)
  else
    redis.call('DEL', q.key)
    redis.call('HSET', q.key, 'p', q.p, 'e', q.ends, 'i', cin, 'o', cout, 'r', 1)
    redis.call('PEXPIRE', q.key, math.max(1, q.ends - wall) + DAY) -- on the caller's clock, as the period
  end
  q.i, q.o, q.r, q.same = q.i + cin, q.o + cout, q.r + 1, true
  record[#record + 1] = 'q' .. n
  record[#record + 1] = 'q|' .. q.p .. '|' .. q.key
end
for n, c_n in ipairs(slots) do
  redis.call('ZADD', c_n.key, now + lease, rid)
  redis.call('PEXPIRE', c_n.key, lease + SLACK)
  record[#record + 1] = 'c' .. n
  record[#record + 1] = 'c||' .. c_n.key
end
if chosen_win then
  add(chosen_win, KEYS[1]) -- the record key: unique across tenants
  record[#record + 1] = 'p'
  record[#record + 1] = chosen
  record[#record + 1] = 'pk'
  record[#record + 1] = chosen_win.key
  if chosen_own then
    add(chosen_own, KEYS[1])
    record[#record + 1] = 'po'
    record[#record + 1] = chosen_own.key
  end
end
if later_pools ~= '' then
  record[#record + 1] = 'P'
  record[#record + 1] = later_pools
end

redis.call('HSET', KEYS[1], 'id', rid, 'ci', cin, 'co', cout, unpack(record))
redis.call('PEXPIRE', KEYS[1], ttl)

local crossed = {}
for _, wq in ipairs(watch) do
  local q = wq[5]
  local used = quota_used(q, wq[3])
  for pct in string.gmatch(wq[6], '%d+') do
    if used * 100 >= tonumber(pct) * wq[4] and redis.call('HSETNX', q.key, mark(wq[3], wq[4], pct), 1) == 1 then
      crossed[#crossed + 1] = wq[1]
      crossed[#crossed + 1] = wq[2]
      crossed[#crossed + 1] = tonumber(pct)
      crossed[#crossed + 1] = used
      crossed[#crossed + 1] = wq[4]
      crossed[#crossed + 1] = q.ends
    end
  end
end

return reply(1, chosen, 0, nil, nil, -1, true, crossed)
