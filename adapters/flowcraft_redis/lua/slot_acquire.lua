-- RedisCoordinationStore.acquire_slots: take slots of concurrency keys' TTL'd semaphores, in order.
-- KEYS: each request's holders (ZSET holder -> expiry, ms of the server's clock).
-- ARGV: 1 TTL (ms), then per request: holder, limit. Returns per request 1 (taken) or 0 (every
-- slot is held).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local taken = {}
for i, key in ipairs(KEYS) do
  local holder, limit = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)  -- the slots of dead holders
  if redis.call('ZCARD', key) >= limit then
    taken[i] = 0
  else
    redis.call('ZADD', key, now + ttl, holder)
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
    taken[i] = 1
  end
end
return taken
