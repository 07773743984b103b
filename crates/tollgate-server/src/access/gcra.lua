-- Tollgate GCRA, version 1: every demand of a request decided in one atomic step on the Redis
-- server's clock, all admitted and consumed or none. The same arithmetic as
-- tollgate_core::ratelimit, in microseconds: a subject's state is its theoretical arrival time
-- (TAT) in microseconds since the Unix epoch, stored as a decimal string that expires once the
-- subject is back at full capacity.
--
-- KEYS[i]: the state of demand i. ARGV[1]: 'acquire', 'peek' or 'adjust'; then four numbers per
-- demand: limit, window in microseconds, burst, and the units asked (acquire), returned or taken
-- (adjust, signed) or nothing (peek, 0).
-- Returns {admitted, then per demand: admitted, remaining, reset_after_us, retry_after_us}.

local mode = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
-- Sums of float emission intervals may miss an exact boundary by a rounding step; a nanosecond
-- of slack keeps the decision the exact arithmetic would make.
local EPS = 0.001

local function params(i)
  local at = 1 + (i - 1) * 4
  local limit = tonumber(ARGV[at + 1])
  local window = tonumber(ARGV[at + 2])
  local burst = tonumber(ARGV[at + 3])
  local amount = tonumber(ARGV[at + 4])
  local interval = window / limit
  return interval, (burst + 1) * interval, amount
end

local function tat_of(i)
  local stored = redis.call('GET', KEYS[i])
  if stored then
    return tonumber(stored)
  end
  return nil
end

local function store(i, tat)
  local ttl_ms = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', ttl_ms)
end

local function standing(out, interval, capacity, tat, admitted, wait)
  local ahead = tat - now
  local remaining = math.floor((capacity - ahead) / interval + EPS)
  if remaining < 0 then
    remaining = 0
  end
  out[#out + 1] = admitted and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = math.max(0, math.ceil(ahead - EPS))
  out[#out + 1] = math.max(0, math.ceil(wait - EPS))
end

local function peek(out, i)
  local interval, capacity = params(i)
  local base = math.max(tat_of(i) or now, now)
  local wait = math.max(0, base + interval - (now + capacity))
  standing(out, interval, capacity, base, wait <= EPS, wait)
end

local out = {1}
if mode == 'acquire' then
  local decisions = {}
  for i = 1, #KEYS do
    local interval, capacity, cost = params(i)
    local base = math.max(tat_of(i) or now, now)
    local new_tat = base + cost * interval
    local allowed_until = now + capacity
    local ok = new_tat <= allowed_until + EPS
    decisions[i] = {ok, base, new_tat, math.max(0, new_tat - allowed_until)}
    if not ok then
      out[1] = 0
    end
  end
  for i = 1, #KEYS do
    local interval, capacity = params(i)
    local d = decisions[i]
    if out[1] == 1 then
      store(i, d[3])
      standing(out, interval, capacity, d[3], true, 0)
    elseif d[1] then
      -- Refused by another policy, so nothing was consumed: where this one stands now.
      local wait = math.max(0, d[2] + interval - (now + capacity))
      standing(out, interval, capacity, d[2], true, wait)
    else
      standing(out, interval, capacity, d[2], false, d[4])
    end
  end
elseif mode == 'peek' then
  for i = 1, #KEYS do
    peek(out, i)
  end
elseif mode == 'adjust' then
  for i = 1, #KEYS do
    local interval, _, delta = params(i)
    local tat = tat_of(i)
    if tat then
      local step = math.abs(delta) * interval
      if delta >= 0 then
        store(i, tat + step)
      else
        store(i, math.max(tat - step, now))
      end
    end
  end
else
  return redis.error_reply('unknown mode ' .. tostring(mode))
end
return out
