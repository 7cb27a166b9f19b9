-- Token Meter settlement: replace a reservation's estimate by the real token count, at most once.
--
-- KEYS[1]  the reservation record written by reserve.lua: HASH {id, c = estimate,
--          s<i> = "<flags>:<quota period id>:<scope name>" (flags: m = minute window, h = hour window,
--          q = quota), p = pool reserved by the same call, P = candidate pools reserved by later calls on
--          other shards (cluster mode; newline-separated)}
-- ARGV[1]  actual tokens (ignored when cancelling)
-- ARGV[2]  's' settle: every minute-window entry still in its window gets cost = actual (refund or debt)
--              and its window's running total moves by actual - estimate; quota token counters of the
--              same period move the same way;
--          'c' cancel: remove the reservation entirely (entries, totals, quota counts).
-- Reply: {1 when a reservation was found and applied | 0 when there was none (settled, cancelled, expired),
--         the record's P field ('' if none): the caller settles those pools' records next}
--
-- Window and quota keys are rebuilt from the record and KEYS[1]'s prefix ("tm:{t:<tenant>}"); they carry
-- the same hash tag as KEYS[1], so under Redis Cluster they live in its slot.

local SUM = '#'
local f = redis.call('HGETALL', KEYS[1])
if #f == 0 then
  return {0, ''}
end
redis.call('DEL', KEYS[1])
local rec = {}
for i = 1, #f, 2 do rec[f[i]] = f[i + 1] end

local rid, est_s = rec['id'], rec['c']
local est = tonumber(est_s)
local cancel = ARGV[2] == 'c'
local actual = 0
if not cancel then actual = math.max(0, math.floor(tonumber(ARGV[1]) or 0)) end
local actual_s = string.format('%d', actual)
local delta = actual - est
local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #rid - 5) -- strip ":res:<id>"

local function fix_minute(zkey, id)
  local old = est_s .. '|' .. id
  local score = redis.call('ZSCORE', zkey, old)
  if not score then return end -- already left its window: nothing there to correct
  if cancel or actual_s ~= est_s then
    redis.call('ZREM', zkey, old)
    if not cancel then redis.call('ZADD', zkey, score, actual_s .. '|' .. id) end
  end
  if delta ~= 0 and redis.call('ZSCORE', zkey, SUM) then
    redis.call('ZINCRBY', zkey, -delta, SUM) -- the total is stored as -1 - total
  end
end

for field, value in pairs(rec) do
  if string.sub(field, 1, 1) == 's' then
    local flags, pid, name = string.match(value, '^(%a*):(%d*):(.*)$')
    local base = prefix .. ':w:' .. name
    if string.find(flags, 'm', 1, true) then
      fix_minute(base .. ':1m', rid)
    end
    if cancel and string.find(flags, 'h', 1, true) then
      redis.call('ZREM', base .. ':1h', rid)
    end
    if string.find(flags, 'q', 1, true) then
      local qkey = prefix .. ':q:' .. name
      if redis.call('HGET', qkey, 'p') == pid then
        if delta ~= 0 then redis.call('HINCRBY', qkey, 't', delta) end
        if cancel then redis.call('HINCRBY', qkey, 'r', -1) end
      end
    end
  end
end

if rec['p'] then
  fix_minute('tm:{pool:' .. rec['p'] .. '}:1m', KEYS[1])
end

return {1, rec['P'] or ''}
