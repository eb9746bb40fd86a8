-- Shared by every chatd script (prepended when a script is loaded).
--
-- An inbox entry is the push line of a message, exactly as sent to the
-- device: {"type":"message","id":"<16 digits>","sent_at":<ms>,...}. The id
-- sits at a fixed offset so that it can be read without decoding JSON.
local function entry_id(entry)
  return tonumber(string.sub(entry, 25, 40))
end

-- Drop the entries (oldest first) that were accepted before cutoff_ms.
local function drop_expired(inbox, cutoff_ms)
  while true do
    local head = redis.call("LINDEX", inbox, 0)
    if not head then return end
    local sent_at = tonumber(string.match(head, '"sent_at":(%d+)', 41))
    if not sent_at or sent_at >= cutoff_ms then return end
    redis.call("LPOP", inbox)
  end
end

