-- Which wake-ups may be claimed now, in some shards of the due index (read
-- only; push_claim.lua decides).
--
-- KEYS: due-index shards; ARGV: now_ms, most ids per shard.
-- Returns the destinationIds whose entry's score is at most now.
local out = {}
for i = 1, #KEYS do
  local due = redis.call("ZRANGEBYSCORE", KEYS[i], "-inf", ARGV[1], "LIMIT", 0, ARGV[2])
  for _, device in ipairs(due) do out[#out + 1] = device end
end
return out
