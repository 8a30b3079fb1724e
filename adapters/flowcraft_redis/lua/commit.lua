-- Apply one version-checked Commit of a run atomically (RedisRunStore.commit).
--
-- KEYS: 1 record hash, 2 context hash, 3 node states hash, 4 items hash, 5 status string,
--       6 ready list, 7 delayed zset, 8.. the processing list of each acknowledged delivery
-- ARGV: 1 expected version, 2 TTL seconds for a final run (0 = keep), 3 status JSON ("" = not final),
--       then counted groups, each "n" followed by its entries:
--       record field/value pairs, context field/value pairs, context fields to delete,
--       node state id/JSON pairs, item field/JSON pairs, job bodies, delayed score/member pairs,
--       acknowledged delivery bodies (one per KEYS[8..], in order)
-- Returns 1 when applied, 0 (nothing written) when the version does not match.
local current = redis.call('HGET', KEYS[1], 'version')
local expected = tonumber(ARGV[1])
if current then
  if tonumber(current) ~= expected then return 0 end
elseif expected ~= 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end

local CHUNK = 500
local pos = 4

local function take_count()
  local n = tonumber(ARGV[pos]); pos = pos + 1; return n
end

-- call `cmd key <n*width args>` in chunks
local function chunked(cmd, key, n, width)
  local args = {}
  for i = 1, n * width do
    args[#args + 1] = ARGV[pos]; pos = pos + 1
    if #args >= CHUNK * width then
      redis.call(cmd, key, unpack(args)); args = {}
    end
  end
  if #args > 0 then redis.call(cmd, key, unpack(args)) end
end

chunked('HSET', KEYS[1], take_count(), 2)
redis.call('HSET', KEYS[1], 'version', tostring(expected + 1))
chunked('HSET', KEYS[2], take_count(), 2)
chunked('HDEL', KEYS[2], take_count(), 1)
chunked('HSET', KEYS[3], take_count(), 2)
chunked('HSET', KEYS[4], take_count(), 2)
chunked('LPUSH', KEYS[6], take_count(), 1)
chunked('ZADD', KEYS[7], take_count(), 2)
local acks = take_count()
for i = 1, acks do
  redis.call('LREM', KEYS[7 + i], 1, ARGV[pos]); pos = pos + 1
end

if ARGV[3] ~= '' then
  redis.call('SET', KEYS[5], ARGV[3])
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then
    for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
return 1
