"""Test support: real processes (redis-server, proxy, simulator) started on free ports."""
