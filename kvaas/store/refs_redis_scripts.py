"""The Lua scripts of :class:`~kvaas.store.refs_redis.RedisRefIndex` (see that module for the
protocol). Each script's comment lists its ``KEYS`` and ``ARGV`` and what it returns."""

from __future__ import annotations

ALLOW_OOM = "#!lua flags=allow-oom\n"
"""First line of every index script (Redis >= 7): the index must keep working when Redis is at
``maxmemory`` (``noeviction`` refuses ordinary writes then): a release that could not commit
would strand references, and a manifest is tiny next to the chunks that spill to disk."""

NOW = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: manifest, versions, garbage, refs[1..n], tombstones[1..n]
# ARGV: body, storage class, version, hex[1..n]
# -> {-1} conflict | {0, i1, i2, ...} positions (1-based) of tombstoned chunks
PUT_MANIFEST = """
local n = (#KEYS - 3) / 2
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {-1} end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[3])
  for i = 1, n do
    redis.call('HINCRBY', KEYS[3 + i], ARGV[2], 1)
    redis.call('ZREM', KEYS[3], ARGV[3 + i])
  end
end
local out = {0}
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 + n + i]) == 1 then out[#out + 1] = i end
end
return out
"""

# KEYS: manifest, versions, garbage, refs[1..n]
# ARGV: expected body, storage class, version, hex[1..n]
# -> -1 changed meanwhile (retry) | 0 absent | 1 + number of chunks that became candidates
DELETE_MANIFEST = (
    NOW
    + """
local n = #KEYS - 3
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if cur ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
local t = now()
local added = 0
for i = 1, n do
  local left = redis.call('HINCRBY', KEYS[3 + i], ARGV[2], -1)
  if left <= 0 then redis.call('HDEL', KEYS[3 + i], ARGV[2]) end
  if redis.call('EXISTS', KEYS[3 + i]) == 0 then
    added = added + redis.call('ZADD', KEYS[3], 'NX', t, ARGV[3 + i])
  end
end
return 1 + added
"""
)

# KEYS: manifest, refs[1..n]
# ARGV: expected body, new body, old class, new class
# -> -1 changed meanwhile (retry) | 0 absent | {hot1, std1, cold1, hot2, ...} counts afterwards
SET_CLASS = """
local n = #KEYS - 1
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if cur ~= ARGV[1] then return -1 end
if ARGV[3] ~= ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[2])
  for i = 1, n do
    local left = redis.call('HINCRBY', KEYS[1 + i], ARGV[3], -1)
    if left <= 0 then redis.call('HDEL', KEYS[1 + i], ARGV[3]) end
    redis.call('HINCRBY', KEYS[1 + i], ARGV[4], 1)
  end
end
local out = {}
for i = 1, n do
  local c = redis.call('HMGET', KEYS[1 + i], 'hot', 'standard', 'cold')
  out[#out + 1] = tonumber(c[1]) or 0
  out[#out + 1] = tonumber(c[2]) or 0
  out[#out + 1] = tonumber(c[3]) or 0
end
return out
"""

# KEYS: garbage, refs[1..n], tombstones[1..n]
# ARGV: token, lease ms, grace s, most chunks to claim, hex[1..n]
# -> {server time, positions (1-based) of the chunks claimed by the token}
# Candidates stay in the zset until finish (a dead collector's chunks come back when its lease
# ends); a chunk already tombstoned by the same token is answered again, so running the script
# twice (redis-py resends it after a socket timeout) claims the same chunks.
CLAIM = (
    NOW
    + """
local n = (#KEYS - 1) / 2
local t = now()
local cutoff = t - tonumber(ARGV[3])
local most = tonumber(ARGV[4])
local out = {tostring(t)}
for i = 1, n do
  if #out > most then break end
  local hex = ARGV[4 + i]
  local since = redis.call('ZSCORE', KEYS[1], hex)
  if since then
    if redis.call('EXISTS', KEYS[1 + i]) == 1 then
      redis.call('ZREM', KEYS[1], hex)
    else
      local owner = redis.call('GET', KEYS[1 + n + i])
      if owner == ARGV[1] then
        out[#out + 1] = i
      elseif not owner and tonumber(since) <= cutoff then
        redis.call('SET', KEYS[1 + n + i], ARGV[1], 'PX', ARGV[2])
        out[#out + 1] = i
      end
    end
  end
end
return out
"""
)

# KEYS: garbage, refs[1..n], tombstones[1..n]   ARGV: token, claim time, hex[1..n]
# -> number of tombstones removed; the candidates of the chunks whose tombstone the token still
# held go too, unless referenced or released again after the claim
FINISH = """
local n = (#KEYS - 1) / 2
local removed = 0
for i = 1, n do
  if redis.call('GET', KEYS[1 + n + i]) == ARGV[1] then
    redis.call('DEL', KEYS[1 + n + i])
    removed = removed + 1
    local since = redis.call('ZSCORE', KEYS[1], ARGV[2 + i])
    if since and tonumber(since) <= tonumber(ARGV[2])
        and redis.call('EXISTS', KEYS[1 + i]) == 0 then
      redis.call('ZREM', KEYS[1], ARGV[2 + i])
    end
  end
end
return removed
"""

# KEYS: garbage, refs[1..n], tombstones[1..n]   ARGV: token ('' = none), hex[1..n]
# -> number of unreferenced chunks added to the candidates (tombstones of the token removed)
ABANDON = (
    NOW
    + """
local n = (#KEYS - 1) / 2
local t = now()
local added = 0
for i = 1, n do
  if ARGV[1] ~= '' and redis.call('GET', KEYS[1 + n + i]) == ARGV[1] then
    redis.call('DEL', KEYS[1 + n + i])
  end
  if redis.call('EXISTS', KEYS[1 + i]) == 0 then
    added = added + redis.call('ZADD', KEYS[1], 'NX', t, ARGV[1 + i])
  end
end
return added
"""
)
