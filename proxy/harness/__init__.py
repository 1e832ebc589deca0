"""Running the proxy, the simulator and redis-server as processes on this machine, and
caller-shaped tokens: for the tests and the benchmarks, which start everything the way an
operator does (never a fake)."""
