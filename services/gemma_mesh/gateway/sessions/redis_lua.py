"""Redis key layout of ``RedisSessionStore`` and the Lua scripts that write it.

Keys (``P`` is the prefix, default ``gemma-mesh``):

- ``P:session:{id}:meta``: hash ``owner``, ``config`` (JSON), ``state`` (JSON), ``created_at``
  (Unix s), ``ttl_ms``, ``ended`` (0/1), ``seq`` (the last event id assigned).
- ``P:session:{id}:events``: stream; entry ``0-<event_id>`` has one field ``e`` (the event's JSON
  without ``event_id``); trimmed exactly to ``max_events`` (MAXLEN).
- ``P:owner:{owner}:active``: sorted set of the owner's active session ids, scored by expiry (Unix ms).

Every write is one Lua script, so ids are assigned atomically (``HINCRBY seq`` + ``XADD 0-<seq>``)
however many replicas write one session, and refreshes the TTL of the session's keys (PEXPIRE) and
its owner-index entry. The scripts derive the owner-index key from the hash, so a standalone (or
Sentinel) Redis is assumed, not Redis Cluster.
"""

from __future__ import annotations

REFRESH_LUA = """
local function refresh(meta, events, prefix, sid, now_ms)
  local f = redis.call('HMGET', meta, 'ttl_ms', 'owner', 'ended')
  local ttl = tonumber(f[1])
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', events, ttl)
  local index = prefix .. 'owner:' .. f[2] .. ':active'
  if f[3] == '1' then
    redis.call('ZREM', index, sid)
  else
    redis.call('ZADD', index, tonumber(now_ms) + ttl, sid)
    if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
  end
end
"""

# KEYS: meta, events. ARGV: prefix, session id, now (ms), max events, event JSON. -> id, or -1: no session
APPEND_LUA = (
    REFRESH_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '0-' .. n, 'e', ARGV[5])
refresh(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return n
"""
)

# KEYS: meta, events. ARGV: prefix, session id, now (ms), then field, value, ... -> 1, or 0: no session
UPDATE_LUA = (
    REFRESH_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
refresh(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return 1
"""
)

# KEYS: meta, events. ARGV: prefix, session id, now (ms), max events, full (1: re-create the hash
# when missing), meta JSON, JSON list of meta fields to overwrite, then event id, event JSON, ...
# -> {status (1, or -1: no session and not full), written, duplicate, skipped, recreated}
RESTORE_LUA = (
    REFRESH_LUA
    + """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if not exists and ARGV[5] ~= '1' then return {-1, 0, 0, 0, 0} end
local meta = cjson.decode(ARGV[6])
local recreated = 0
if exists then
  for _, k in ipairs(cjson.decode(ARGV[7])) do redis.call('HSET', KEYS[1], k, meta[k]) end
  if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < tonumber(meta['seq']) then
    redis.call('HSET', KEYS[1], 'seq', meta['seq'])
  end
else
  for k, v in pairs(meta) do redis.call('HSET', KEYS[1], k, v) end
  recreated = 1
end
local written, duplicate, skipped = 0, 0, 0
for i = 8, #ARGV, 2 do
  local id = '0-' .. ARGV[i]
  local r = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[4], id, 'e', ARGV[i + 1])
  if type(r) == 'table' and r.err then
    local old = redis.call('XRANGE', KEYS[2], id, id)
    if #old == 1 and old[1][2][2] == ARGV[i + 1] then duplicate = duplicate + 1 else skipped = skipped + 1 end
  else
    written = written + 1
  end
end
refresh(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return {1, written, duplicate, skipped, recreated}
"""
)

# KEYS: owner index. ARGV: session id, now (ms), ttl (ms), max active -> 1: admitted, 0: refused.
# The per-key session limit in one step: expired entries go, a session already counted stays
# admitted, another is added only below the limit (no check-then-set across replicas).
ADMIT_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
