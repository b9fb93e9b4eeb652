-- wrk script for the bench's saturation runs (bench/load.ts runs wrk with it).
-- The request comes from the environment: BENCH_WRK_METHOD, BENCH_WRK_BODY (optional) and
-- BENCH_WRK_HEADERS ("name: value" lines). done() prints one JSON line with wrk's counts and
-- latency percentiles (microseconds, from wrk's per-microsecond histogram).
wrk.method = os.getenv("BENCH_WRK_METHOD") or "GET"
wrk.body = os.getenv("BENCH_WRK_BODY")
for line in (os.getenv("BENCH_WRK_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"durationUs":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
