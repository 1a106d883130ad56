redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local n = tonumber(string.match(ARGV[1], '^%d+:(%d+):'))
  if tonumber(redis.call('GET', KEYS[3]) or '0') >= n then
    redis.call('DECRBY', KEYS[3], n)
  end
end
return 1
