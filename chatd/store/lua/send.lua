-- Accept (or refuse) a batch of messages, atomically, in arrival order: the
-- whole rule of the contract for each one (ref retry, receiver check, dedup,
-- inbox TTL and limit, enqueue), one round trip for the batch.
--
-- Each redis.call costs the store about as much as a whole pipelined call
-- of a client (argv objects, lookup, reply, through valkey's module API), so
-- what can be read or written once per batch is: one MGET reads every
-- receiver's token, presence and id counter, one MSET writes the counters
-- back; per message there is the dedup marker and the append, per receiver
-- the inbox TTL if its inbox held messages already (below). So are Lua
-- tables and strings (about a small command each in Valkey 9): none is made
-- per message that is not needed. (benchmarks/store_cost.py measures it;
-- README "Performance" says where the rest goes.)
--
-- KEYS (chatd/store/steps.py, Store._send_group), all of one Redis Cluster
-- slot: first five per receiver (seven with push wake-ups on), each
-- receiver once, in order of its first message, in this order:
local TOKEN, SEQ, INBOX, NODE, SENDERS, PUSH, DUE = 1, 2, 3, 4, 5, 6, 7
--   TOKEN the token hash (exists = registered), SEQ the id counter (never
--   expires), INBOX the list of stored messages (oldest first), NODE the
--   presence record ("<node id> <epoch>"), SENDERS the receipt senders
--   (``rs``: senders who had opted in, see below), PUSH the push
--   registration and
--   wake-up state, DUE the receiver's shard of the due index (in its slot:
--   see chatd/store/layout.py);
-- then one per message, DEDUP the dedup marker of its text; then one per
--   message that has a ref, REF its (sender, ref) record.
-- ARGV: now_ms, dedup_window_ms, inbox_limit, inbox_ttl_ms, ref_ttl_ms,
--   late_ms, refs, node id, push_interval_ms (-1: push is off),
--   push_unacked_ms, receivers (how many), each message's receiver (its
--   number, 1-based in the order of KEYS, in RECEIVER_DIGITS digits), then
--   one tail per message.
--   A message accepted for a receiver with a push registration makes its
--   wake-up due in this same step (an entry in DUE, scored by when it may be
--   claimed): at once if the receiver is bound nowhere (but no sooner than
--   push_interval after its last wake-up), after push_unacked if it is bound
--   (checked again at the claim: push_claim.lua). Its code is then
--   "a<ms until due>" instead of "a".
--   late_ms: the store's clock time after which the sender has been told
--     "unavailable"; a batch run later stores nothing (0: no check).
--   refs: one character per message, "0" + 1 if it has a ref, + 2 if its
--     sender's connection opted in to receipts (it may then get a delivered
--     receipt at the ack: the message's id is written in SENDERS, so that
--     an ack of messages whose senders did not opt in reads no sender's
--     key, chatd/store/layout.py "rs").
--   tail: the stored message after its sent_at value (sender, receiver, text).
--   node id: the sending node. An accepted message for a receiver bound on
--     another node is published on the receiver's notify channel
--     ("m <stored message>"), in the same step: no round trip of its own,
--     and none at all when the receiver is here or offline.
--
-- Returns two items per message: a code and a value:
--   "a" accepted, with its id (chatd has the rest of the stored message:
--   ENTRY_HEAD id ENTRY_MID now_ms tail); "d" duplicate,
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
local receivers = tonumber(ARGV[11])
local numbers = ARGV[12]
local RECEIVER_DIGITS = 3
local TAILS = 12                               -- ARGV: the tails after this
local PER_RECEIVER = interval < 0 and 5 or 7   -- no PUSH, DUE without push
local MARKS = receivers * PER_RECEIVER         -- KEYS: DEDUP, then REF, after this
local REFS = MARKS + #refs
local next_ref = REFS + 1

-- Every receiver's token, presence and counter, in one call: nothing else
-- changes them while the function runs (the store's clock stands still).
-- Per receiver r (its keys at KEYS[(r - 1) * PER_RECEIVER + 1 ...]):
-- known[r] registered, bound[r] "<node id> <epoch>" or false, seq[r] its
-- id counter as this batch leaves it, moved[r] whether the batch took ids.
local known, bound, seq, moved, renewed, woken, listed = {}, {}, {}, {}, {}, {}, {}
do
  local names = {}
  for r = 1, receivers do
    local base = (r - 1) * PER_RECEIVER
    names[3 * r - 2] = KEYS[base + TOKEN]
    names[3 * r - 1] = KEYS[base + NODE]
    names[3 * r] = KEYS[base + SEQ]
  end
  local state = redis.call("MGET", unpack(names))
  for r = 1, receivers do
    known[r] = state[3 * r - 2] and true or false
    bound[r] = state[3 * r - 1] or false
    seq[r] = tonumber(state[3 * r]) or 0
  end
end

-- Append a stored message to receiver r's inbox, within the limit: the id,
-- the stored line and the inbox's length, or nil (the inbox is full; the
-- counter is left as it was). Push first and take it back if that went over
-- (rare): one call less per message than counting first; expired messages
-- are only looked for when the inbox seems full.
local function enqueue(r, inbox, tail)
  local id = string.format("%016d", seq[r] + 1)
  local entry = ENTRY_HEAD .. id .. ENTRY_MID .. now .. tail
  local length = redis.call("RPUSH", inbox, entry)
  if length > limit then
    redis.call("RPOP", inbox)
    drop_expired(inbox, cutoff)
    if redis.call("LLEN", inbox) >= limit then return nil end
    length = redis.call("RPUSH", inbox, entry)
  end
  seq[r] = seq[r] + 1
  moved[r] = true
  return id, entry, length
end

-- A wake-up is due (once per receiver per batch): "" or the ms until due.
-- The registration's "due" field mirrors the device's score in DUE (every
-- step that scores or removes it keeps it), so that a wake-up already due
-- as soon as this one would be costs one HMGET and nothing more.
local function wake(r, base, inbox)
  if interval < 0 or woken[r] then return "" end
  woken[r] = true
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
  if bound[r] then
    score = t + unacked
  else
    score = math.max(t, (tonumber(reg[2]) or 0) + interval)
  end
  if due and due <= score then return "" end
  redis.call("ZADD", KEYS[base + DUE], score, string.match(inbox, "^chatd:{(.-)}:"))
  redis.call("HSET", KEYS[base + PUSH], "due", score)
  return tostring(score - t)
end

-- The whole rule for message i, for receiver r: its code and value (see
-- above).
local function send_one(i, r, tail, has_ref, opted)
  local base = (r - 1) * PER_RECEIVER
  local dedup = KEYS[MARKS + i]
  local ref = nil
  if has_ref then
    ref = KEYS[next_ref]
    next_ref = next_ref + 1
  end
  local inbox = KEYS[base + INBOX]
  local first = ref and redis.call("GET", ref)
  if first then
    if first == "d" then return "rd", "" end
    return "ra", string.sub(first, 3)
  end
  if not known[r] then return "u", "" end
  if window > 0 and not redis.call("SET", dedup, "1", "PX", ARGV[2], "NX") then
    -- the marker of an accepted copy is there: SET NX leaves it as it is
    -- (anchored on the accepted copy: a suppressed copy does not extend it)
    if ref then redis.call("SET", ref, "d", "PX", ref_ms) end
    return "d", ""
  end
  local id, entry, length = enqueue(r, inbox, tail)
  if not id then
    -- not accepted: no dedup marker either (SET NX just made it)
    if window > 0 then redis.call("DEL", dedup) end
    return "f", ""
  end
  -- the inbox's TTL, renewed once per receiver per batch if it holds other
  -- messages: an inbox this message made gets none here (most are acked
  -- before another message comes, and a TTL per message was a tenth of the
  -- store's cost); an abandoned one is given its TTL by the inbox sweeper
  -- (inbox_ttl.lua; chatd/store/layout.py "inbox")
  if length > 1 and not renewed[r] then
    redis.call("PEXPIRE", inbox, ttl_ms)
    renewed[r] = true
  end
  if ref then redis.call("SET", ref, "a:" .. id, "PX", ref_ms) end
  if opted then
    -- a receipt to make at the ack: the sender's newest such id here,
    -- written into SENDERS once per receiver after the batch (below)
    local named = listed[r]
    if not named then
      named = {}
      listed[r] = named
    end
    named[string.match(tail, '^,"sender":"([^"]*)"')] = id
  end
  -- tell the node that holds the receiver, if it is another one
  local at = bound[r]
  if at and string.sub(at, 1, #node) ~= node then
    redis.call("SPUBLISH", channel_of(inbox), "m " .. entry)
  end
  if interval < 0 then return "a", id end
  return "a" .. wake(r, base, inbox), id
end

local out = {}
-- (a call that fails midway, a key of another type: the counters the batch
-- moved are still written below, so that no id is ever given twice)
local ok, err = pcall(function()
  local byte = string.byte
  for i = 1, #refs do
    local flags = byte(refs, i) - 48
    -- the receiver's number, RECEIVER_DIGITS (3) ASCII digits
    local d1, d2, d3 = byte(numbers, (i - 1) * RECEIVER_DIGITS + 1, i * RECEIVER_DIGITS)
    local code, value = send_one(i, d1 * 100 + d2 * 10 + d3 - 5328,
                                 ARGV[TAILS + i], flags % 2 == 1, flags >= 2)
    out[2 * i - 1] = code
    out[2 * i] = value
  end
end)
-- the counters the batch moved, in one call
local counters, c = {}, 0
for r = 1, receivers do
  if moved[r] then
    counters[c + 1] = KEYS[(r - 1) * PER_RECEIVER + SEQ]
    counters[c + 2] = string.format("%d", seq[r])
    c = c + 2
  end
end
if #counters > 0 then redis.call("MSET", unpack(counters)) end
-- each receiver's opted-in senders, one HSET for the batch (ids only rise
-- in it: the last one named per sender is its newest), also after a call
-- that failed midway (its accepted messages stay, and so do their receipts)
for r, named in pairs(listed) do
  local senders, fields = KEYS[(r - 1) * PER_RECEIVER + SENDERS], {}
  for s, id in pairs(named) do
    fields[#fields + 1] = s
    fields[#fields + 1] = id
  end
  redis.call("HSET", senders, unpack(fields))
  redis.call("PEXPIRE", senders, ttl_ms)
end
if not ok then error(err) end
return out
