-- flag: allow-oom (presence records are small: a phone must still bind and drain a full store)
-- Devices' connections on this node are gone (a batch of them, one reactor
-- turn's): drop each presence record that is still this node's (a later bind
-- elsewhere has replaced it otherwise).
--
-- KEYS[i] a device's presence; ARGV[i] the record this node holds for it
-- ("<node> <epoch>"). Returns how many were dropped.
local dropped = 0
for i, key in ipairs(KEYS) do
  if redis.call("GET", key) == ARGV[i] then
    dropped = dropped + redis.call("DEL", key)
  end
end
return dropped
