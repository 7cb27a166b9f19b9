-- Token Meter settlement: replace a reservation's estimate by the real counts, at most once, and release
-- its concurrency slots.
--
-- KEYS[1]  the reservation record written by reserve.lua: HASH {id, ci, co = the input and output
--          reserved, k<n> = "w||<window key>", q<n> = "q|<period start ms>|<quota key>",
--          c<n> = "c||<concurrency key>", p = pool reserved by the same call, pk = its window key,
--          po = the window of the requester's share of it (fair share),
--          P = candidate pools reserved by later calls on other shards (cluster mode; newline-separated)}
-- ARGV[1]  actual tokens, input + output (ignored when cancelling)
-- ARGV[2]  's' settle: every window entry still in its window gets the actual input/output (refund or
--              debt) and its window's totals move by the difference; quota counters of the same period
--              move the same way;
--          'c' cancel: remove the reservation entirely (entries, totals, quota counts).
-- ARGV[3]  actual output tokens, or '' when unknown: then the input is what was reserved for it (at
--          most the total) and the rest is output.
-- Reply: {1 when a reservation was found and applied | 0 when there was none (settled, cancelled, expired),
--         the record's P field ('' if none): the caller settles those pools' records next}
-- Every key named in the record carries the hash tag of KEYS[1], so under Redis Cluster it is in its slot.

local f = redis.call('HGETALL', KEYS[1])
if #f == 0 then
  return {0, ''}
end
redis.call('DEL', KEYS[1])
local rec = {}
for i = 1, #f, 2 do rec[f[i]] = f[i + 1] end

local rid = rec['id']
local ci, co = tonumber(rec['ci']), tonumber(rec['co'])
local cancel = ARGV[2] == 'c'
local ai, ao = 0, 0
if not cancel then
  local total = math.max(0, math.floor(tonumber(ARGV[1]) or 0))
  local out = tonumber(ARGV[3])
  if out == nil then
    ai = math.min(total, ci)
    ao = total - ai
  else
    ao = math.min(total, math.max(0, math.floor(out)))
    ai = total - ao
  end
end
local di, dout = ai - ci, ao - co
if cancel then di, dout = -ci, -co end

local function fix_window(zkey, id)
  local old = ci .. '|' .. co .. '|' .. id
  local score = redis.call('ZSCORE', zkey, old)
  if not score then return end -- already left its window: nothing there to correct
  redis.call('ZREM', zkey, old)
  if not cancel then redis.call('ZADD', zkey, score, ai .. '|' .. ao .. '|' .. id) end
  local s = redis.call('ZMSCORE', zkey, '#i', '#o')
  if di ~= 0 and s[1] then redis.call('ZINCRBY', zkey, -di, '#i') end -- totals are stored as -1 - total
  if dout ~= 0 and s[2] then redis.call('ZINCRBY', zkey, -dout, '#o') end
end

for field, value in pairs(rec) do
  local c1 = string.sub(field, 1, 1)
  if (c1 == 'k' or c1 == 'q' or c1 == 'c') and field ~= 'ci' and field ~= 'co' then
    local typ, p, key = string.match(value, '^(%a)|(%d*)|(.*)$')
    if typ == 'w' then
      fix_window(key, rid)
    elseif typ == 'q' then
      if redis.call('HGET', key, 'p') == p then
        if di ~= 0 then redis.call('HINCRBY', key, 'i', di) end
        if dout ~= 0 then redis.call('HINCRBY', key, 'o', dout) end
        if cancel then redis.call('HINCRBY', key, 'r', -1) end
      end
    elseif typ == 'c' then
      redis.call('ZREM', key, rid)
    end
  end
end

if rec['pk'] then
  fix_window(rec['pk'], KEYS[1])
end
if rec['po'] then
  fix_window(rec['po'], KEYS[1])
end

return {1, rec['P'] or ''}
