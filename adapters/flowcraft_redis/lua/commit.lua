-- Apply Commits atomically (RedisRunStore.commit / commit_many): one call for a whole wave of node
-- executions, each commit checked and applied on its own (see flowcraft.ports.Commit).
--
-- ARGV[1]: the number of commits; then, per commit, a header "number of keys", "number of args"
-- followed by that commit's args; the keys of all commits follow each other in KEYS.
-- A commit's KEYS: 1 record hash, 2 context hash, 3 node states hash, 4 items hash, 5 status string,
--       6 ready list, 7 delayed zset, 8 history list, 9.. the processing list of each acknowledged delivery,
--       then the ready lists and delayed zsets of the other queues its routed jobs go to
-- A commit's args: the expected version ("" = a node commit); counted groups, each "n" followed
--       by its entries: guards (node id / state JSON pairs, "" = not stored), unset item fields;
--       the TTL seconds for a final run (0 = keep), the status JSON ("" = not final); then counted
--       groups again: record field/value pairs, context field/value pairs, context fields to delete, node state id/JSON
--       pairs, item field/JSON pairs, job bodies, routed jobs (index of their list in the commit's
--       KEYS, body), delayed score/member pairs, routed delayed jobs (index of their zset, score,
--       member), counters (field, delta, threshold, reserve, job body or "", index of the job's
--       list or 0 for the ready list: 6 args each); then the outstanding delta; the
--       history entry (a JSON array of events, "" = none) and the most entries the history keeps;
--       then the acknowledged delivery bodies (one per key 9.., in order).
-- (RUNNING and AWAITING: the core's statuses, defined before this script by `load_script`.)
-- A run commit applies iff the version matches; a node commit iff the run is running or awaiting,
-- every guarded state is as given and no unset item field is stored; a node commit writes the
-- record fields given (updated_at) and adds to the outstanding count and the version. Counters are
-- HINCRBY on the items hash: the commit that makes one reach its threshold adds its reserve to the
-- outstanding count and pushes its job. The deliveries are acknowledged (LREM) only while more
-- than the awaiting nodes is outstanding (else the worker settles the run first, then acks).
-- Then, optionally, the worker's next fetch step (take.lua, prepended, defines take_jobs): its 5
-- KEYS after all the commits' keys, its 5 args after all the commits' args.
-- Returns, per commit, 0 (nothing written) or {1, outstanding after, awaiting JSON, {indices (from
-- 1) of the counters reached}, 1 if acknowledged else 0}; with a fetch step, {those, take_jobs' reply}.
local CHUNK = 500
local pos = 2
local kb = 0

local function take()
  local v = ARGV[pos]; pos = pos + 1; return v
end

-- call `cmd key <n*width args>` in chunks, straight from ARGV (no table built per entry: a batch's
-- expansion carries an item field and a job per item, and the script blocks Redis while it runs)
local function chunked(cmd, key, n, width)
  local last = pos + n * width - 1
  while pos <= last do
    local upto = math.min(pos + CHUNK * width - 1, last)
    redis.call(cmd, key, unpack(ARGV, pos, upto))
    pos = upto + 1
  end
end

local function version_matches(expected)
  local current = redis.call('HGET', KEYS[kb + 1], 'version')
  if current then return tonumber(current) == expected end
  return expected == 0 and redis.call('EXISTS', KEYS[kb + 2]) == 1
end

-- consumes the guard and unset groups
local function checks_hold(expected)
  local guards = tonumber(take())
  local gpos = pos
  pos = pos + guards * 2
  local unset = tonumber(take())
  local upos = pos
  pos = pos + unset
  if expected ~= '' then return version_matches(tonumber(expected)) end
  local status = redis.call('HGET', KEYS[kb + 1], 'status')
  if status ~= RUNNING and status ~= AWAITING then return false end
  for i = 0, guards - 1 do
    local got = redis.call('HGET', KEYS[kb + 3], ARGV[gpos + 2 * i])
    local want = ARGV[gpos + 2 * i + 1]
    if want == '' then
      if got then return false end
    elseif got ~= want then
      return false
    end
  end
  for i = 0, unset - 1 do
    if redis.call('HEXISTS', KEYS[kb + 4], ARGV[upos + i]) == 1 then return false end
  end
  return true
end

local function awaiting_count(text)
  if not text or text == '{}' or text == 'null' then return 0 end
  local n = 0
  for _ in pairs(cjson.decode(text)) do n = n + 1 end
  return n
end

local function apply(expected)
  local ttl, final = tonumber(take()), take()
  local fields = tonumber(take())
  local record = {}
  if expected ~= '' then record = {'version', tostring(tonumber(expected) + 1)} end
  for i = 1, fields * 2 do record[#record + 1] = take() end
  if #record > 0 then redis.call('HSET', KEYS[kb + 1], unpack(record)) end
  if expected == '' then redis.call('HINCRBY', KEYS[kb + 1], 'version', 1) end
  chunked('HSET', KEYS[kb + 2], tonumber(take()), 2)
  chunked('HDEL', KEYS[kb + 2], tonumber(take()), 1)
  chunked('HSET', KEYS[kb + 3], tonumber(take()), 2)
  chunked('HSET', KEYS[kb + 4], tonumber(take()), 2)
  chunked('LPUSH', KEYS[kb + 6], tonumber(take()), 1)
  for _ = 1, tonumber(take()) do
    local list = tonumber(take())
    redis.call('LPUSH', KEYS[kb + list], take())
  end
  chunked('ZADD', KEYS[kb + 7], tonumber(take()), 2)
  for _ = 1, tonumber(take()) do
    local zset, score = tonumber(take()), take()
    redis.call('ZADD', KEYS[kb + zset], score, take())
  end
  local reached = {}
  for i = 1, tonumber(take()) do
    local field, delta, threshold, reserve, job = take(), tonumber(take()), tonumber(take()), tonumber(take()), take()
    local list = tonumber(take())
    if list == 0 then list = 6 end
    local after = redis.call('HINCRBY', KEYS[kb + 4], field, delta)
    if after - delta < threshold and threshold <= after then
      reached[#reached + 1] = i
      if reserve ~= 0 then redis.call('HINCRBY', KEYS[kb + 1], 'outstanding', reserve) end
      if job ~= '' then redis.call('LPUSH', KEYS[kb + list], job) end
    end
  end
  local delta = tonumber(take())
  local outstanding
  if delta ~= 0 then
    outstanding = redis.call('HINCRBY', KEYS[kb + 1], 'outstanding', delta)
  else
    outstanding = tonumber(redis.call('HGET', KEYS[kb + 1], 'outstanding') or '0')
  end
  local awaiting = redis.call('HGET', KEYS[kb + 1], 'awaiting') or '{}'
  local history, cap = take(), tonumber(take())
  if history ~= '' then
    if redis.call('RPUSH', KEYS[kb + 8], history) > cap then redis.call('LTRIM', KEYS[kb + 8], -cap, -1) end
  end
  local acks = tonumber(take())
  local acked = 0
  if outstanding > awaiting_count(awaiting) or final ~= '' then
    for i = 1, acks do
      redis.call('LREM', KEYS[kb + 8 + i], 1, take())
    end
    acked = 1
  end
  if final ~= '' then
    redis.call('SET', KEYS[kb + 5], final)
    if ttl > 0 then
      for i = 1, 5 do redis.call('EXPIRE', KEYS[kb + i], ttl) end
      redis.call('EXPIRE', KEYS[kb + 8], ttl)
    end
    -- the run list index (create.lua): out of `active`, into its final status's set, scored by updated_at
    local ix = redis.call('HMGET', KEYS[kb + 1], 'ix', 'run_id', 'status', 'updated_at')
    if ix[1] and ix[2] and ix[3] and ix[4] then
      redis.call('ZREM', ix[1] .. 'active', ix[2])
      redis.call('ZADD', ix[1] .. ix[3], ix[4], ix[2])
      redis.call('ZADD', ix[1] .. 'all', ix[4], ix[2])
      if ttl > 0 then  -- entries of runs whose keys expired by now (a status set holds ended runs only)
        redis.call('ZREMRANGEBYSCORE', ix[1] .. ix[3], '-inf', '(' .. (tonumber(ix[4]) - ttl))
      end
    end
  end
  return {1, outstanding, awaiting, reached, acked}
end

local results = {}
for c = 1, tonumber(ARGV[1]) do
  local nkeys, nargs = tonumber(take()), tonumber(take())
  local next_pos = pos + nargs
  local expected = take()
  if checks_hold(expected) then
    results[c] = apply(expected)
  else
    results[c] = 0
  end
  pos = next_pos
  kb = kb + nkeys
end
if ARGV[pos] then
  return {results, take_jobs(kb, pos - 1)}
end
return results
