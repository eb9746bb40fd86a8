-- One step of chatd-admin purge: delete KEYS[2..] unless KEYS[1] (the
-- device's token) exists again: the id was registered again while it was
-- being purged, and the rest is its own now.
--
-- KEYS[1] the token, KEYS[2..] keys of the device to delete
-- Returns how many were deleted, or -1 (registered again: nothing deleted).
if redis.call("EXISTS", KEYS[1]) == 1 then return -1 end
local n = 0
for i = 2, #KEYS do n = n + redis.call("UNLINK", KEYS[i]) end
return n
