-- Store one token record only if the stored version is the one its writer read.
-- KEYS[1]: the record's hash, hoopai:token:{app:kind:id}
-- ARGV[1]: the new version; stored only if the stored one is ARGV[1] - 1 (none counts as 0)
-- ARGV[2..]: field, value, field, value, ...: every other field of the record
-- Returns 1 when stored, 0 when the stored version is another.
local stored = tonumber(redis.call("HGET", KEYS[1], "version") or "0")
if stored ~= tonumber(ARGV[1]) - 1 then return 0 end
-- DEL first so that a field an older writer set and this one no longer does cannot linger.
redis.call("DEL", KEYS[1])
redis.call("HSET", KEYS[1], "version", ARGV[1], unpack(ARGV, 2))
return 1
