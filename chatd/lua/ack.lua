-- Remove a receiver's messages up to and including an id (a cumulative ack).
--
-- KEYS[1] inbox; ARGV[1] the acked id. Returns how many were removed.
-- Ids in the inbox are consecutive, so the count is known from the head's id;
-- the entry at that position is checked, and a slow walk is the fallback.
local inbox = KEYS[1]
local upto = tonumber(ARGV[1])
local head = redis.call("LINDEX", inbox, 0)
if not head then return 0 end
local head_id = entry_id(head)
local k = upto - head_id + 1
if k <= 0 then return 0 end
local n = redis.call("LLEN", inbox)
if k > n then k = n end
local last = redis.call("LINDEX", inbox, k - 1)
if entry_id(last) == head_id + k - 1 then
  redis.call("LTRIM", inbox, k, -1)
  return k
end
local removed = 0
while true do
  local entry = redis.call("LINDEX", inbox, 0)
  if not entry or entry_id(entry) > upto then break end
  redis.call("LPOP", inbox)
  removed = removed + 1
end
return removed
