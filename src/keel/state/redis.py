"""Shared :class:`~keel.state.base.Counters` in Redis, so any number of workers admit exactly what one would.

Every admit, settle and budget read is ONE Lua script (loaded once, then called by SHA; redis-py reloads it on
``NOSCRIPT`` after a restart or failover). A script runs atomically and reads the clock with the server's
``TIME``, so workers with skewed clocks still agree on windows, lease and reservation expiry. It follows the
algorithm of :class:`~keel.state.memory.MemoryCounters` step for step; the tests run the same cases on both.

Key layout (``P`` = prefix + ``{keel}:``; the hash tag puts every counter in one Redis Cluster slot, which keeps
multi-key scripts legal there and also pins all of Keel's counters to a single shard; the client here is the
single-node one, so a Cluster deployment would still need ``redis.asyncio.RedisCluster``):

- ``P w:<key>``  window: hash of second -> units, plus ``t`` (total) and ``o`` (oldest second); PEXPIRE window+1s.
- ``P c:<key>``  concurrency: sorted set lease id -> expiry (ms); expires with its longest lease.
- ``P b:<key>``  budget: hash ``spent``, ``reserved`` and ``r:<lease id>`` -> micros; ``P b:<key>:r`` sorted set
  lease id -> reservation expiry (ms). Both EXPIRE ``ttl_s`` after each change.
- ``P a:<lease id>``  an admission awaiting its settle; settle deletes it, so a second settle finds nothing.
- ``<prefix>kv:<key>``  plain values (single-key, so untagged).

Needs Redis 5 or later (scripts that call ``TIME`` before writing rely on effects replication). Connection and
timeout failures raise :class:`~keel.state.base.CountersUnavailable` after one attempt: no client-side retry,
because a replayed admit would count twice and the caller's failure policy is the place to decide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from keel.state.base import Admission, BudgetLimit, ConcurrencyLimit, CountersUnavailable, Denial, WindowLimit
from keel.state.memory import settle_deadline_s

__all__ = ["RedisCounters", "mask_url"]

T = TypeVar("T")

_KINDS: dict[bytes, Literal["window", "concurrency", "budget"]] = {
    b"window": "window",
    b"concurrency": "concurrency",
    b"budget": "budget",
}

# Shared by the scripts below: the server clock, integer formatting (Lua's tostring turns large numbers into
# 1e+15), and the purge of lapsed budget reservations.
_PRELUDE = """
local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now_ms = now_s * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now = now_s + tonumber(clock[2]) / 1000000

local function int(n) return string.format('%d', n) end

local function purge(h, z)
  while true do
    local ids = redis.call('ZRANGEBYSCORE', z, '-inf', int(now_ms), 'LIMIT', 0, 500)
    if #ids == 0 then return end
    local fields, lapsed = {}, 0
    for i, id in ipairs(ids) do fields[i] = 'r:' .. id end
    for _, v in ipairs(redis.call('HMGET', h, unpack(fields))) do lapsed = lapsed + (tonumber(v) or 0) end
    if redis.call('EXISTS', h) == 1 then
      redis.call('HDEL', h, unpack(fields))
      redis.call('HINCRBY', h, 'reserved', int(-lapsed))
    end
    redis.call('ZREM', z, unpack(ids))
  end
end
"""

# KEYS: admission mark, then the window hashes, lease sets and (budget hash, reservation zset) pairs.
# ARGV: lease id, JSON [settle deadline ms, [[limit, amount, window_s]...], [[limit, ttl ms]...],
#       [[limit or null, amount, ttl_s, reservation ttl ms]...]] (one argument: redis-py packs each one in Python).
# Returns {1, second, remaining...} or {0, kind, index, limit, current, retry_after, remaining...}.
_ADMIT = """
local id, spec = ARGV[1], cjson.decode(ARGV[2])
local ws, ls, bs = spec[2], spec[3], spec[4]
local nw, nl, nb = #ws, #ls, #bs

local function window_state(key, window)
  local st = redis.call('HMGET', key, 't', 'o')
  local total, oldest = tonumber(st[1]) or 0, tonumber(st[2])
  local cutoff = now_s - window
  if not oldest or oldest > cutoff then return total, oldest end
  total, oldest = 0, nil
  local all, dead = redis.call('HGETALL', key), {}
  for j = 1, #all, 2 do
    local field = all[j]
    if field ~= 't' and field ~= 'o' then
      local second = tonumber(field)
      if second <= cutoff then
        dead[#dead + 1] = field
      else
        total = total + tonumber(all[j + 1])
        if not oldest or second < oldest then oldest = second end
      end
    end
  end
  if not oldest then
    redis.call('DEL', key)
    return 0, nil
  end
  for j = 1, #dead, 1000 do redis.call('HDEL', key, unpack(dead, j, math.min(j + 999, #dead))) end
  redis.call('HSET', key, 't', int(total), 'o', int(oldest))
  return total, oldest
end

local function window_retry(key, need, window)
  local all, buckets = redis.call('HGETALL', key), {}
  for j = 1, #all, 2 do
    if all[j] ~= 't' and all[j] ~= 'o' then buckets[#buckets + 1] = {tonumber(all[j]), tonumber(all[j + 1])} end
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  local freed = 0
  for _, b in ipairs(buckets) do
    freed = freed + b[2]
    if freed >= need then return b[1] + window - now end
  end
  return window
end

local denial, used, oldest, previous = nil, {}, {}, {}
for i = 1, nw do
  local limit, amount, window = ws[i][1], ws[i][2], ws[i][3]
  used[i], oldest[i] = window_state(KEYS[1 + i], window)
  if not denial and used[i] + amount > limit then
    local retry = false
    if amount <= limit then retry = tostring(window_retry(KEYS[1 + i], used[i] + amount - limit, window)) end
    denial = {'window', i - 1, limit, used[i], retry}
  end
end
for i = 1, (denial and 0 or nl) do
  local key, limit = KEYS[1 + nw + i], ls[i][1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now_ms))
  local held = redis.call('ZCARD', key)
  if held >= limit then
    local first, retry = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES'), false
    if first[2] then retry = tostring(math.min(1, (tonumber(first[2]) - now_ms) / 1000)) end
    denial = {'concurrency', i - 1, limit, held, retry}
    break
  end
end
for i = 1, (denial and 0 or nb) do
  local h, z, limit = KEYS[nw + nl + 2 * i], KEYS[nw + nl + 2 * i + 1], bs[i][1]
  purge(h, z)
  local st = redis.call('HMGET', h, 'spent', 'reserved', 'r:' .. id)
  local current = (tonumber(st[1]) or 0) + (tonumber(st[2]) or 0)
  previous[i] = tonumber(st[3]) or 0
  if limit ~= cjson.null and current + bs[i][2] > limit then
    denial = {'budget', i - 1, limit, current, false}
    break
  end
end

if denial then
  local out = {0, denial[1], denial[2], denial[3], denial[4], denial[5]}
  for i = 1, nw do out[6 + i] = math.max(0, ws[i][1] - used[i]) end
  return out
end

local out = {1, now_s}
for i = 1, nw do
  local key, limit, amount, window = KEYS[1 + i], ws[i][1], ws[i][2], ws[i][3]
  redis.call('HINCRBY', key, int(now_s), int(amount))
  redis.call('HINCRBY', key, 't', int(amount))
  if not oldest[i] or now_s < oldest[i] then redis.call('HSET', key, 'o', int(now_s)) end
  redis.call('PEXPIRE', key, int(window * 1000 + 1000))
  out[2 + i] = math.max(0, limit - used[i] - amount)
end
for i = 1, nl do
  local key, ttl = KEYS[1 + nw + i], ls[i][2]
  redis.call('ZADD', key, int(now_ms + ttl), id)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, int(ttl)) end
end
for i = 1, nb do
  local h, z, amount, ttl = KEYS[nw + nl + 2 * i], KEYS[nw + nl + 2 * i + 1], bs[i][2], int(bs[i][3])
  redis.call('HSET', h, 'r:' .. id, int(amount))
  redis.call('HINCRBY', h, 'reserved', int(amount - previous[i]))
  redis.call('ZADD', z, int(now_ms + bs[i][4]), id)
  redis.call('EXPIRE', h, ttl)
  redis.call('EXPIRE', z, ttl)
end
redis.call('SET', KEYS[1], '1', 'PX', int(spec[1]))
return out
"""

# KEYS as for admit. ARGV: lease id, JSON [cost micros, number of lease sets, [[second, delta, window_s]...],
# [ttl_s per budget...]].
_SETTLE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
local id, spec = ARGV[1], cjson.decode(ARGV[2])
local cost, nl, ws, ttls = spec[1], spec[2], spec[3], spec[4]
local nw = #ws
for i = 1, nw do
  local key, second, delta = KEYS[1 + i], int(ws[i][1]), ws[i][2]
  if delta ~= 0 and ws[i][1] > now_s - ws[i][3] then
    local units = tonumber(redis.call('HGET', key, second))
    if units then
      local new = math.max(0, units + delta)
      redis.call('HSET', key, second, int(new))
      redis.call('HINCRBY', key, 't', int(new - units))
    end
  end
end
for i = 1, nl do redis.call('ZREM', KEYS[1 + nw + i], id) end
for i = 1, #ttls do
  local h, z, ttl = KEYS[nw + nl + 2 * i], KEYS[nw + nl + 2 * i + 1], int(ttls[i])
  purge(h, z)
  local held = tonumber(redis.call('HGET', h, 'r:' .. id))
  if held then
    redis.call('HDEL', h, 'r:' .. id)
    redis.call('HINCRBY', h, 'reserved', int(-held))
    redis.call('ZREM', z, id)
  end
  if cost ~= 0 then redis.call('HINCRBY', h, 'spent', int(cost)) end
  redis.call('EXPIRE', h, ttl)
  redis.call('EXPIRE', z, ttl)
end
return 1
"""

# KEYS: (budget hash, reservation zset) per budget. Returns {spent, reserved, ...}.
_BUDGET_SPENT = """
local out = {}
for i = 1, #KEYS / 2 do
  purge(KEYS[2 * i - 1], KEYS[2 * i])
  local st = redis.call('HMGET', KEYS[2 * i - 1], 'spent', 'reserved')
  out[2 * i - 1], out[2 * i] = tonumber(st[1]) or 0, tonumber(st[2]) or 0
end
return out
"""

# KEYS: budget hash, reservation zset. ARGV: spent micros, ttl_s.
_BUDGET_SEED = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent'))
if spent and spent >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'spent', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


def mask_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``, fit for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        # A lone userinfo may be a password (redis://secret@host): mask it too.
        netloc = f"{user}:***@{host}" if has_password else f"***@{host}"
    query = urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisCounters:
    """Counters in the Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``). ``socket_timeout`` bounds
    connecting, each command and waiting for one of the ``max_connections`` pooled connections, so an unreachable
    Redis fails a request within about that long instead of stalling it."""

    def __init__(
        self, url: str, *, prefix: str = "keel:", socket_timeout: float = 1.0, max_connections: int = 64
    ) -> None:
        self.url = mask_url(url)
        # Bumped by every new connection: Redis may have restarted (without persistence, empty) since the last one,
        # and the admission stage then re-seeds the budgets it has seen from the ledger.
        self.generation = 0
        self._tagged = prefix + "{keel}:"
        self._kv = prefix + "kv:"
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            redis_connect_func=self._connected,
        )
        self._redis = Redis.from_pool(pool)
        self._admit = self._redis.register_script(_PRELUDE + _ADMIT)
        self._settle = self._redis.register_script(_PRELUDE + _SETTLE)
        self._budget_spent = self._redis.register_script(_PRELUDE + _BUDGET_SPENT)
        self._budget_seed = self._redis.register_script(_BUDGET_SEED)

    async def _connected(self, connection: Any) -> None:
        await connection.on_connect()
        self.generation += 1

    async def _run(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            raise CountersUnavailable(f"Redis is unreachable at {self.url}: {exc}") from exc
        except redis_errors.RedisError as exc:
            raise CountersUnavailable(f"Redis at {self.url} failed: {exc}") from exc

    def _keys(
        self,
        lease_id: str,
        windows: Sequence[WindowLimit],
        leases: Sequence[ConcurrencyLimit],
        budgets: Sequence[BudgetLimit],
    ) -> list[str]:
        t = self._tagged
        return [
            f"{t}a:{lease_id}",
            *(f"{t}w:{w.key}" for w in windows),
            *(f"{t}c:{c.key}" for c in leases),
            *self._budget_keys(b.key for b in budgets),
        ]

    def _budget_keys(self, keys: Iterable[str]) -> list[str]:
        return [k for key in keys for k in (f"{self._tagged}b:{key}", f"{self._tagged}b:{key}:r")]

    async def admit(
        self,
        lease_id: str,
        windows: Sequence[WindowLimit] = (),
        leases: Sequence[ConcurrencyLimit] = (),
        budgets: Sequence[BudgetLimit] = (),
    ) -> Admission:
        admission = Admission(False, lease_id, windows=windows, leases=leases, budgets=budgets)
        if not (windows or leases or budgets):
            admission.allowed = True
            return admission
        spec = [
            _ms(settle_deadline_s(windows, leases, budgets)),
            [[w.limit, w.amount, w.window_s] for w in windows],
            [[c.limit, _ms(c.ttl_s)] for c in leases],
            [[b.limit_micros, b.amount_micros, b.ttl_s, _ms(b.reservation_ttl_s)] for b in budgets],
        ]
        keys = self._keys(lease_id, windows, leases, budgets)
        reply = await self._run(self._admit(keys, [lease_id, orjson.dumps(spec)]))
        if reply[0] == 1:
            admission.allowed = True
            admission.buckets = [int(reply[1])] * len(windows)
            admission.remaining = [int(r) for r in reply[2:]]
            return admission
        kind, index, limit, current, retry = _KINDS[reply[1]], int(reply[2]), reply[3], int(reply[4]), reply[5]
        limits: Sequence[WindowLimit | ConcurrencyLimit | BudgetLimit] = (
            windows if kind == "window" else leases if kind == "concurrency" else budgets
        )
        admission.denial = Denial(
            kind,
            index,
            limits[index].key,
            None if limit is None else int(limit),
            current,
            None if retry is None else float(retry),
        )
        admission.remaining = [int(r) for r in reply[6:]]
        return admission

    async def settle(
        self, admission: Admission, window_actuals: Sequence[int] | None = None, cost_micros: int = 0
    ) -> None:
        if not admission.allowed or not (admission.windows or admission.leases or admission.budgets):
            return
        windows, leases, budgets = admission.windows, admission.leases, admission.budgets
        actuals = [w.amount for w in windows] if window_actuals is None else window_actuals
        spec = [
            cost_micros,
            len(leases),
            [
                [second, actual - w.amount, w.window_s]
                for w, second, actual in zip(windows, admission.buckets, actuals, strict=True)
            ],
            [b.ttl_s for b in budgets],
        ]
        keys = self._keys(admission.lease_id, windows, leases, budgets)
        await self._run(self._settle(keys, [admission.lease_id, orjson.dumps(spec)]))

    async def budget_spent(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        if not keys:
            return []
        reply = await self._run(self._budget_spent(self._budget_keys(keys)))
        return [(int(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def budget_seed(self, key: str, spent_micros: int, ttl_s: int) -> bool:
        return bool(await self._run(self._budget_seed(self._budget_keys([key]), [spent_micros, ttl_s])))

    async def get(self, key: str) -> bytes | None:
        value = await self._run(self._redis.get(self._kv + key))
        return value.encode() if isinstance(value, str) else value  # str only if the URL set decode_responses

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        await self._run(self._redis.set(self._kv + key, value, px=None if ttl_s is None else _ms(ttl_s)))

    async def delete(self, key: str) -> None:
        await self._run(self._redis.delete(self._kv + key))

    async def ping(self) -> None:
        await self._run(self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
