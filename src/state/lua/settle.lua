local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per = tonumber(ARGV[2])
if per > 0 then
  -- Added again if a transaction longer than the window let it age out meanwhile.
  redis.call('ZADD', KEYS[1], 'GT', now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], per)
end
if redis.call('ZADD', KEYS[2], 'XX', 'GT', 'CH', now, ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[2], 86400000)
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], 86400000) end
end
return 1
