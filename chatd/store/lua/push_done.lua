-- flag: allow-oom (it writes a few small fields, or deletes)
-- The end of a claimed wake-up (push_claim.lua): what the gateway answered.
--
-- KEYS: DUE the device's due-index shard, PUSH its registration, SEQ, INBOX.
-- ARGV: device, now_ms, outcome, pushkey (the one the wake-up went to),
--   interval_ms, retry_for_ms, backoff_ms (the first retry's delay; each
--   next one doubles it, up to 10 minutes).
-- outcome:
--   "sent": noted; if messages came after the claim (the id counter moved)
--     and wait, the next wake-up is due interval_ms after this one (the
--     latest count then), else the entry is removed.
--   "rejected": the registration is removed (if it is still that pushkey).
--   "retry": a 5xx, 429, timeout or connection failure: due again after
--     backoff_ms, unless the first failure was retry_for_ms ago or more.
--   "failed": another answer; not retried.
-- Returns the result to count: sent, rejected, retried, dropped, failed.
local device, now, outcome = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local reg = redis.call("HMGET", KEYS[2], "key", "cseq", "fail", "tries")
if reg[1] ~= ARGV[4] then
  -- the registration changed meanwhile (removed, or replaced): nothing of
  -- this wake-up applies to it; a new one starts afresh
  if not reg[1] then redis.call("ZREM", KEYS[1], device) end
  return outcome == "retry" and "dropped" or outcome
end
if outcome == "rejected" then
  redis.call("DEL", KEYS[2])
  redis.call("ZREM", KEYS[1], device)
  return "rejected"
end
if outcome == "retry" then
  local first = tonumber(reg[3]) or now
  if now - first >= tonumber(ARGV[6]) then
    redis.call("HDEL", KEYS[2], "lease", "owner", "fail", "tries", "due")
    redis.call("HSET", KEYS[2], "last", now, "res", "dropped")
    redis.call("ZREM", KEYS[1], device)
    return "dropped"
  end
  local tries = tonumber(reg[4]) or 0
  local delay = math.min(tonumber(ARGV[7]) * 2 ^ tries, 600000)
  redis.call("HSET", KEYS[2], "fail", first, "tries", tries + 1, "res", "retrying",
             "due", now + delay)
  redis.call("HDEL", KEYS[2], "lease", "owner")
  redis.call("ZADD", KEYS[1], now + delay, device)
  return "retried " .. delay
end
redis.call("HSET", KEYS[2], "last", now, "res", outcome)
redis.call("HDEL", KEYS[2], "lease", "owner", "fail", "tries", "due")
local seq = tonumber(redis.call("GET", KEYS[3]) or 0)
if outcome == "sent" and seq > (tonumber(reg[2]) or 0) and redis.call("LLEN", KEYS[4]) > 0 then
  redis.call("ZADD", KEYS[1], now + tonumber(ARGV[5]), device)
  redis.call("HSET", KEYS[2], "due", now + tonumber(ARGV[5]))
else
  redis.call("ZREM", KEYS[1], device)
end
return outcome
