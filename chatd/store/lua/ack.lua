-- flag: allow-oom (it only deletes: a store at its memory limit must still drain)
-- Remove acked messages from several inboxes (cumulative acks), one round
-- trip for the batch; and make the senders' delivered receipts (1.2) in the
-- same atomic step.
--
-- KEYS: inboxes (then, in mode "o", each one's outbox, declared so that a
--   slot being migrated is refused up front, before anything is done);
-- ARGV: for each inbox, the highest acked id; then receipts mode
--   ("0" none: --receipts off; "d" direct: into the senders' inboxes, one
--   store; "o" outbox: into each receiver's outbox, Redis Cluster), now_ms,
--   node id, inbox_ttl_ms.
-- Returns how many messages were removed in all (mode "0"), or {removed,
-- then three items per thing for the node to do}:
--   "h", sender, receipt entry: a receipt for a sender bound on this node;
--   "o", receiver, "<field>=<value>": an outbox entry to move (cluster).
-- Ids in an inbox are consecutive, so the position of the acked id is known
-- from the head's id: the head is taken first (that is the whole ack of one
-- message), then the entry where the acked id must be is checked and the
-- rest taken up to it; a slow walk is the fallback (it never runs while the
-- ids are consecutive).
local n = #KEYS
if #ARGV > n then n = #ARGV - 4 end  -- a receipts mode follows the ids
local mode, now, node_sp, ttl_ms = ARGV[n + 1] or "0", ARGV[n + 2], (ARGV[n + 3] or "") .. " ", ARGV[n + 4]
local removed = 0
local out = {0}
for i = 1, n do
  local inbox = KEYS[i]
  local upto = tonumber(ARGV[i])
  local order, high = {}, {}
  -- the head first (an ack of every push acks just the head: one call)
  local head = redis.call("LPOP", inbox)
  local first = head and entry_id(head)
  if first and first > upto then
    -- acked before (a repeated ack): the head goes back as it was (and the
    -- inbox's TTL, if taking the head had emptied it)
    if redis.call("LPUSH", inbox, head) == 1 and ttl_ms then
      redis.call("PEXPIRE", inbox, ttl_ms)
    end
  elseif first then
    local taken = {head}
    removed = removed + 1
    local k = upto - first  -- how many more, right after the head
    if k > 0 then
      local at = redis.call("LINDEX", inbox, k - 1)
      if at and entry_id(at) == upto then
        if mode ~= "0" then
          for _, entry in ipairs(redis.call("LPOP", inbox, k)) do taken[#taken + 1] = entry end
        else
          redis.call("LTRIM", inbox, k, -1)
        end
        removed = removed + k
      else
        while true do
          local entry = redis.call("LINDEX", inbox, 0)
          if not entry or entry_id(entry) > upto then break end
          taken[#taken + 1] = entry
          redis.call("LPOP", inbox)
          removed = removed + 1
        end
      end
    end
    if mode ~= "0" then senders_of(taken, order, high) end
  end
  if mode ~= "0" then
    local r = string.match(inbox, "{(.-)}:")
    if mode == "d" then
      for _, s in ipairs(opted_in(order)) do
        local entry, here = make_receipt(s, r, "delivered", high[s], now, node_sp, ttl_ms)
        if here then
          out[#out + 1], out[#out + 2], out[#out + 3] = "h", s, entry
        end
      end
    else
      local outbox = KEYS[n + i]
      for _, s in ipairs(order) do to_outbox(outbox, s, "delivered", high[s], now) end
      -- everything in it, left over from a node that died mid-way included
      local all = redis.call("HGETALL", outbox)
      for j = 1, #all, 2 do
        out[#out + 1], out[#out + 2], out[#out + 3] = "o", r, all[j] .. "=" .. all[j + 1]
      end
    end
  end
end
if mode == "0" then return removed end
out[1] = removed
return out
