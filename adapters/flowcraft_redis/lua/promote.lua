-- One fetch step of RedisQueue (take.lua, prepended, defines take_jobs; see there for KEYS/ARGV).
return take_jobs(0, 0)
