-- Give the jobs of a worker back (RedisQueue.recover_dead_workers, requeue_own): move each of its
-- processing lists (one per queue it serves) onto the consuming end of that queue's ready list,
-- oldest delivery first, when
--   ARGV[2] == "0": its heartbeat key has expired (a lost host: the fallback);
--   ARGV[2] == "1": the worker itself gives them back (it stays registered);
--   ARGV[2] == "2": its registered client connection is gone: moved only if it is still registered
--                   with client id ARGV[3] (a worker that reconnected registers its new id first).
-- A dead worker is unregistered (workers set, clients hash, served-queues hash, heartbeat key).
--
-- KEYS: 1 heartbeat key, 2 workers set, 3 clients hash, 4 served-queues hash, then per queue it
--       serves: its processing list, its ready list
-- ARGV: 1 worker id, 2 mode, 3 client id (mode "2")
-- Returns how many jobs were moved, or -1 when the worker is alive.
if ARGV[2] == '0' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if ARGV[2] == '2' and redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[3] then return -1 end
local n = 0
for i = 5, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT') do n = n + 1 end
end
if ARGV[2] ~= '1' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  if ARGV[2] == '2' then redis.call('DEL', KEYS[1]) end
end
return n
