-- Give the jobs of a worker back (RedisQueue.recover_dead_workers, requeue_own): move its
-- processing list onto the consuming end of the ready list, oldest delivery first, when
--   ARGV[2] == "0": its heartbeat key has expired (a lost host: the fallback);
--   ARGV[2] == "1": the worker itself gives them back (it stays registered);
--   ARGV[2] == "2": its registered client connection is gone: moved only if it is still registered
--                   with client id ARGV[3] (a worker that reconnected registers its new id first).
-- A dead worker is unregistered (workers set, clients hash, heartbeat key).
--
-- KEYS: 1 processing list, 2 ready list, 3 heartbeat key, 4 workers set, 5 clients hash
-- ARGV: 1 worker id, 2 mode, 3 client id (mode "2")
-- Returns how many jobs were moved, or -1 when the worker is alive.
if ARGV[2] == '0' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
if ARGV[2] == '2' and redis.call('HGET', KEYS[5], ARGV[1]) ~= ARGV[3] then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
if ARGV[2] ~= '1' then
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  if ARGV[2] == '2' then redis.call('DEL', KEYS[3]) end
end
return n
