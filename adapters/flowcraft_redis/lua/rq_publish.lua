-- Create the RQ jobs of Flowcraft jobs (RqQueue.publish, RqQueue.requeue).
-- KEYS: 1 outbox list, 2 outbox delayed zset, 3 RQ's set of queues; then per RQ queue q (from 0)
--       the entries go to (routing, SPEC 14): 4+5q its list, 5+5q its scheduled registry zset,
--       6+5q its intermediate list (jobs being taken), 7+5q its deferred registry zset, 8+5q its
--       started registry zset (members "<job id>:<execution id>"); then per entry i (from 0),
--       after those: its RQ job hash, the hash of its spare id, its RQ executions zset
-- ARGV: 1 number of entries; 2 number of RQ queues; 3 check: "" trust a waiting status (queued, scheduled, deferred) of
--       the hash; "R" check it in RQ's registries (scheduled, deferred, started), and report a
--       queued status back unchecked, entry not published; "L" check it in the registries and in
--       the queue and intermediate lists (LPOS: O(list length), so only for the few jobs a scan
--       did not find); 4 now (unix seconds, for started jobs' heartbeats);
--       then per entry: its RQ queue's number q (from 0), source ("-" none, "L" the outbox list, "Z" the outbox delayed zset), the
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
local queues, check, now = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local first_entry_key = 4 + 5 * queues
local unchecked = {}

local function started_live(id, executions, q)
  for _, execution in ipairs(redis.call('ZRANGE', executions, 0, -1)) do
    local expiry = redis.call('ZSCORE', KEYS[q + 4], id .. ':' .. execution)
    if expiry and (expiry == 'inf' or tonumber(expiry) > now) then return true end
  end
  return false
end

-- does the RQ job `id` (status `status`) of the RQ queue whose keys start at KEYS[q] really wait
-- or run? nil: it was not looked up (reported back)
local function pending(id, status, executions, q)
  if check == '' then return WAITING[status] == true end
  if status == 'queued' then
    if check == 'R' then return nil end
    return redis.call('LPOS', KEYS[q], id) ~= false or redis.call('LPOS', KEYS[q + 2], id) ~= false
  elseif status == 'scheduled' then return redis.call('ZSCORE', KEYS[q + 1], id) ~= false
  elseif status == 'deferred' then return redis.call('ZSCORE', KEYS[q + 3], id) ~= false
  elseif status == 'started' then return started_live(id, executions, q)
  end
  return false
end

local pos = 5
local created = 0
local used, touched = {}, {}  -- the RQ queues given jobs, in order (RQ lists them in its set)
for e = 0, tonumber(ARGV[1]) - 1 do
  local q = 4 + 5 * tonumber(ARGV[pos])
  local source, value, id, spare, due = ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3], ARGV[pos + 4], ARGV[pos + 5]
  local first = pos + 7
  pos = first + 2 * tonumber(ARGV[pos + 6])
  local mine = true
  if source == 'L' then
    mine = redis.call('LREM', KEYS[1], -1, value) == 1
  elseif source == 'Z' then
    mine = redis.call('ZREM', KEYS[2], value) == 1
  end
  if mine then
    local key = KEYS[first_entry_key + 3 * e]
    local status = redis.call('HGET', key, 'status')
    local live = false
    if status then live = pending(id, status, KEYS[first_entry_key + 2 + 3 * e], q) end
    if live == nil then
      unchecked[#unchecked + 1] = e + 1
    elseif not live then
      if status and WAITING[status] then
        redis.call('DEL', key)  -- lost: nothing of RQ's names it any more
      elseif status or redis.call('EXISTS', key) == 1 then
        id, key = spare, KEYS[first_entry_key + 1 + 3 * e]
      end
      redis.call('HSET', key, unpack(ARGV, first, pos - 1))
      if due == '' then
        redis.call('RPUSH', KEYS[q], id)
      else
        redis.call('ZADD', KEYS[q + 1], due, id)
      end
      if not used[q] then used[q] = true; touched[#touched + 1] = KEYS[q] end
      created = created + 1
    end
  end
end
if #touched > 0 then redis.call('SADD', KEYS[3], unpack(touched)) end
return {created, redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]), unchecked}
