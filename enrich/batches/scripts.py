"""The Lua scripts that change a batch's counts (batches/store.py runs them).

Each runs whole inside Redis, so two steps that ever overlap (a step redelivered, or one whose lock
lapsed) cannot count an item twice, and a cancel cannot lose an item between the queue and the counts.
"""

# KEYS: batch hash, queue, running, inflight.  ARGV: cluster-wide cap, now, batch id, drop members
# no step has seen in flight since this (their batch is gone), ttl.  Moves up to (cap - in flight)
# keys from the queue into running.
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[4])
if room <= 0 then return {} end
local items = redis.call('LPOP', KEYS[2], room)
if not items then return {} end
for _, key in ipairs(items) do
  redis.call('HSET', KEYS[3], key, '|' .. ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3] .. '|' .. key)
end
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('HINCRBY', KEYS[1], 'n:pending', -#items)
redis.call('HINCRBY', KEYS[1], 'n:running', #items)
return items
"""

# KEYS: batch hash, running, items, inflight.  ARGV: item key, summary json, state, inflight member,
# ttl.  Settles an item in flight once (0 when another step already did).  The items hash may be
# made here (no item was cached at creation): it gets the batch's TTL then.
SETTLE = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[3]) < 0 then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'n:running', -1)
redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[3], 1)
redis.call('ZREM', KEYS[4], ARGV[4])
return 1
"""

# KEYS: batch hash, queue.  ARGV: now.  The items not started yet become cancelled.
# Returns the batch's status after the call ('' when unknown).
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status ~= 'running' then return status end
local left = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'n:pending', -left)
redis.call('HINCRBY', KEYS[1], 'n:cancelled', left)
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
return 'cancelled'
"""

# KEYS: batch hash, the set of unfinished batches.  ARGV: now, batch id.  Marks the batch finished
# once nothing is pending or in flight; returns 1 when this call did (a running batch becomes
# complete, a cancelled one stays cancelled).
FINISH = """
if redis.call('HGET', KEYS[1], 'finished_at') then return 0 end
local pending = tonumber(redis.call('HGET', KEYS[1], 'n:pending') or '0')
local running = tonumber(redis.call('HGET', KEYS[1], 'n:running') or '0')
if pending > 0 or running > 0 then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'complete')
end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
