"""Rate limiting per app per resource: the Limiter protocol and its backends."""
