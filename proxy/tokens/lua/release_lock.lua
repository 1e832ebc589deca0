-- Release a lock only if its owner still holds it: a lock whose TTL ran out may already
-- belong to someone else, whom a plain DEL would rob.
-- KEYS[1]: the lock, hoopai:lock:{name}
-- ARGV[1]: the owner value acquire_lock returned
-- Returns 1 when released, 0 when the lock was not (or no longer) held by ARGV[1].
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
