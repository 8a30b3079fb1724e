-- take_jobs(kb, ab): one fetch step of RedisQueue, prepended to the scripts that fetch
-- (promote.lua, and commit.lua when a worker takes its next jobs with a commit): move due delayed
-- jobs to the ready list, refresh this worker's heartbeat, and move up to ARGV[ab + 3] jobs from the
-- ready list to its processing list.
--
-- KEYS[kb + ...]: 1 delayed zset, 2 ready list, 3 processing list, 4 heartbeat key, 5 workers set
-- ARGV[ab + ...]: 1 now (unix seconds), 2 most delayed jobs to promote, 3 jobs to take, 4 worker id,
--       5 heartbeat TTL (ms)
-- Returns {next due time or "", body...}. Delayed members are "<16 hex>:<body>" (unique).
local function take_jobs(kb, ab)
  local due = redis.call('ZRANGEBYSCORE', KEYS[kb + 1], '-inf', ARGV[ab + 1], 'LIMIT', 0, tonumber(ARGV[ab + 2]))
  for _, member in ipairs(due) do
    redis.call('ZREM', KEYS[kb + 1], member)
    redis.call('LPUSH', KEYS[kb + 2], string.sub(member, 18))
  end
  redis.call('SET', KEYS[kb + 4], '1', 'PX', tonumber(ARGV[ab + 5]))
  redis.call('SADD', KEYS[kb + 5], ARGV[ab + 4])
  local out = {''}
  local nxt = redis.call('ZRANGE', KEYS[kb + 1], 0, 0, 'WITHSCORES')
  if nxt[2] then out[1] = nxt[2] end
  for i = 1, tonumber(ARGV[ab + 3]) do
    local body = redis.call('LMOVE', KEYS[kb + 2], KEYS[kb + 3], 'RIGHT', 'LEFT')
    if not body then break end
    out[#out + 1] = body
  end
  return out
end
