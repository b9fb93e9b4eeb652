-- wrk script for the bench's runs (bench/load.ts runs wrk with it).
-- The request comes from the environment: BENCH_WRK_METHOD, BENCH_WRK_BODY (optional) and
-- BENCH_WRK_HEADERS ("name: value" lines). done() prints one JSON line with wrk's counts and
-- latency percentiles (microseconds, from wrk's per-microsecond histogram).
--
-- BENCH_WRK_RATE (requests a second, optional): a fixed rate instead of saturation. wrk asks
-- delay() before every request it sends (one thread: one Lua state for all its connections);
-- each call takes the next free slot of one schedule, a slot every 1/rate seconds, and waits
-- until it (wrk's timers have whole-millisecond steps, so a request leaves at most 1 ms after
-- its slot; the schedule itself does not drift). A target that answers late gets fewer slots:
-- a slot already past is not made up for. wrk starts the latency clock when the request is
-- written, after the delay.
wrk.method = os.getenv("BENCH_WRK_METHOD") or "GET"
wrk.body = os.getenv("BENCH_WRK_BODY")
for line in (os.getenv("BENCH_WRK_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end

local rate = tonumber(os.getenv("BENCH_WRK_RATE") or "")
if rate then
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock, bench_timespec *ts);
  ]]
  local ts = ffi.new("bench_timespec")
  local CLOCK_MONOTONIC = 1
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval = 1000 / rate
  local next_slot = nil

  function delay()
    local now = now_ms()
    if next_slot == nil or next_slot < now then next_slot = now end
    local slot = next_slot
    next_slot = slot + interval
    return math.ceil(slot - now)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"durationUs":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
