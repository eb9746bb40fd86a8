-- flag: allow-oom (a few small fields)
-- Renew this node's leases on the wake-ups it is sending (the gateway call
-- may take up to --push-timeout; a short lease, renewed while the node
-- lives, lets another node take over soon after this one dies).
--
-- KEYS, two per device: DUE its due-index shard, PUSH its registration.
-- ARGV: now_ms, lease_ms, node id, then the destinationIds.
-- A lease that is no longer this node's (it ran out, and another node
-- claimed the wake-up) is left alone. Returns how many were renewed.
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
local n = 0
for i = 1, #KEYS / 2 do
  local DUE, PUSH, device = KEYS[2 * i - 1], KEYS[2 * i], ARGV[3 + i]
  if redis.call("HGET", PUSH, "owner") == ARGV[3] and redis.call("HEXISTS", PUSH, "lease") == 1 then
    redis.call("HSET", PUSH, "lease", until_ms, "due", until_ms)
    redis.call("ZADD", DUE, "XX", until_ms, device)
    n = n + 1
  end
end
return n
