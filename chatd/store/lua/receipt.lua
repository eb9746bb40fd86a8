-- Redis Cluster: move one outbox entry (see ack.lua, read.lua) into its
-- sender's inbox: make_receipt in the sender's slot. Idempotent: a receipt
-- whose upto is not higher than the sender's last one for (receiver,
-- status) makes nothing, so a move done twice (a node died between this and
-- unbox.lua) makes one receipt.
--
-- KEYS: the sender's keys that make_receipt touches (opt-in, inbox, id
--   counter, presence, epoch, the receipt pointer), declared so that a slot
--   being migrated refuses the step before it starts
-- ARGV: sender, receiver, status, upto, at, node id, inbox_ttl_ms
-- Returns {} or {entry} (a receipt for a sender bound on this node).
local entry, here = make_receipt(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5],
                                 ARGV[6] .. " ", ARGV[7])
if here then return {entry} end
return {}
