-- Token Meter settlement: replace a reservation's estimate by the real token count, at most once.
--
-- KEYS[1]  the reservation record written by reserve.lua (HASH: id, c, w, rq, q)
-- ARGV[1]  actual tokens (settle) -- ignored when cancelling
-- ARGV[2]  's' settle: every token window entry still in its window gets cost = actual (refund or debt),
--              quota token counters of the same period move by actual - estimate;
--          'c' cancel: remove the reservation entirely (token and request entries, quota counts).
-- Reply: 1 when a reservation was found and applied, 0 when there was none (settled, cancelled, expired).
--
-- The window/quota keys come from the record, not from KEYS: they all carry the record's hash tag
-- ({t:<tenant>}), so under Redis Cluster they live in the same slot as KEYS[1].

local rec = redis.call('HMGET', KEYS[1], 'id', 'c', 'w', 'rq', 'q')
if not rec[1] then
  return 0
end
redis.call('DEL', KEYS[1])

local rid = rec[1]
local est = tonumber(rec[2])
local cancel = ARGV[2] == 'c'
local actual = cancel and 0 or math.max(0, math.floor(tonumber(ARGV[1]) or 0))
local delta = actual - est
local old_member = rec[2] .. '|' .. rid
local new_member = string.format('%d', actual) .. '|' .. rid

for _, zkey in ipairs(cjson.decode(rec[3])) do
  local score = redis.call('ZSCORE', zkey, old_member)
  if score then
    -- still in its window (otherwise eviction already removed the estimate; nothing to correct)
    redis.call('ZREM', zkey, old_member)
    if not cancel then
      redis.call('ZADD', zkey, score, new_member)
    end
    local skey = zkey .. ':sum'
    if delta ~= 0 then
      redis.call('INCRBY', skey, delta)
      if redis.call('PTTL', skey) == -1 then
        redis.call('PEXPIRE', skey, math.max(1, redis.call('PTTL', zkey)))
      end
    end
  end
end

if cancel then
  for _, zkey in ipairs(cjson.decode(rec[4])) do
    redis.call('ZREM', zkey, rid)
  end
end

for _, q in ipairs(cjson.decode(rec[5])) do
  local qkey, pid = q[1], q[2]
  if tonumber(redis.call('HGET', qkey, 'p')) == pid then
    if delta ~= 0 then redis.call('HINCRBY', qkey, 't', delta) end
    if cancel then redis.call('HINCRBY', qkey, 'r', -1) end
  end
end

return 1
