-- Re-encrypt one token record in place, keeping its version, only if it is unchanged
-- since it was read: a refresh (or a re-install) written meanwhile is never overwritten.
-- KEYS[1]: the record's hash, hoopai:token:{app:kind:id}
-- ARGV[1..3]: the version, access_token and refresh_token as read
-- ARGV[4..5]: the access_token and refresh_token sealed again
-- Returns 1 when rewritten, 0 when the record changed (or is gone): read it again.
local stored = redis.call("HMGET", KEYS[1], "version", "access_token", "refresh_token")
if stored[1] ~= ARGV[1] or stored[2] ~= ARGV[2] or stored[3] ~= ARGV[3] then return 0 end
redis.call("HSET", KEYS[1], "access_token", ARGV[4], "refresh_token", ARGV[5])
return 1
