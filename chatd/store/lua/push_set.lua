-- flag: allow-oom (one small hash per device; removing must always work)
-- Set (or, with an empty pushkey, remove) a device's push registration
-- (contract 1.2, the push packet). A new registration starts with a clean
-- wake-up state.
--
-- KEYS[1] the push registration (a hash, see chatd/store/layout.py)
-- ARGV: pushkey ("": remove), app id, now (unix seconds)
redis.call("DEL", KEYS[1])
if ARGV[1] ~= "" then
  redis.call("HSET", KEYS[1], "key", ARGV[1], "app", ARGV[2], "ts", ARGV[3])
end
return "ok"
