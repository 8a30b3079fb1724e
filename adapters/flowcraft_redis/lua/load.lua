-- Read what a wave of jobs needs of their runs, atomically (RedisRunStore.load_many).
--
-- KEYS: per run, 1 record hash, 2 context hash, 3 node states hash
-- ARGV[1]: the number of runs; then, per run, counted groups ("n" then entries):
--       node ids, context fields; a count of -1 (no entries) asks for all of them
-- Returns per run {record as HGETALL, context exists (0/1; always 1 when there is a record), node
-- states, context values}: values as
-- HMGET for the fields asked, or as HGETALL (field, value, ...) for all.
local pos = 2
local function take_list()
  local n = tonumber(ARGV[pos]); pos = pos + 1
  if n < 0 then return nil end
  local out = {}
  for i = 1, n do out[i] = ARGV[pos]; pos = pos + 1 end
  return out
end
local function hmget(key, fields)
  if fields == nil then return redis.call('HGETALL', key) end
  if #fields == 0 then return {} end
  return redis.call('HMGET', key, unpack(fields))
end
local replies = {}
for r = 1, tonumber(ARGV[1]) do
  local kb = (r - 1) * 3
  local nodes = take_list()
  local fields = take_list()
  local record = redis.call('HGETALL', KEYS[kb + 1])
  -- whether the context exists matters only for a run without a record (a seed client's)
  local has_context = 1
  if #record == 0 then has_context = redis.call('EXISTS', KEYS[kb + 2]) end
  replies[r] = {record, has_context, hmget(KEYS[kb + 3], nodes), hmget(KEYS[kb + 2], fields)}
end
return replies
