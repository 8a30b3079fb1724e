-- Apply version-checked Commits atomically (RedisRunStore.commit / commit_many): one call for a
-- whole wave of node executions, each commit checked and applied on its own.
--
-- ARGV[1]: the number of commits; then, per commit, a header "number of keys", "number of args"
-- followed by that commit's args; the keys of all commits follow each other in KEYS.
-- A commit's KEYS: 1 record hash, 2 context hash, 3 node states hash, 4 items hash, 5 status string,
--       6 ready list, 7 delayed zset, 8.. the processing list of each acknowledged delivery
-- A commit's args: 1 expected version, 2 TTL seconds for a final run (0 = keep), 3 status JSON
--       ("" = not final), then counted groups, each "n" followed by its entries:
--       record field/value pairs, context field/value pairs, context fields to delete,
--       node state id/JSON pairs, item field/JSON pairs, job bodies, delayed score/member pairs,
--       acknowledged delivery bodies (one per key 8.., in order)
-- Then, optionally, the worker's next fetch step (take.lua, prepended, defines take_jobs): its 5
-- KEYS after all the commits' keys, its 5 args after all the commits' args.
-- Returns one integer per commit: 1 when applied, 0 (nothing written) when the version did not match;
-- with a fetch step, {those integers, take_jobs' reply}.
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

local function apply(expected)
  local ttl, final = tonumber(take()), take()
  local fields = tonumber(take())
  local record = {'version', tostring(expected + 1)}
  for i = 1, fields * 2 do record[#record + 1] = take() end
  redis.call('HSET', KEYS[kb + 1], unpack(record))
  chunked('HSET', KEYS[kb + 2], tonumber(take()), 2)
  chunked('HDEL', KEYS[kb + 2], tonumber(take()), 1)
  chunked('HSET', KEYS[kb + 3], tonumber(take()), 2)
  chunked('HSET', KEYS[kb + 4], tonumber(take()), 2)
  chunked('LPUSH', KEYS[kb + 6], tonumber(take()), 1)
  chunked('ZADD', KEYS[kb + 7], tonumber(take()), 2)
  local acks = tonumber(take())
  for i = 1, acks do
    redis.call('LREM', KEYS[kb + 7 + i], 1, take())
  end
  if final ~= '' then
    redis.call('SET', KEYS[kb + 5], final)
    if ttl > 0 then
      for i = 1, 5 do redis.call('EXPIRE', KEYS[kb + i], ttl) end
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
end

local results = {}
for c = 1, tonumber(ARGV[1]) do
  local nkeys, nargs = tonumber(take()), tonumber(take())
  local next_pos = pos + nargs
  local expected = tonumber(take())
  if version_matches(expected) then
    apply(expected)
    results[c] = 1
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
