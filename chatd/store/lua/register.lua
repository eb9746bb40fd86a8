-- Register a device: store the hash of its new token (which revokes every
-- older one), in the same atomic step as the checks of the registration
-- mode, so that two registers of one id cannot both pass them.
--
-- KEYS[1] the token hash (absent: never registered; "revoked": the operator
--   revoked it, see chatd-admin), KEYS[2] the used-ticket marker of the
--   register's proof (unused without one), KEYS[3] the token rotation record
--   (see token.lua): a register starts it afresh, KEYS[4] the push
--   registration (a register may be a new phone: it is removed).
-- KEYS[5] the receipts opt-in. ARGV[4]: "1" the register opts in, else not.
-- ARGV: token_hash, claim ("1": the id must be free or revoked), ticket_ms
--   (the ticket's remaining life; "0": no ticket).
-- Returns "ok", "taken" (claim: the id belongs to someone) or "used" (the
-- ticket was used before). A refused register changes nothing. "ok+": a
-- device registered before opted in while it had not (the node then raises
-- RECEIPTS_TURNED, see ack.lua; a new one has sent nothing yet).
if ARGV[2] == "1" then
  local current = redis.call("GET", KEYS[1])
  if current and current ~= "revoked" then return "taken" end
end
local ticket_ms = tonumber(ARGV[3])
if ticket_ms > 0 and not redis.call("SET", KEYS[2], "1", "NX", "PX", ticket_ms) then
  return "used"
end
local known = redis.call("SET", KEYS[1], ARGV[1], "GET")
redis.call("DEL", KEYS[3], KEYS[4])
-- the receipts opt-in (1.2) holds until the next register or reconnect
if ARGV[4] == "1" then
  if not redis.call("SET", KEYS[5], "1", "GET") and known then return "ok+" end
else
  redis.call("DEL", KEYS[5])
end
return "ok"
