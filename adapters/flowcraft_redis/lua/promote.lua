-- One fetch step of RedisQueue: move due delayed jobs to the ready list, refresh this worker's
-- heartbeat, and move up to ARGV[3] jobs from the ready list to its processing list.
--
-- KEYS: 1 delayed zset, 2 ready list, 3 processing list, 4 heartbeat key, 5 workers set
-- ARGV: 1 now (unix seconds), 2 most delayed jobs to promote, 3 jobs to take, 4 worker id,
--       5 heartbeat TTL (ms)
-- Returns {next due time or "", body...}. Delayed members are "<16 hex>:<body>" (unique).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('LPUSH', KEYS[2], string.sub(member, 18))
end
redis.call('SET', KEYS[4], '1', 'PX', tonumber(ARGV[5]))
redis.call('SADD', KEYS[5], ARGV[4])
local out = {''}
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then out[1] = nxt[2] end
for i = 1, tonumber(ARGV[3]) do
  local body = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  if not body then break end
  out[#out + 1] = body
end
return out
