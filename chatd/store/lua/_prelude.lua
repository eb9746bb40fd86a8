-- Shared by every chatd function (after the constants of
-- chatd/store/layout.py, which the library writes above this).
--
-- A stored message is its push line, exactly as sent to the device:
-- ENTRY_HEAD <16-digit id> ENTRY_MID <sent_at ms> <tail>. The id sits at a
-- fixed offset so that it can be read without decoding JSON.
local function entry_id(entry)
  return tonumber(string.sub(entry, ID_FIRST, ID_LAST))
end

-- The notify channel of the device that owns a key ("chatd:{D}:...").
local function channel_of(key)
  return string.match(key, "^(.-}:)") .. NOTIFY
end

-- When a stored line was accepted (a message's sent_at; a receipt's at), ms.
local function stored_at(entry)
  return tonumber(string.match(entry, "^(%d+)", SENT_AT_FIRST))
    or tonumber(string.match(entry, '"at":(%d+)}$'))  -- a receipt
end

-- Drop the entries (oldest first) that were accepted before cutoff_ms.
local function drop_expired(inbox, cutoff_ms)
  while true do
    local head = redis.call("LINDEX", inbox, 0)
    if not head then return end
    local sent_at = stored_at(head)
    if not sent_at or sent_at >= cutoff_ms then return end
    redis.call("LPOP", inbox)
  end
end

-- Receipts (contract 1.2). A receipt is stored in its sender's inbox as its
-- push line (RECEIPT_HEAD <id> ...), its id from the sender's counter, so
-- that fetch, ack, pending and redelivery treat it as a message.
-- Make (or supersede) sender s's receipt for (receiver r, status), if s
-- opted in and upto is higher than any receipt s had for (r, status).
-- A newer receipt replaces, in place, one that was never pushed: made while
-- s was bound nowhere, s not bound since (same epoch), still in the inbox;
-- otherwise it is appended (a new id). Publishes it to the node holding s
-- if that is another one. Returns the entry and whether s is bound on this
-- node ("<node id> " = node_sp), or nil when nothing is to be pushed.
-- Touches only keys of s (one slot). Its four reads are one MGET: a receipt
-- is five calls (MGET, INCR, RPUSH, PEXPIRE, SET), and one for a sender
-- who did not opt in.
local function make_receipt(s, r, status, upto, at, node_sp, ttl_ms)
  local p = KEY_HEAD .. s .. "}:"
  local ptr_key = p .. K_RECEIPT_AT .. status .. ":" .. r
  local got = redis.call("MGET", p .. K_RECEIPTS, ptr_key, p .. K_NODE, p .. K_EPOCH)
  if not got[1] then return nil end
  local ptr, bound = got[2], got[3]
  local old_upto, old_id, mark
  if ptr then old_upto, old_id, mark = string.match(ptr, "^(%d+) (%d+) (%S+)$") end
  if old_upto and tonumber(old_upto) >= upto then return nil end
  local upto_s = string.format("%016d", upto)
  local inbox = p .. K_INBOX
  local tail = '","receiver":"' .. r .. '","status":"' .. status .. '","upto":"' ..
    upto_s .. '","at":' .. at .. '}'
  local epoch = nil
  if not bound then epoch = got[4] or "0" end
  if not bound and mark == epoch then
    local head = redis.call("LINDEX", inbox, 0)
    local idx = head and (tonumber(old_id) - entry_id(head)) or -1
    local there = idx >= 0 and redis.call("LINDEX", inbox, idx)
    if there and entry_id(there) == tonumber(old_id)
        and string.sub(there, 1, #RECEIPT_HEAD) == RECEIPT_HEAD then
      redis.call("LSET", inbox, idx, RECEIPT_HEAD .. old_id .. tail)
      redis.call("SET", ptr_key, upto_s .. " " .. old_id .. " " .. mark)
      return nil
    end
  end
  local id = string.format("%016d", redis.call("INCR", p .. K_SEQ))
  local entry = RECEIPT_HEAD .. id .. tail
  redis.call("RPUSH", inbox, entry)
  redis.call("PEXPIRE", inbox, ttl_ms)
  redis.call("SET", ptr_key, upto_s .. " " .. id .. " " .. (epoch or "p"))
  if not bound then return nil end
  if string.sub(bound, 1, #node_sp) == node_sp then return entry, true end
  redis.call("SPUBLISH", p .. NOTIFY, "m " .. entry)
  return nil
end

-- The senders of the messages among entries (receipts have none), each with
-- the highest id of its messages there: {sender...}, {sender -> id}. A
-- stored line is a message or a receipt, told apart by the byte where their
-- heads first differ (no substring made per entry).
local TYPE_AT = 10  -- '{"type":"m...' / '{"type":"r...'
local function senders_of(entries, order, high)
  local TYPE_MESSAGE = string.byte(ENTRY_HEAD, TYPE_AT)
  for i = 1, #entries do
    local e = entries[i]
    if string.byte(e, TYPE_AT) == TYPE_MESSAGE then
      local s = string.match(e, '"sender":"([^"]*)"', SENT_AT_FIRST)
      if s then
        if not high[s] then order[#order + 1] = s end
        high[s] = entry_id(e)
      end
    end
  end
end

-- Cluster: remember a receipt to make in the receiver's outbox (its slot),
-- keeping the highest upto per (sender, status).
-- One store (mode "d"): of senders, those who opted in to receipts, in one
-- MGET (not one call per sender: most acks cover senders who did not).
local function opted_in(senders)
  if #senders == 0 then return senders end
  local keys = {}
  for i, s in ipairs(senders) do keys[i] = KEY_HEAD .. s .. "}:" .. K_RECEIPTS end
  local flags = redis.call("MGET", unpack(keys))
  local out = {}
  for i, s in ipairs(senders) do
    if flags[i] then out[#out + 1] = s end
  end
  return out
end

local function to_outbox(outbox, s, status, upto, at)
  local field = s .. " " .. status
  local cur = redis.call("HGET", outbox, field)
  if cur and tonumber(string.match(cur, "^(%d+)")) >= upto then return end
  redis.call("HSET", outbox, field, string.format("%016d", upto) .. " " .. at)
end
