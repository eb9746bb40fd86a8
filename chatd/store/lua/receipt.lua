-- flag: allow-cross-slot-keys
-- Redis Cluster: move outbox entries (see ack.lua, read.lua) into their
-- senders' inboxes: make_receipt in each sender's slot, for entries whose
-- senders' slots are all on this primary (one step per primary and batch,
-- not one per entry: with random peers an ack covers about as many senders
-- as messages). Idempotent: a receipt whose upto is not higher than the
-- sender's last one for (receiver, status) makes nothing, so a move done
-- twice (a node died between this and unbox.lua, or this step failed
-- halfway) makes one receipt.
--
-- KEYS: the first entry's sender keys that make_receipt touches (opt-in,
--   inbox, id counter, presence, epoch, the receipt pointer), declared: the
--   step is routed by them, and refused before it starts if their slot is
--   being migrated. The other senders' keys are reached undeclared
--   (allow-cross-slot-keys, this primary only): a key of a slot not served
--   here, or being migrated away, fails the step at that sender's first
--   read, before anything of that sender is written; every entry then stays
--   in its outbox, and what was made before it is not made again.
-- ARGV: node id, inbox_ttl_ms, then for each entry: sender, receiver,
--   status, upto, at
-- Returns {sender, entry, ...}: the receipts for senders bound on this node.
local node_sp, ttl_ms = ARGV[1] .. " ", ARGV[2]
local out = {}
for i = 3, #ARGV, 5 do
  local s = ARGV[i]
  local entry, here = make_receipt(s, ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]),
                                   ARGV[i + 4], node_sp, ttl_ms)
  if here then
    local n = #out
    out[n + 1], out[n + 2] = s, entry
  end
end
return out
