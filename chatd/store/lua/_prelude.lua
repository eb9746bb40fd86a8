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

-- Drop the entries (oldest first) that were accepted before cutoff_ms.
local function drop_expired(inbox, cutoff_ms)
  while true do
    local head = redis.call("LINDEX", inbox, 0)
    if not head then return end
    local sent_at = tonumber(string.match(head, "^(%d+)", SENT_AT_FIRST))
    if not sent_at or sent_at >= cutoff_ms then return end
    redis.call("LPOP", inbox)
  end
end
