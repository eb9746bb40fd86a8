-- flag: allow-oom (it only deletes: a store at its memory limit must still drain)
-- Remove acked messages from several inboxes (cumulative acks), one round
-- trip for the batch.
--
-- KEYS: inboxes; ARGV: for each, the highest acked id.
-- Returns how many messages were removed in all.
-- Ids in an inbox are consecutive, so the position of the acked id is known
-- from the head's id; the entry there is checked, and a slow walk is the
-- fallback (it never runs while the ids are consecutive).
local removed = 0
for i = 1, #KEYS do
  local inbox = KEYS[i]
  local upto = tonumber(ARGV[i])
  local head = redis.call("LINDEX", inbox, 0)
  local k = head and (upto - entry_id(head) + 1) or 0
  if k > 0 then
    local at = redis.call("LINDEX", inbox, k - 1)
    if at and entry_id(at) == upto then
      redis.call("LTRIM", inbox, k, -1)
      removed = removed + k
    else
      while true do
        local entry = redis.call("LINDEX", inbox, 0)
        if not entry or entry_id(entry) > upto then break end
        redis.call("LPOP", inbox)
        removed = removed + 1
      end
    end
  end
end
return removed
