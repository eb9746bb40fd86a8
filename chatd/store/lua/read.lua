-- A read (contract 1.2): receiver r has shown every message from sender s
-- up to id upto; make s's read receipt (if s opted in).
--
-- KEYS[1] r's id counter, KEYS[2] r's outbox (cluster)
-- ARGV: r, s, upto, now_ms, node id, inbox_ttl_ms, mode ("d" direct: into
--   s's inbox, one store; "o" outbox: into r's outbox, Redis Cluster)
-- Returns {"bad"} (upto is higher than any id r was ever given), or {"ok"},
-- {"h", s, entry} (a receipt for s, bound on this node) or
-- {"o", r, "<field>=<value>"} (an outbox entry to move).
local upto = tonumber(ARGV[3])
if upto > tonumber(redis.call("GET", KEYS[1]) or "0") then return {"bad"} end
local r, s, now = ARGV[1], ARGV[2], ARGV[4]
if ARGV[7] == "o" then
  to_outbox(KEYS[2], s, "read", upto, now)
  local field = s .. " read"
  local value = redis.call("HGET", KEYS[2], field)
  return {"o", r, field .. "=" .. value}
end
local entry, here = make_receipt(s, r, "read", upto, now, ARGV[5] .. " ", ARGV[6])
if here then return {"h", s, entry} end
return {"ok"}
