local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local count, per, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local day = 86400000
local function rcpts(m) return tonumber(string.match(m, '^%d+:(%d+):')) end
local used = 0
if count > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - per)
end
if limit >= 0 then
  local gone = 0
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - day)
  if #old > 0 then
    for _, m in ipairs(old) do gone = gone + rcpts(m) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - day)
  end
  local sum = redis.call('GET', KEYS[3])
  if redis.call('EXISTS', KEYS[2]) == 0 then
    -- No send is left in the day, whatever a counter that outlived them says.
    if sum then redis.call('DEL', KEYS[3]) end
  elseif not sum then
    -- The counter is gone (evicted): count the sends again.
    for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do used = used + rcpts(m) end
    local ttl = redis.call('PTTL', KEYS[2])
    redis.call('SET', KEYS[3], used, 'PX', ttl > 0 and ttl or day)
  else
    used = tonumber(sum) - gone
    if used < 0 then used = 0 end
    -- KEEPTTL: the counter expires with the sends it counts, never after them.
    if #old > 0 then redis.call('SET', KEYS[3], used, 'KEEPTTL') end
  end
end
local out = {0, ''}
for i = 5, #ARGV do
  local n = tonumber(ARGV[i])
  if count == 0 or (limit >= 0 and n > limit) then
    out[1] = 2
    return out
  end
  local earliest = now
  if count > 0 then
    local inw = redis.call('ZCARD', KEYS[1])
    if inw >= count then
      local e = redis.call('ZRANGE', KEYS[1], inw - count, inw - count, 'WITHSCORES')
      earliest = math.max(earliest, tonumber(e[2]) + per)
    end
  end
  if limit >= 0 and used + n > limit then
    local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    -- Counted from the sends themselves before anything waits (or, worse, is let
    -- through because no send's leaving would make room): the counter only caches this.
    local real = 0
    for j = 1, #all, 2 do real = real + rcpts(all[j]) end
    if real ~= used then
      used = real
      redis.call('SET', KEYS[3], used, 'KEEPTTL')
    end
    local left = used
    if left + n > limit then
      for j = 1, #all, 2 do
        left = left - rcpts(all[j])
        if left + n <= limit then
          earliest = math.max(earliest, tonumber(all[j + 1]) + day)
          break
        end
      end
    end
  end
  if earliest > now then
    out[1] = 1
    out[2] = string.format('%d', earliest - now)
    return out
  end
  local member = string.format('%d', now) .. ':' .. string.format('%d', n) .. ':' .. ARGV[4] .. i
  if count > 0 then
    redis.call('ZADD', KEYS[1], now, member)
    redis.call('PEXPIRE', KEYS[1], per)
  end
  if limit >= 0 and n > 0 then
    redis.call('ZADD', KEYS[2], now, member)
    used = used + n
    redis.call('SET', KEYS[3], used, 'PX', day)
    redis.call('PEXPIRE', KEYS[2], day)
  end
  out[#out + 1] = member
end
return out
