-- Accept one message, atomically: the whole rule of the contract in one step.
--
-- KEYS[1] receiver's token hash (exists = the receiver is registered)
-- KEYS[2] receiver's id counter (never expires: ids keep increasing)
-- KEYS[3] receiver's inbox, a list of stored push lines, oldest first
-- KEYS[4] dedup marker of this text for this receiver
-- KEYS[5] (optional) the (sender, ref) idempotency record
-- ARGV: now_ms, dedup_window_ms, inbox_limit, inbox_ttl_ms, ref_ttl_ms, tail
--   tail: the push line after the sent_at value (sender, receiver, text)
--
-- Returns {"a", id} accepted, {"d"} duplicate, {"u"} unknown receiver,
-- {"f"} inbox full; a retry of a known ref returns {"ra", id} or {"rd"}:
-- the first reply again, nothing stored (and nothing to push again).
local now = tonumber(ARGV[1])
local ref = KEYS[5]

if ref then
  local first = redis.call("GET", ref)
  if first then
    if first == "d" then return {"rd"} end
    return {"ra", string.sub(first, 3)}
  end
end

if redis.call("EXISTS", KEYS[1]) == 0 then return {"u"} end

local window = tonumber(ARGV[2])
if window > 0 and redis.call("EXISTS", KEYS[4]) == 1 then
  -- anchored on the accepted copy: a suppressed copy does not extend it
  if ref then redis.call("SET", ref, "d", "PX", ARGV[5]) end
  return {"d"}
end

-- drop what has outlived the inbox TTL (oldest first) before counting
local inbox = KEYS[3]
local cutoff = now - tonumber(ARGV[4])
drop_expired(inbox, cutoff)

if redis.call("LLEN", inbox) >= tonumber(ARGV[3]) then return {"f"} end

local id = string.format("%016d", redis.call("INCR", KEYS[2]))
redis.call("RPUSH", inbox, '{"type":"message","id":"' .. id .. '","sent_at":' .. ARGV[1] .. ARGV[6])
redis.call("PEXPIRE", inbox, ARGV[4])
if window > 0 then redis.call("SET", KEYS[4], "1", "PX", ARGV[2]) end
if ref then redis.call("SET", ref, "a:" .. id, "PX", ARGV[5]) end
return {"a", id}
