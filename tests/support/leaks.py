"""Checking that no token the simulator issued appears in what the proxy wrote."""

from __future__ import annotations

from collections.abc import Iterable


def leaked(texts: Iterable[str], tokens: Iterable[str]) -> list[str]:
    """The tokens (shortened, so the failure itself leaks nothing) found in any text."""
    joined = "\n".join(texts)
    return [f"{token[:12]}..." for token in tokens if token and token in joined]
