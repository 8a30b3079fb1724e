-- Create the RQ jobs of Flowcraft jobs (RqQueue.publish, RqQueue.requeue).
-- KEYS: 1 outbox list, 2 outbox delayed zset, 3 RQ queue list, 4 RQ scheduled registry zset,
--       5 RQ's set of queues, 6 RQ's intermediate queue list (jobs being taken), 7 RQ deferred
--       registry zset, 8 RQ started registry zset (members "<job id>:<execution id>");
--       then per entry i (from 0): 9+3i its RQ job hash, 10+3i the hash of its spare id,
--       11+3i its RQ executions zset
-- ARGV: 1 number of entries; 2 check: "" trust a waiting status (queued, scheduled, deferred) of
--       the hash; "R" check it in RQ's registries (scheduled, deferred, started), and report a
--       queued status back unchecked, entry not published; "L" check it in the registries and in
--       the queue and intermediate lists (LPOS: O(list length), so only for the few jobs a scan
--       did not find); 3 now (unix seconds, for started jobs' heartbeats);
--       then per entry: source ("-" none, "L" the outbox list, "Z" the outbox delayed zset), the
--       outbox list value or zset member, RQ job id, spare id, due second ("" = now), n, then n
--       field/value pairs of the RQ job hash
-- An outbox entry is published by the call that removes it, and only by that one (publishers may
-- race). No second RQ job is made under an id that waits: that job reads the run after this
-- commit anyway. With a check, "waits" means it really does (in the queue, being taken, in the
-- scheduled or deferred registry, or started with a heartbeat not expired); a lost waiting job (a
-- hash whose id is in none of them) is written anew under its own id. An id taken by a job that
-- runs or has ended gives way to the spare id.
-- Returns {RQ jobs created, entries left in the outbox (list + delayed zset), {indices (from 1) of
-- the entries reported back unchecked}}.
local WAITING = {queued = true, scheduled = true, deferred = true}
local check, now = ARGV[2], tonumber(ARGV[3])
local unchecked = {}

local function started_live(id, executions)
  for _, execution in ipairs(redis.call('ZRANGE', executions, 0, -1)) do
    local expiry = redis.call('ZSCORE', KEYS[8], id .. ':' .. execution)
    if expiry and (expiry == 'inf' or tonumber(expiry) > now) then return true end
  end
  return false
end

-- does the RQ job `id` (status `status`) really wait or run? nil: it was not looked up (reported back)
local function pending(id, status, executions)
  if check == '' then return WAITING[status] == true end
  if status == 'queued' then
    if check == 'R' then return nil end
    return redis.call('LPOS', KEYS[3], id) ~= false or redis.call('LPOS', KEYS[6], id) ~= false
  elseif status == 'scheduled' then return redis.call('ZSCORE', KEYS[4], id) ~= false
  elseif status == 'deferred' then return redis.call('ZSCORE', KEYS[7], id) ~= false
  elseif status == 'started' then return started_live(id, executions)
  end
  return false
end

local pos = 4
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
    local key = KEYS[9 + 3 * e]
    local status = redis.call('HGET', key, 'status')
    local live = false
    if status then live = pending(id, status, KEYS[11 + 3 * e]) end
    if live == nil then
      unchecked[#unchecked + 1] = e + 1
    elseif not live then
      if status and WAITING[status] then
        redis.call('DEL', key)  -- lost: nothing of RQ's names it any more
      elseif status or redis.call('EXISTS', key) == 1 then
        id, key = spare, KEYS[10 + 3 * e]
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
return {created, redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]), unchecked}
