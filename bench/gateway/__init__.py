"""The gateway benchmark behind `python bench/run.py`: nginx, a bare aiohttp forwarder and
the proxy (pass-through and managed tokens; memory, Redis and Redis Cluster limiters; one
and two workers) under wrk, with 2,000 Locations each carrying its own token.

One concern per module: `tools` (nginx and wrk installed), `workload` (the Locations, their
tokens, the request lines), `nginx` (the upstream and its proxy_pass twin), `forwarder`
(the bare forwarder), `processes` (starting and stopping them), `proxies` (the proxy's
configs and seeded token stores), `stack` (everything running, torn down after),
`warmup`, `wrk` (+ `gateway.lua`), `redis_calls`, `scenarios` (one measurement),
`headline` (interleaved rounds and their ratios), `profile` and `profile_buckets`
(py-spy), `access_log` (the proxy's own view of a run), `lua_table` (running
`bench/lua_cost.py`, bounded in time), `report` (markdown) and `chart` (the PNG).
"""
