-- flag: allow-oom (presence records are small: a phone must still bind and drain a full store)
-- Keep this node's presence records alive (their expiry, a backstop), and find those it
-- has lost: a later bind elsewhere took the device over.
--
-- KEYS: per device, its presence record and its epoch counter
-- ARGV: expiry_ms, then per device the record this node holds ("<node> <epoch>")
-- Returns the (1-based) numbers of the devices this node no longer holds,
-- and, negated, those whose record it wrote again.
-- A record that ran out while this node was cut off from the store (or was
-- lost in a failover) is taken again only if nobody bound the device since
-- (its epoch is still ours). Messages stored while it was missing were not
-- published to this node: the node reads those inboxes again.
local lost = {}
for i = 1, #KEYS / 2 do
  local presence, mine = KEYS[2 * i - 1], ARGV[i + 1]
  local have = redis.call("GET", presence)
  if have == mine then
    redis.call("PEXPIRE", presence, ARGV[1])
  elseif not have and redis.call("GET", KEYS[2 * i]) == string.match(mine, " (%d+)$") then
    redis.call("SET", presence, mine, "PX", ARGV[1])
    lost[#lost + 1] = -i
  else
    lost[#lost + 1] = i
  end
end
return lost
