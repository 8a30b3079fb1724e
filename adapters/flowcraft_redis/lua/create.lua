-- Create a run with its first jobs (RedisRunStore.create_run); nothing is written if it exists.
--
-- KEYS: 1 record hash, 2 context hash, 3 node states hash, 4 ready list, 5 history list, then the
--       ready lists of the other queues its routed jobs go to
-- ARGV: counted groups ("n" then entries): record field/value pairs, context field/value pairs,
--       node state id/JSON pairs, job bodies, history entries (JSON arrays of events), routed jobs
--       (index of their list in KEYS, body); then,
--       optionally, the run list index: its key
--       prefix, the run id and the creation time (the run enters `<ix>all` and `<ix>active`,
--       scored by that time; the record keeps `ix`, `run_id` and `created_at` for commit.lua)
-- Returns 1 when created, 0 when a record or a context of that run already exists.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local CHUNK = 500
local pos = 1
local function take_count()
  local n = tonumber(ARGV[pos]); pos = pos + 1; return n
end
local function chunked(cmd, key, n, width)
  local args = {}
  for i = 1, n * width do
    args[#args + 1] = ARGV[pos]; pos = pos + 1
    if #args >= CHUNK * width then
      redis.call(cmd, key, unpack(args)); args = {}
    end
  end
  if #args > 0 then redis.call(cmd, key, unpack(args)) end
end
chunked('HSET', KEYS[1], take_count(), 2)
chunked('HSET', KEYS[2], take_count(), 2)
chunked('HSET', KEYS[3], take_count(), 2)
chunked('LPUSH', KEYS[4], take_count(), 1)
chunked('RPUSH', KEYS[5], take_count(), 1)
for _ = 1, take_count() do
  local list = tonumber(ARGV[pos]); pos = pos + 1
  redis.call('LPUSH', KEYS[list], ARGV[pos]); pos = pos + 1
end
if ARGV[pos] then
  local ix, run_id, at = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2]
  redis.call('HSET', KEYS[1], 'ix', ix, 'run_id', run_id, 'created_at', at)
  redis.call('ZADD', ix .. 'all', at, run_id)
  redis.call('ZADD', ix .. 'active', at, run_id)
end
return 1
