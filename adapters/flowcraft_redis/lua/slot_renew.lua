-- RedisCoordinationStore.renew_slots: extend held slots of concurrency keys' semaphores.
-- KEYS: the keys' holder ZSETs. ARGV: 1 TTL (ms), then one holder per key.
-- A slot that expired already is not taken again (its holder is gone from the set).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local expiry = redis.call('ZSCORE', key, ARGV[i + 1])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', key, now + ttl, ARGV[i + 1])
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
return 0
