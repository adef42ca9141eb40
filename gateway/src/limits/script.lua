-- One atomic check-and-count per request, shared by every gateway replica.
-- KEYS[1] rate (GCRA theoretical arrival time, microseconds), KEYS[2] this month's
-- count, KEYS[3] today's usage hash.
-- ARGV[1] requests per second (-1: none), ARGV[2] monthly requests (-1: none),
-- ARGV[3] TTL of the month key (s), ARGV[4] usage field, ARGV[5] TTL of usage (s),
-- ARGV[6] deadline (microseconds on this server's clock, -1: none): a script run
-- after it counts nothing, as the gateway has given up waiting and decided without it.
-- Returns {allowed (1, 0, or -1: too late, nothing counted), exceeded
--          ("rate"|"monthly"|""), retry_after_us, rate_remaining, month_used,
--          rate_reset_us, now_us}.
-- A deadline of -2 is a permission probe: nothing is read or counted; it answers
-- {-2, ...} when this Redis user may run every command below on these keys, else a
-- NOPERM error naming the first it may not (redis.acl_check_cmd, Redis 7).
if tonumber(ARGV[6]) == -2 then
  local uses = {
    {'TIME'},
    {'GET', KEYS[1]}, {'SET', KEYS[1], '0', 'PX', '1'},
    {'GET', KEYS[2]}, {'INCR', KEYS[2]}, {'EXPIRE', KEYS[2], '1', 'NX'},
    {'HINCRBY', KEYS[3], ARGV[4], '1'}, {'EXPIRE', KEYS[3], '1', 'NX'},
  }
  for _, use in ipairs(uses) do
    if not redis.acl_check_cmd(unpack(use)) then
      return redis.error_reply('NOPERM this user may not run ' .. use[1] .. ' on ' .. (use[2] or 'the server'))
    end
  end
  return {-2, '', 0, 0, 0, 0, 0}
end
local rps = tonumber(ARGV[1])
local monthly = tonumber(ARGV[2])
local deadline = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if deadline >= 0 and now > deadline then
  return {-1, '', 0, 0, 0, 0, now}
end

local used = 0
if monthly >= 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= monthly then
    return {0, 'monthly', 0, 0, used, 0, now}
  end
end

local remaining = -1
local reset = 0
if rps == 0 then
  return {0, 'rate', 1000000, 0, used, 1000000, now}
elseif rps > 0 then
  -- GCRA with a burst of one second's worth of requests.
  local interval = 1000000 / rps
  local tolerance = 1000000
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if now < allow_at then
    return {0, 'rate', math.ceil(allow_at - now), 0, used, math.ceil(tat - now), now}
  end
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  remaining = math.floor((tolerance - (new_tat - now)) / interval)
  reset = math.ceil(new_tat - now)
end

if monthly >= 0 then
  used = redis.call('INCR', KEYS[2])
  if used == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3], 'NX') end
end
if redis.call('HINCRBY', KEYS[3], ARGV[4], 1) == 1 then
  -- NX: only a new hash gets the TTL. A new field of a hash the operator has confirmed
  -- (TTL lowered, say a request from a replica whose clock is slow) keeps the lower TTL.
  redis.call('EXPIRE', KEYS[3], ARGV[5], 'NX')
  -- A hash's epoch (platform-contract usage::EPOCH_FIELD): set by the first increment
  -- of a new hash, so the operator tells a hash Redis lost and re-created from growth.
  if redis.call('HINCRBY', KEYS[3], '~epoch', 0) == 0 then
    redis.call('HINCRBY', KEYS[3], '~epoch', string.format('%.0f', now))
  end
end
return {1, '', 0, remaining, used, reset, now}
