-- flag: allow-oom (it reads, and drops expired messages: it never adds)
-- Read a receiver's waiting messages after a given id, for a push.
--
-- KEYS[1] inbox, KEYS[2] id counter
-- ARGV: after_id, count, now_ms, inbox_ttl_ms, max_bytes, fence
-- Returns {pending, last_id, entry...}: pending counts every stored message
-- (pushed before or not), last_id is the counter (every id up to it is
-- either in the inbox or gone), then up to count entries with id > after_id,
-- and no more than max_bytes of them (but at least one; 0: no byte limit).
--
-- The inbox holds consecutive ids (only its head is ever removed: acks and
-- expiry), so the entry with id x sits at index x - head_id.
local inbox = KEYS[1]
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[4])
drop_expired(inbox, cutoff)

local last = redis.call("GET", KEYS[2]) or "0"
if ARGV[6] == "1" and last ~= "0" then
  -- --store-acks: a write of no change (the counter, as it is), so that the
  -- WAIT chatd sends after this call covers everything this read returns:
  -- replication is one stream, and WAIT waits for this call's place in it.
  -- Without it a read could hand out a message a failover is about to lose.
  redis.call("SET", KEYS[2], last, "KEEPTTL")
end
local head = redis.call("LINDEX", inbox, 0)
if not head then return {0, last} end
local start = tonumber(ARGV[1]) - entry_id(head) + 1
if start < 0 then start = 0 end
local result = {redis.call("LLEN", inbox), last}
local count = tonumber(ARGV[2])
if count <= 0 then return result end
local entries = redis.call("LRANGE", inbox, start, start + count - 1)
local budget = tonumber(ARGV[5]) or 0
local size = 0
for i = 1, #entries do
  size = size + #entries[i]
  if budget > 0 and size > budget and i > 1 then break end
  result[i + 2] = entries[i]
end
return result
