-- Give the jobs of a dead worker back (RedisQueue.recover_dead_workers): if its heartbeat key has
-- expired (or ARGV[2] == "1": the worker itself gives them back), move its processing list onto
-- the consuming end of the ready list, oldest delivery first.
--
-- KEYS: 1 processing list, 2 ready list, 3 heartbeat key, 4 workers set
-- ARGV: 1 worker id, 2 "1" to skip the heartbeat check (and keep the worker registered)
-- Returns how many jobs were moved, or -1 when the worker is alive.
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
if ARGV[2] ~= '1' then redis.call('SREM', KEYS[4], ARGV[1]) end
return n
