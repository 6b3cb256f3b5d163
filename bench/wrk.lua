-- wrk script for bench/run.py.
--
--   wrk ... -s bench/wrk.lua URL -- MODE THREADS [RESOURCE TOKEN_FILE]
--
-- MODE is "bare" (no credentials), "ambient" (one reusable token, the first
-- line of TOKEN_FILE, on every request) or "per_call" (every request takes
-- the next unused single-use token: thread i of THREADS takes lines i+1,
-- i+1+THREADS, ... so no token is ever sent twice). A thread that runs out
-- of tokens sends an invalid one and counts it in "exhausted": such a run is
-- reported as invalid by run.py, never silently measured on error paths.
--
-- done() prints one line "BENCH_RESULT {json}" that run.py parses; latencies
-- are wrk's own histogram, in microseconds.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local function read_lines(path, first, step)
   local lines = {}
   local n = 0
   local file = assert(io.open(path, "r"))
   for line in file:lines() do
      if n % step == first and line ~= "" then
         table.insert(lines, line)
      end
      n = n + 1
   end
   file:close()
   return lines
end

function init(args)
   mode = args[1]
   local nthreads = tonumber(args[2])
   non2xx = 0
   exhausted = 0
   statuses = {}
   local headers = {}
   if mode ~= "bare" then
      headers["X-Caracal-Resource"] = args[3]
   end
   if mode == "ambient" then
      local token = read_lines(args[4], 0, 1)[1]
      headers["Authorization"] = "Bearer " .. token
   end
   if mode == "per_call" then
      tokens = read_lines(args[4], id, nthreads)
      used = 0
      per_call_headers = headers
   else
      fixed = wrk.format("GET", nil, headers)
   end
end

function request()
   if mode ~= "per_call" then
      return fixed
   end
   used = used + 1
   local token = tokens[used]
   if token == nil then
      exhausted = exhausted + 1
      token = "exhausted"
   end
   per_call_headers["Authorization"] = "Bearer " .. token
   return wrk.format("GET", nil, per_call_headers)
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      -- Counted per status so a failing run says why.
      statuses[status] = (statuses[status] or 0) + 1
   end
end

function done(summary, latency, requests)
   local bad, out_of_tokens = 0, 0
   local by_status = {}
   for _, thread in ipairs(threads) do
      bad = bad + thread:get("non2xx")
      out_of_tokens = out_of_tokens + thread:get("exhausted")
      for status, count in pairs(thread:get("statuses")) do
         by_status[status] = (by_status[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(by_status) do
      table.insert(parts, string.format('"%d":%d', status, count))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},'
      .. '"non2xx":%d,"non2xx_by_status":{%s},"exhausted":%d,'
      .. '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean,
      bad, table.concat(parts, ","), out_of_tokens,
      e.connect, e.read, e.write, e.timeout))
end
