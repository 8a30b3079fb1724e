-- RedisRunStore.touch: refresh a running run's updated_at without bumping its version.
-- KEYS: 1 record hash. ARGV: 1 updated_at (unix seconds).
if redis.call('HGET', KEYS[1], 'status') == RUNNING then  -- RUNNING: see `load_script`
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
  return 1
end
return 0
