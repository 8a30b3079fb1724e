-- One fetch step of a RedisQueue serving several queues: for each, in priority order, move its due
-- delayed jobs to its ready list; refresh this worker's heartbeat; then move up to ARGV[3] jobs
-- from the ready lists, the first queue's first, to the queue's processing list of this worker.
--
-- KEYS: 1 heartbeat key, 2 workers set, then per queue: delayed zset, ready list, processing list
-- ARGV: 1 now (unix seconds), 2 most delayed jobs to promote per queue, 3 jobs to take, 4 worker
--       id, 5 heartbeat TTL (ms)
-- Returns {earliest next due time or "", then per job taken: the queue's index (from 1), body}.
local queues = (#KEYS - 2) / 3
local nxt = nil
for q = 0, queues - 1 do
  local delayed, ready = KEYS[3 + 3 * q], KEYS[4 + 3 * q]
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
  for _, member in ipairs(due) do
    redis.call('ZREM', delayed, member)
    redis.call('LPUSH', ready, string.sub(member, 18))
  end
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] and (nxt == nil or tonumber(first[2]) < tonumber(nxt)) then nxt = first[2] end
end
redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[5]))
redis.call('SADD', KEYS[2], ARGV[4])
local out = {nxt or ''}
local left = tonumber(ARGV[3])
for q = 0, queues - 1 do
  while left > 0 do
    local body = redis.call('LMOVE', KEYS[4 + 3 * q], KEYS[5 + 3 * q], 'RIGHT', 'LEFT')
    if not body then break end
    out[#out + 1] = q + 1
    out[#out + 1] = body
    left = left - 1
  end
end
return out
