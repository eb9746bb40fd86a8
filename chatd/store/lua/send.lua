-- Accept (or refuse) a batch of messages, atomically, in arrival order: the
-- whole rule of the contract for each one (ref retry, receiver check, dedup,
-- inbox TTL and limit, enqueue), one round trip for the batch.
--
-- KEYS, six per message, all of the receiver's hash tag:
--   token hash (exists = registered), id counter (never expires), inbox (a
--   list of push lines, oldest first), dedup marker of the text, the
--   (sender, ref) record (unused when the message has no ref), and the
--   receiver's presence record ("<node id> <epoch>", see claim.lua).
-- ARGV: now_ms, dedup_window_ms, inbox_limit, inbox_ttl_ms, ref_ttl_ms,
--   late_ms, refs, node id, then one tail per message.
--   late_ms: the store's clock time after which the sender has been told
--     "unavailable"; a batch run later stores nothing (0: no check).
--   refs: one character per message, "1" if it has a ref.
--   tail: the push line after the sent_at value (sender, receiver, text).
--   node id: the sending node. An accepted message for a receiver bound on
--     another node is published on the receiver's notify channel
--     ("m <push line>", see chatd/notify.py), in the same step: no round
--     trip of its own, and none at all when the receiver is here or offline.
--
-- Returns two items per message: a code and an id (or ""):
--   "a" accepted, "d" duplicate, "u" unknown receiver, "f" inbox full; a retry
--   of a known ref gets the first reply again: "ra" (with its id) or "rd".
-- Or {"late"} when the batch ran after late_ms.
local late = tonumber(ARGV[6])
if late > 0 then
  local t = redis.call("TIME")
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > late then
    return {"late"}
  end
end

local now = ARGV[1]
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local cutoff = tonumber(now) - tonumber(ARGV[4])
local refs = ARGV[7]
local node = ARGV[8] .. " "
local out = {}
-- what is read once per receiver per batch (nothing else changes them while
-- the script runs, and the store's clock stands still): whether it is
-- registered, where it is bound, whether its inbox's TTL is renewed
local known, bound, renewed = {}, {}, {}

for i = 1, #refs do
  local k = (i - 1) * 6
  local inbox, ref = KEYS[k + 3], nil
  if string.byte(refs, i) == 49 then ref = KEYS[k + 5] end
  local code, id = nil, ""
  local first = ref and redis.call("GET", ref)
  local registered = known[inbox]
  if registered == nil and not first then
    registered = redis.call("EXISTS", KEYS[k + 1]) == 1
    known[inbox] = registered
  end
  if first then
    if first == "d" then code = "rd" else code, id = "ra", string.sub(first, 3) end
  elseif not registered then
    code = "u"
  elseif window > 0 and not redis.call("SET", KEYS[k + 4], "1", "PX", ARGV[2], "NX") then
    -- the marker of an accepted copy is there: SET NX leaves it as it is
    -- (anchored on the accepted copy: a suppressed copy does not extend it)
    code = "d"
    if ref then redis.call("SET", ref, "d", "PX", ARGV[5]) end
  else
    -- push first and take it back if that went over the limit (rare): one
    -- call less per message than counting first; expired messages are only
    -- looked for when the inbox seems full (a read drops them anyway)
    local seq = redis.call("INCR", KEYS[k + 2])
    id = string.format("%016d", seq)
    local entry = '{"type":"message","id":"' .. id .. '","sent_at":' .. now .. ARGV[8 + i]
    if redis.call("RPUSH", inbox, entry) > limit then
      redis.call("RPOP", inbox)
      drop_expired(inbox, cutoff)
      if redis.call("LLEN", inbox) < limit then
        redis.call("RPUSH", inbox, entry)
      else
        redis.call("SET", KEYS[k + 2], seq - 1)
        -- not accepted: no dedup marker either (SET NX just made it)
        if window > 0 then redis.call("DEL", KEYS[k + 4]) end
        code, id = "f", ""
      end
    end
    if code == nil then
      code = "a"
      if not renewed[inbox] then
        redis.call("PEXPIRE", inbox, ARGV[4])
        renewed[inbox] = true
      end
      if ref then redis.call("SET", ref, "a:" .. id, "PX", ARGV[5]) end
      local at = bound[inbox]
      if at == nil then
        at = redis.call("GET", KEYS[k + 6]) or false
        bound[inbox] = at
      end
      if at and string.sub(at, 1, #node) ~= node then
        redis.call("SPUBLISH", string.sub(KEYS[k + 6], 1, -5) .. "notify", "m " .. entry)
      end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = id
end
return out
