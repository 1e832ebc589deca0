"""hoopai-proxy: a rate-limiting, token-managing reverse proxy for the HoopAI API."""

__version__ = "0.1.0"
