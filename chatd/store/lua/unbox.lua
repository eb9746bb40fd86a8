-- flag: allow-oom (it only deletes)
-- Redis Cluster: an outbox entry was moved (receipt.lua): delete it, unless
-- a newer ack or read changed it meanwhile (then it is moved again).
--
-- KEYS[1] the receiver's outbox; ARGV: field, the value that was moved
if redis.call("HGET", KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call("HDEL", KEYS[1], ARGV[1])
end
return 0
