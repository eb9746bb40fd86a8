-- Accept (or refuse) a batch of messages, atomically, in arrival order: the
-- whole rule of the contract for each one (ref retry, receiver check, dedup,
-- inbox TTL and limit, enqueue), one round trip for the batch.
--
-- KEYS, eight per message (chatd/store/steps.py, Store.send_then), all of the
-- receiver's slot (the first seven carry its hash tag), in this order:
local TOKEN, SEQ, INBOX, DEDUP, REF, NODE, PUSH, DUE = 1, 2, 3, 4, 5, 6, 7, 8
local PER_MESSAGE = 8
--   TOKEN the token hash (exists = registered), SEQ the id counter (never
--   expires), INBOX the list of stored messages (oldest first), DEDUP the
--   dedup marker of the text, REF the (sender, ref) record (unused when the
--   message has no ref), NODE the presence record ("<node id> <epoch>"),
--   PUSH the push registration and wake-up state, DUE the receiver's shard
--   of the due index (in its slot: see chatd/store/layout.py).
-- ARGV: now_ms, dedup_window_ms, inbox_limit, inbox_ttl_ms, ref_ttl_ms,
--   late_ms, refs, node id, push_interval_ms (-1: push is off),
--   push_unacked_ms, then one tail per message.
--   A message accepted for a receiver with a push registration makes its
--   wake-up due in this same step (an entry in DUE, scored by when it may be
--   claimed): at once if the receiver is bound nowhere (but no sooner than
--   push_interval after its last wake-up), after push_unacked if it is bound
--   (checked again at the claim: push_claim.lua). Its code is then
--   "a<ms until due>" instead of "a".
--   late_ms: the store's clock time after which the sender has been told
--     "unavailable"; a batch run later stores nothing (0: no check).
--   refs: one character per message, "1" if it has a ref.
--   tail: the stored message after its sent_at value (sender, receiver, text).
--   node id: the sending node. An accepted message for a receiver bound on
--     another node is published on the receiver's notify channel
--     ("m <stored message>"), in the same step: no round trip of its own,
--     and none at all when the receiver is here or offline.
--
-- Returns two items per message: a code and a value:
--   "a" accepted, with the stored message (its id inside); "d" duplicate,
--   "u" unknown receiver, "f" inbox full, with ""; a retry of a known ref
--   gets the first reply again: "ra" with its id, or "rd".
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
local ttl_ms = ARGV[4]
local ref_ms = ARGV[5]
local cutoff = tonumber(now) - tonumber(ttl_ms)
local refs = ARGV[7]
local node = ARGV[8] .. " "
local interval = tonumber(ARGV[9])
local unacked = tonumber(ARGV[10])
local TAILS = 10
-- what is read once per receiver per batch (nothing else changes them while
-- the function runs, and the store's clock stands still): whether it is
-- registered, where it is bound, whether its inbox's TTL is renewed
local known, bound, renewed, woken = {}, {}, {}, {}

-- Append a stored message to the inbox, within the limit: the id, or nil
-- (the inbox is full; the counter is left as it was). Push first and take
-- it back if that went over (rare): one call less per message than counting
-- first; expired messages are only looked for when the inbox seems full.
local function enqueue(base, tail)
  local seq = redis.call("INCR", KEYS[base + SEQ])
  local id = string.format("%016d", seq)
  local entry = ENTRY_HEAD .. id .. ENTRY_MID .. now .. tail
  local inbox = KEYS[base + INBOX]
  if redis.call("RPUSH", inbox, entry) > limit then
    redis.call("RPOP", inbox)
    drop_expired(inbox, cutoff)
    if redis.call("LLEN", inbox) >= limit then
      redis.call("SET", KEYS[base + SEQ], seq - 1)
      return nil
    end
    redis.call("RPUSH", inbox, entry)
  end
  return id, entry
end

-- Where the receiver is bound ("<node id> <epoch>"), or false.
local function where(base, inbox)
  local at = bound[inbox]
  if at == nil then
    at = redis.call("GET", KEYS[base + NODE]) or false
    bound[inbox] = at
  end
  return at
end

-- A wake-up is due (once per receiver per batch): "" or the ms until due.
-- The registration's "due" field mirrors the device's score in DUE (every
-- step that scores or removes it keeps it), so that a wake-up already due
-- as soon as this one would be costs one HMGET and nothing more.
local function wake(base, inbox)
  if interval < 0 or woken[inbox] then return "" end
  woken[inbox] = true
  local reg = redis.call("HMGET", KEYS[base + PUSH], "key", "last", "tries", "lease", "due")
  if not reg[1] then return "" end
  local t = tonumber(now)
  -- a wake-up in flight: its end (push_done.lua) makes the next one due if
  -- messages came meanwhile (the id counter moved)
  if (tonumber(reg[4]) or 0) > t then return "" end
  local due = tonumber(reg[5])
  -- a wake-up being retried keeps its back-off
  if reg[3] and due then return "" end
  local score
  if where(base, inbox) then
    score = t + unacked
  else
    score = math.max(t, (tonumber(reg[2]) or 0) + interval)
  end
  if due and due <= score then return "" end
  redis.call("ZADD", KEYS[base + DUE], score, string.match(inbox, "^chatd:{(.-)}:"))
  redis.call("HSET", KEYS[base + PUSH], "due", score)
  return tostring(score - t)
end

-- Tell the node that holds the receiver, if it is another one.
local function notify(base, inbox, entry)
  local at = where(base, inbox)
  if at and string.sub(at, 1, #node) ~= node then
    redis.call("SPUBLISH", channel_of(inbox), "m " .. entry)
  end
end

-- The whole rule for one message: its code and value (see above).
-- (``base``: the offset of the message's keys in KEYS)
local function send_one(base, tail, has_ref)
  local ref = has_ref and KEYS[base + REF] or nil
  local inbox = KEYS[base + INBOX]
  local first = ref and redis.call("GET", ref)
  if first then
    if first == "d" then return "rd", "" end
    return "ra", string.sub(first, 3)
  end
  local registered = known[inbox]
  if registered == nil then
    registered = redis.call("EXISTS", KEYS[base + TOKEN]) == 1
    known[inbox] = registered
  end
  if not registered then return "u", "" end
  if window > 0 and not redis.call("SET", KEYS[base + DEDUP], "1", "PX", ARGV[2], "NX") then
    -- the marker of an accepted copy is there: SET NX leaves it as it is
    -- (anchored on the accepted copy: a suppressed copy does not extend it)
    if ref then redis.call("SET", ref, "d", "PX", ref_ms) end
    return "d", ""
  end
  local id, entry = enqueue(base, tail)
  if not id then
    -- not accepted: no dedup marker either (SET NX just made it)
    if window > 0 then redis.call("DEL", KEYS[base + DEDUP]) end
    return "f", ""
  end
  if not renewed[inbox] then
    redis.call("PEXPIRE", inbox, ttl_ms)
    renewed[inbox] = true
  end
  if ref then redis.call("SET", ref, "a:" .. id, "PX", ref_ms) end
  notify(base, inbox, entry)
  return "a" .. wake(base, inbox), entry
end

local out = {}
for i = 1, #refs do
  local code, value = send_one((i - 1) * PER_MESSAGE, ARGV[TAILS + i],
                               string.byte(refs, i) == 49)
  out[#out + 1] = code
  out[#out + 1] = value
end
return out
