local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per, perday = tonumber(ARGV[1]), tonumber(ARGV[2])
local day = 86400000
local function rcpts(m) return tonumber(string.match(m, '^%d+:(%d+):')) end
local occurrences = {}
local function add(key, at, n, k)
  local prefix = string.format('%d', at) .. ':' .. string.format('%d', n) .. ':'
  local have = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, at, at)) do
    if string.sub(m, 1, #prefix) == prefix then have = have + 1 end
  end
  if have <= k then redis.call('ZADD', key, at, prefix .. 'import' .. k) end
end
local function expire(key, want)
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then return end
  if ttl < want then redis.call('PEXPIRE', key, want) end
end
local rate_until, day_until = 0, 0
for i = 3, #ARGV, 2 do
  local at, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local id = ARGV[i] .. ':' .. ARGV[i + 1]
  local k = occurrences[id] or 0
  occurrences[id] = k + 1
  -- A send "later than now" comes from a host whose clock is ahead: it still counts.
  if per >= 0 and at + per > now then
    add(KEYS[1], at, n, k)
    rate_until = math.max(rate_until, at + per)
  end
  if perday == 1 and n > 0 and at + day > now then
    add(KEYS[2], at, n, k)
    day_until = math.max(day_until, at + day)
  end
end
if rate_until > now then expire(KEYS[1], rate_until - now) end
if perday == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - day)
  local sum = 0
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do sum = sum + rcpts(m) end
  if sum > 0 then
    if day_until > now then expire(KEYS[2], day_until - now) end
    local ttl = redis.call('PTTL', KEYS[2])
    redis.call('SET', KEYS[3], sum, 'PX', ttl > 0 and ttl or day)
  else
    redis.call('DEL', KEYS[3])
  end
end
return 1
