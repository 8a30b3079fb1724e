-- RedisCoordinationStore.acquire_slot: take a slot of a concurrency key's TTL'd semaphore.
-- KEYS: 1 the key's holders (ZSET holder -> expiry, ms of the server's clock).
-- ARGV: 1 holder, 2 limit, 3 TTL (ms). Returns 1 (taken) or 0 (every slot is held).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)  -- the slots of dead holders
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
