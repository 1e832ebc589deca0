"""What every `hoopai-proxy` command shares: the exit codes, the config variable, and how
a command finds its config. A leaf: the `serve`, `tokens` and other commands import it,
and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import Config, load_config
from proxy.errors import ConfigError

CONFIG_ENV = "HOOPAI_PROXY_CONFIG"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def config_from(path: str | None, environ: Mapping[str, str]) -> Config:
    """Load the config named on the command line or by $HOOPAI_PROXY_CONFIG."""
    chosen = path or environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError("", f"no config file: pass --config FILE or set ${CONFIG_ENV}")
    return load_config(chosen, environ)
