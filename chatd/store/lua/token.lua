-- flag: allow-oom (a phone must still reconnect to a full store: it drains it)
-- Use a device's token (a reconnect, or a one-shot send), with rotation and
-- reuse detection (contract 1.2, "Token rotation"), in one atomic step: two
-- nodes racing on two copies of one token cannot both count as its first use.
--
-- KEYS[1] the newest token's hash (absent: never registered; "revoked"),
--   KEYS[2] the rotation record (a hash: "prev" the token presented to get
--   the newest one, "used" "1" once the newest was used, "retired" the
--   prefixes of older tokens, RETIRED_LEN hex digits each, newest last),
--   KEYS[3] the device's notify channel.
-- ARGV: the presented token's hash; the hash of a new token to rotate to
--   ("" : no rotation, just a use: a one-shot send, or --token-rotation off);
--   how many retired prefixes to keep.
--
-- The valid tokens are the newest and, while the newest was never used, the
-- one presented to get it ("prev": a reply lost on a dying connection costs
-- nothing). A token that was valid and then retired (its successor was
-- used) presented again is REUSE: every token of the id is revoked and the
-- node holding it is told to close it ("revoked" on its channel).
-- Returns "newest" or "prev" (which one was presented: valid; with "+" when
-- the device opted in to receipts while it had not: see opt_in), "bad",
-- "reuse", or "reused" (any token of an id revoked by a reuse before: the
-- device is told why, until it registers again).
local RETIRED_LEN = 32
local presented, new, keep = ARGV[1], ARGV[2], tonumber(ARGV[3])
local newest = redis.call("GET", KEYS[1])
if not newest then return "bad" end
if newest == "revoked" then
  if redis.call("HGET", KEYS[2], "reused") == "1" then return "reused" end
  return "bad"
end
local rec = redis.call("HMGET", KEYS[2], "prev", "used", "retired")
local prev, used, retired = rec[1], rec[2] == "1", rec[3] or ""

-- Keep the last `keep` retired prefixes, the given one added.
local function retire(hash)
  if not hash then return retired end
  local all = retired .. string.sub(hash, 1, RETIRED_LEN)
  local over = #all - keep * RETIRED_LEN
  if over > 0 then all = string.sub(all, over + 1) end
  return all
end

local function was_retired(hash)
  local prefix = string.sub(hash, 1, RETIRED_LEN)
  for i = 1, #retired, RETIRED_LEN do
    if string.sub(retired, i, i + RETIRED_LEN - 1) == prefix then return true end
  end
  return false
end

-- A reconnect's receipts opt-in (1.2), stored with a valid use: ARGV[4]
-- "1" on, "0" off, "" (a one-shot send) unchanged; KEYS[4] the opt-in.
-- Returns "+" when the device opted in while it had not (the node then
-- raises RECEIPTS_TURNED, see ack.lua), else "".
local function opt_in()
  if ARGV[4] == "1" then
    if not redis.call("SET", KEYS[4], "1", "GET") then return "+" end
  elseif ARGV[4] == "0" then
    redis.call("DEL", KEYS[4])
  end
  return ""
end

if presented == newest then
  if new ~= "" then
    -- the newest is used: its predecessor retires, and it becomes the
    -- predecessor of a new newest
    redis.call("SET", KEYS[1], new)
    redis.call("HSET", KEYS[2], "prev", newest, "used", "0", "retired", retire(prev))
  elseif not used then
    redis.call("HSET", KEYS[2], "used", "1", "retired", retire(prev))
    redis.call("HDEL", KEYS[2], "prev")
  end
  return "newest" .. opt_in()
end
if prev and presented == prev and not used then
  -- the grace: the newest was never used (its reply may have been lost);
  -- a rotation replaces it, unused, by another (it is simply invalid now)
  if new ~= "" then redis.call("SET", KEYS[1], new) end
  return "prev" .. opt_in()
end
if (prev and presented == prev) or was_retired(presented) then
  redis.call("SET", KEYS[1], "revoked")
  redis.call("DEL", KEYS[2])
  redis.call("HSET", KEYS[2], "reused", "1")
  redis.call("SPUBLISH", KEYS[3], "revoked")
  return "reuse"
end
return "bad"
