-- flag: allow-oom (it only deletes)
-- Redis Cluster: outbox entries were moved (receipt.lua): delete each,
-- unless a newer ack or read changed it meanwhile (then it is moved again).
-- One step for every entry an ack moved.
--
-- KEYS[1] the receiver's outbox; ARGV: field, the value that was moved,
--   field, value...
-- Returns how many were deleted.
local deleted = 0
for i = 1, #ARGV, 2 do
  if redis.call("HGET", KEYS[1], ARGV[i]) == ARGV[i + 1] then
    deleted = deleted + redis.call("HDEL", KEYS[1], ARGV[i])
  end
end
return deleted
