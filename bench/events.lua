-- wrk script for durable event ingest: every request posts a new event_id.
-- Usage: TOKEN=… DEVICE_ID=… wrk -t2 -c64 -d10s -s bench/events.lua http://127.0.0.1:8000
local threads = {}

function setup(thread)
  thread:set("tag", tostring(#threads + 1) .. "-" .. tostring(os.time()))
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  token = os.getenv("TOKEN")
  device = os.getenv("DEVICE_ID")
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"device_id":"%s","event_id":"wrk-%s-%d","event":"treatment","treatment":"BASIC","counter":%d,"ts":"2025-09-16T12:34:56Z","current_counters":{"basic":%d,"standard":0,"premium":0}}',
    device, tag, counter, counter, counter)
  return wrk.format("POST", "/api/device/events/", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }, body)
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx: %d, socket errors: %d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write(string.format("p50 %.2f ms, p99 %.2f ms\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
