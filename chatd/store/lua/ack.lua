-- flag: allow-oom (it only deletes: a store at its memory limit must still drain)
-- Remove acked messages from several inboxes (cumulative acks), one round
-- trip for the batch; and make the senders' delivered receipts (1.2) in the
-- same atomic step.
--
-- KEYS: inboxes; then, with receipts on, each one's receipt senders (rs);
--   then, in mode "o", each one's outbox (declared so that a slot being
--   migrated is refused up front, before anything is done);
-- ARGV: for each inbox, the highest acked id; then receipts mode
--   ("0" none: --receipts off; "d" direct: into the senders' inboxes, one
--   store; "o" outbox: into each receiver's outbox, Redis Cluster), now_ms,
--   node id, inbox_ttl_ms, turned (mode "o": RECEIPTS_TURNED as the node
--   read it after the ack came; mode "d" reads it here).
-- Returns how many messages were removed in all (mode "0"), or {removed,
-- then three items per thing for the node to do}:
--   "h", sender, receipt entry: a receipt for a sender bound on this node;
--   "o", receiver, "<field>=<value>": an outbox entry to move (cluster).
-- Ids in an inbox are consecutive, so the position of the acked id is known
-- from the head's id: the head is taken first (that is the whole ack of one
-- message), then the entry where the acked id must be is checked and the
-- rest taken up to it; a slow walk is the fallback (it never runs while the
-- ids are consecutive).
--
-- Which senders may get a receipt (the contract: those opted in at the
-- ack): those named in the receiver's rs (their connection had opted in
-- when they sent), their opt-in checked now. An inbox whose acked messages
-- name none there is acked as with receipts off: nothing is read or made
-- for its senders. Messages stored up to RECEIPTS_TURNED (a sender opted
-- in since it sent them, or an older release stored them without rs) are
-- acked carefully: every sender of them is checked, as if all were named.
-- (ARGV may also be the ids alone: mode "0", as the Redis layer's tests call
-- it, tests/redis/test_redisclient.py. Which it is, is told by the
-- count of KEYS: one per inbox in mode "0", two in "d", three in "o".)
local PER_INBOX = {["0"] = 1, d = 2, o = 3}
local n = #ARGV - 5
if n < 1 or #KEYS ~= n * (PER_INBOX[ARGV[n + 1]] or 0) then n = #KEYS end
local mode, now, node_sp, ttl_ms = ARGV[n + 1] or "0", ARGV[n + 2], (ARGV[n + 3] or "") .. " ", ARGV[n + 4]
local turned = nil  -- read when first needed
local function careful(head)
  if not turned then
    local t = ARGV[n + 5]
    if mode == "d" then t = redis.call("GET", RECEIPTS_TURNED) end
    turned = tonumber(t or "") or -1
  end
  return (stored_at(head) or 0) <= turned
end

-- rs as a table (sender -> id), how many it names, and whether it names a
-- sender of a message from first on (an id below first names messages
-- acked before: left there, it costs nothing until rs grows, see tidy).
local NOBODY = {}  -- (never written to)
local function listed_senders(rs, first)
  local all = redis.call("HGETALL", rs)
  if #all == 0 then return NOBODY, 0, false end
  local listed, any = {}, false
  for j = 1, #all, 2 do
    local id = tonumber(all[j + 1])
    listed[all[j]] = id
    if id >= first then any = true end
  end
  return listed, #all / 2, any
end

-- Once rs names more than RS_KEPT senders, forget those this ack covered
-- (every message they name is gone): a conversation's one sender is not
-- deleted and written again at every ack, and rs stays small.
local RS_KEPT = 16
local function tidy(rs, listed, count, upto)
  local gone = {}
  for s, id in pairs(listed) do
    if id <= upto then gone[#gone + 1] = s end
  end
  if #gone > 0 then redis.call("HDEL", rs, unpack(gone)) end
end

-- Whether any inbox of the batch has an rs at all: one EXISTS of them all
-- (the usual answer, where nobody opted in, is no), instead of an HGETALL
-- per inbox.
local any_rs = mode ~= "0" and redis.call("EXISTS", unpack(KEYS, n + 1, 2 * n)) > 0

local removed = 0
local out = {0}
-- (per inbox, tables are made only when its senders are read: most acks
-- read none, and each table, like each string made, costs the store about
-- as much as a small command)
for i = 1, n do
  local inbox = KEYS[i]
  local upto = tonumber(ARGV[i])
  local order, high = NOBODY, nil
  -- the head first (an ack of every push acks just the head: one call)
  local head = redis.call("LPOP", inbox)
  local first = head and entry_id(head)
  if first and first > upto then
    -- acked before (a repeated ack): the head goes back as it was (and the
    -- inbox's TTL, if taking the head had emptied it)
    if redis.call("LPUSH", inbox, head) == 1 and ttl_ms then
      redis.call("PEXPIRE", inbox, ttl_ms)
    end
  elseif first then
    -- whose messages must be read (their senders): none when rs names
    -- nobody and the range is not to be acked carefully
    local read, listed, count = false, nil, 0
    if mode ~= "0" then
      if any_rs then
        listed, count, read = listed_senders(KEYS[n + i], first)
      else
        listed = NOBODY
      end
      read = read or careful(head)
    end
    local taken = read and {head}
    removed = removed + 1
    local k = upto - first  -- how many more, right after the head
    if k > 0 then
      local at = redis.call("LINDEX", inbox, k - 1)
      if at and entry_id(at) == upto then
        if read then
          for _, entry in ipairs(redis.call("LPOP", inbox, k)) do taken[#taken + 1] = entry end
        else
          redis.call("LTRIM", inbox, k, -1)
        end
        removed = removed + k
      else
        while true do
          local entry = redis.call("LINDEX", inbox, 0)
          if not entry or entry_id(entry) > upto then break end
          if read then taken[#taken + 1] = entry end
          redis.call("LPOP", inbox)
          removed = removed + 1
        end
      end
    end
    if read then
      order, high = {}, {}
      senders_of(taken, order, high)
    end
    if count > RS_KEPT then tidy(KEYS[n + i], listed, count, upto) end
    if listed and #order > 0 then
      -- the senders here named (from first on): make_receipt checks their
      -- opt-in (one MGET each); the others only if the range is acked
      -- carefully, and then (one store) only those opted in, in one MGET
      local named, others = {}, {}
      for _, s in ipairs(order) do
        if (listed[s] or -1) >= first then
          named[#named + 1] = s
        else
          others[#others + 1] = s
        end
      end
      if #others > 0 and careful(head) then
        if mode == "d" then others = opted_in(others) end
        for _, s in ipairs(others) do named[#named + 1] = s end
      end
      order = named
    end
  end
  if mode == "d" then
    if #order > 0 then
      local r = string.match(inbox, "{(.-)}:")
      for _, s in ipairs(order) do
        local entry, here = make_receipt(s, r, "delivered", high[s], now, node_sp, ttl_ms)
        if here then
          out[#out + 1], out[#out + 2], out[#out + 3] = "h", s, entry
        end
      end
    end
  elseif mode == "o" then
    local r = string.match(inbox, "{(.-)}:")
    local outbox = KEYS[2 * n + i]
    for _, s in ipairs(order) do to_outbox(outbox, s, "delivered", high[s], now) end
    -- everything in it, left over from a node that died mid-way included
    local all = redis.call("HGETALL", outbox)
    for j = 1, #all, 2 do
      out[#out + 1], out[#out + 2], out[#out + 3] = "o", r, all[j] .. "=" .. all[j + 1]
    end
  end
end
if mode == "0" then return removed end
out[1] = removed
return out
