-- flag: allow-oom (presence records are small: a phone must still bind and drain a full store)
-- Bind a device to this node (register or reconnect): the presence record
-- names this node with a new epoch (its expiry a backstop: a dead node's records
-- are reaped, chatd/hub/presence.py); whoever held it before is
-- told to let go (a kick on the device's notify channel, see chatd/store/layout.py).
--
-- KEYS[1] presence ("<node id> <epoch>", with an expiry), KEYS[2] epoch
--   counter (never expires), KEYS[3] the device's notify channel, KEYS[4]
--   the device's newest token hash, KEYS[5] its push registration (if it
--   has one, the time of this bind is noted there: a wake-up for messages
--   pushed on this connection waits --push-unacked from it, push_claim.lua)
-- ARGV: node id, expiry_ms, the token hash the bind was given ("": none),
--   now_ms, and when the binding connection was opened (ms; "": unknown)
-- KEYS[6]: when the holder's connection was opened (ms), written here.
-- Returns the new epoch. Epochs only grow: of two binds of one device, the
-- later one has the higher epoch, and a holder with a lower one closes.
-- Returns -1 (nothing claimed) when the bind's token is no longer the
-- newest: another reconnect with the same token rotated it since (token.lua),
-- so of two copies of a token presented at once, the bind that holds the id
-- is the one whose token is valid.
-- Returns -2 (nothing claimed, nobody kicked) when the device is held by a
-- connection opened after this one: a bind still on its way from a
-- connection the phone has given up on (closed meanwhile, as under a
-- reconnect storm) must never take the device from the phone's newer one.
if ARGV[3] ~= "" and redis.call("GET", KEYS[4]) ~= ARGV[3] then return -1 end
local old = redis.call("GET", KEYS[1])
if old and ARGV[5] and ARGV[5] ~= "" then
  local since = tonumber(redis.call("GET", KEYS[6]) or "0")
  if since and tonumber(ARGV[5]) < since then return -2 end
end
local epoch = redis.call("INCR", KEYS[2])
if ARGV[5] and ARGV[5] ~= "" then redis.call("SET", KEYS[6], ARGV[5]) end
redis.call("SET", KEYS[1], ARGV[1] .. " " .. epoch, "PX", ARGV[2])
if old then
  redis.call("SPUBLISH", KEYS[3], "k " .. epoch .. " " .. ARGV[1])
end
if ARGV[4] and redis.call("EXISTS", KEYS[5]) == 1 then
  redis.call("HSET", KEYS[5], "bound", ARGV[4])
end
return epoch
