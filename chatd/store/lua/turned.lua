-- Raise RECEIPTS_TURNED (chatd/store/layout.py): messages stored up to that
-- time (ms) are acked carefully, every sender's receipts opt-in checked
-- (see ack.lua). Only ever raised (two nodes may set it at once).
--
-- KEYS[1] RECEIPTS_TURNED; ARGV[1] the time. Returns the time it holds now.
local cur = tonumber(redis.call("GET", KEYS[1]) or "0")
local want = tonumber(ARGV[1])
if want > cur then
  redis.call("SET", KEYS[1], ARGV[1])
  return want
end
return cur
