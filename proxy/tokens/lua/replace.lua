-- Store one token record whatever is stored (a fresh install), one version past it.
-- KEYS[1]: the record's hash, hoopai:token:{app:kind:id}
-- ARGV: field, value, field, value, ...: every field of the record but its version
-- Returns the version stored: the stored one (none counts as 0) plus one.
local version = tonumber(redis.call("HGET", KEYS[1], "version") or "0") + 1
redis.call("DEL", KEYS[1])
redis.call("HSET", KEYS[1], "version", tostring(version), unpack(ARGV))
return version
