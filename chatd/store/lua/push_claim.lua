-- flag: allow-oom (it writes a few small fields: wake-ups must go on)
-- Claim due wake-ups for this node: a lease on each, so that one node sends
-- it (another may take it once the lease has run out: the claimer died).
--
-- KEYS, five per device (all in its slot): DUE its due-index shard, PUSH its
--   push registration, NODE its presence record, INBOX, SEQ.
-- ARGV: now_ms, lease_ms, unacked_ms, node id, then the destinationIds.
-- For each device whose entry is due, in order:
--   * no registration, or nothing waiting: the entry is removed;
--   * a lease of another claim still runs: left alone (scored at its end);
--   * bound to a connection: due only once the oldest waiting message and
--     the bind are both older than unacked_ms (else scored at that time):
--     a device that bound in the meantime gets no wake-up;
--   * else claimed: the lease is set, and the wake-up returned.
-- Returns {claimed, later}: claimed has six items per claimed device: id,
-- pushkey, app, ts, unread (the messages waiting), the newest waiting
-- message; later two per device whose entry now waits: id, ms until due.
-- The claim's owner (this node) is noted with the lease: push_renew.lua.
local now = tonumber(ARGV[1])
local lease = now + tonumber(ARGV[2])
local unacked = tonumber(ARGV[3])
local node = ARGV[4]
local out, later = {}, {}
local function wait(DUE, PUSH, device, at)
  redis.call("ZADD", DUE, at, device)
  redis.call("HSET", PUSH, "due", at)
  later[#later + 1] = device
  later[#later + 1] = at - now
end
for i = 1, #KEYS / 5 do
  local DUE, PUSH, NODE, INBOX, SEQ = KEYS[5 * i - 4], KEYS[5 * i - 3], KEYS[5 * i - 2],
    KEYS[5 * i - 1], KEYS[5 * i]
  local device = ARGV[4 + i]
  local score = tonumber(redis.call("ZSCORE", DUE, device))
  if score and score <= now then
    local reg = redis.call("HMGET", PUSH, "key", "app", "ts", "lease", "bound")
    local n = redis.call("LLEN", INBOX)
    local held = tonumber(reg[4])
    if not reg[1] or n == 0 then
      redis.call("ZREM", DUE, device)
      if reg[1] then redis.call("HDEL", PUSH, "lease", "owner", "fail", "tries", "due") end
    elseif held and held > now then
      wait(DUE, PUSH, device, held)
    else
      local at = redis.call("EXISTS", NODE) == 1
      local ready = now
      if at then
        local sent = tonumber(string.match(redis.call("LINDEX", INBOX, 0), "^(%d+)",
                                           SENT_AT_FIRST)) or 0
        ready = math.max(sent, tonumber(reg[5]) or 0) + unacked
      end
      if ready > now then
        wait(DUE, PUSH, device, ready)
      else
        redis.call("HSET", PUSH, "lease", lease, "owner", node, "due", lease,
                   "cseq", redis.call("GET", SEQ) or 0)
        redis.call("ZADD", DUE, lease, device)
        out[#out + 1] = device
        out[#out + 1] = reg[1]
        out[#out + 1] = reg[2]
        out[#out + 1] = reg[3]
        out[#out + 1] = n
        out[#out + 1] = redis.call("LINDEX", INBOX, -1)
      end
    end
  end
end
return {out, later}
