-- Create the RQ jobs of Flowcraft jobs (RqQueue.publish).
-- KEYS: 1 outbox list, 2 outbox delayed zset, 3 RQ queue list, 4 RQ scheduled registry zset,
--       5 RQ's set of queues; then per entry i (from 0): 6+2i its RQ job hash, 7+2i the hash of its spare id
-- ARGV: 1 number of entries; then per entry: source ("-" none, "L" the outbox list, "Z" the outbox
--       delayed zset), the outbox list value or zset member, RQ job id, spare id, due second ("" = now),
--       n, then n field/value pairs of the RQ job hash
-- An outbox entry is published by the call that removes it, and only by that one (publishers may
-- race). No second RQ job is made under an id that is queued, scheduled or deferred: that job reads
-- the run after this commit anyway. An id taken by a job that runs or has ended gives way to the
-- spare id. Returns {RQ jobs created, entries left in the outbox (list + delayed zset)}.
local WAITING = {queued = true, scheduled = true, deferred = true}
local pos = 2
local created = 0
for e = 0, tonumber(ARGV[1]) - 1 do
  local source, value, id, spare, due = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3], ARGV[pos + 4]
  local first = pos + 6
  pos = first + 2 * tonumber(ARGV[pos + 5])
  local mine = true
  if source == 'L' then
    mine = redis.call('LREM', KEYS[1], -1, value) == 1
  elseif source == 'Z' then
    mine = redis.call('ZREM', KEYS[2], value) == 1
  end
  if mine then
    local key = KEYS[6 + 2 * e]
    local status = redis.call('HGET', key, 'status')
    if not (status and WAITING[status]) then
      if status or redis.call('EXISTS', key) == 1 then
        id, key = spare, KEYS[7 + 2 * e]
      end
      redis.call('HSET', key, unpack(ARGV, first, pos - 1))
      if due == '' then
        redis.call('RPUSH', KEYS[3], id)
      else
        redis.call('ZADD', KEYS[4], due, id)
      end
      created = created + 1
    end
  end
end
if created > 0 then redis.call('SADD', KEYS[5], KEYS[3]) end
return {created, redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])}
