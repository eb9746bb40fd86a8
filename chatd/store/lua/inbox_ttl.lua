-- flag: allow-oom (it only sets expiries: a store at its memory limit must still drain)
-- Give each inbox that has no TTL the TTL it would have had (the inbox
-- sweeper, chatd/store/inboxes.py). send.lua gives an inbox it makes no TTL
-- (most are emptied by an ack before another message comes: a TTL per
-- message was a tenth of the store's cost), only one that already held
-- messages; an inbox left with its one message (a phone gone for good)
-- gets it here: when its newest line was stored, plus the inbox TTL.
-- PEXPIREAT with a time passed deletes it at once (every line in it has
-- expired).
--
-- KEYS: inboxes (found by a SCAN; of one slot on a Redis Cluster)
-- ARGV: inbox_ttl_ms
-- Returns how many were given a TTL.
local ttl = tonumber(ARGV[1])
local given = 0
for _, inbox in ipairs(KEYS) do
  if redis.call("PTTL", inbox) == -1 then
    local newest = redis.call("LINDEX", inbox, -1)
    local at = newest and stored_at(newest)
    if at then
      redis.call("PEXPIREAT", inbox, at + ttl)
    else
      redis.call("PEXPIRE", inbox, ttl)
    end
    given = given + 1
  end
end
return given
