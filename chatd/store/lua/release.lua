-- flag: allow-oom (presence records are small: a phone must still bind and drain a full store)
-- A device's connection on this node is gone: drop its presence record if it
-- is still this node's (a later bind elsewhere has replaced it otherwise).
--
-- KEYS[1] presence; ARGV[1] the record this node holds ("<node> <epoch>")
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
