-- flag: allow-oom (a heartbeat is tiny: a node of a full store must not be taken for dead)
-- A node's heartbeat (every --presence-lease / 3), and which nodes have
-- stopped beating (chatd/hub/presence.py).
--
-- KEYS[1] the node set (chatd:{nodes}), KEYS[2] this node's heartbeat,
--   KEYS[3] the reaper lease. Every node's heartbeat is KEYS[1] .. ":live:"
--   .. its id: one hash tag, so one Cluster slot, the one this step runs in.
-- ARGV: node id, lease_ms, reaper lease_ms
-- Returns {1 if this node's heartbeat was still there (0: first beat, or it
-- ran out: this node was cut off for a whole lease and may have been
-- reaped), then the ids of the dead nodes if this node is the reaper}.
-- One node reaps at a time: the first to see a dead node takes the reaper
-- lease and keeps it with its heartbeats while dead nodes are listed.
local me, live = ARGV[1], KEYS[1] .. ":live:"
local was = redis.call("EXISTS", KEYS[2])
redis.call("SET", KEYS[2], "1", "PX", ARGV[2])
redis.call("SADD", KEYS[1], me)
local out = {was}
for _, id in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  if id ~= me and redis.call("EXISTS", live .. id) == 0 then
    out[#out + 1] = id
  end
end
local reaper = redis.call("GET", KEYS[3])
if #out == 1 then
  if reaper == me then redis.call("DEL", KEYS[3]) end
  return out
end
if reaper and reaper ~= me then return {was} end
redis.call("SET", KEYS[3], me, "PX", ARGV[3])
return out
