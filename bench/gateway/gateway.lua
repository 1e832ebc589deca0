-- The wrk side of `python bench/run.py`: rotates over the workload's requests, one per
-- Location, each thread from its own offset, and prints the run's figures on one line.
--   wrk ... -s gateway.lua URL -- REQUESTS_FILE THREADS
-- REQUESTS_FILE: one request per line, the path then `Name: value` headers, tab-separated.

local threads_set_up = 0

function setup(thread)
   thread:set("thread_index", threads_set_up)
   threads_set_up = threads_set_up + 1
end

function init(args)
   lines = {}
   for line in io.lines(args[1]) do
      local path = nil
      local headers = {}
      for field in line:gmatch("[^\t]+") do
         if path == nil then
            path = field
         else
            local name, value = field:match("^([^:]+):%s*(.*)$")
            headers[name] = value
         end
      end
      -- Formatted once: request() then only hands back a string.
      lines[#lines + 1] = wrk.format("GET", path, headers)
   end
   local threads = tonumber(args[2]) or 1
   position = math.floor(thread_index * #lines / threads)
end

function request()
   position = position % #lines + 1
   return lines[position]
end

function done(summary, latency, _)
   local errors = summary.errors
   io.write(string.format(
      "GATEWAY_RESULT requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f " ..
      "status=%d connect=%d read=%d write=%d timeout=%d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      errors.status, errors.connect, errors.read, errors.write, errors.timeout))
end
