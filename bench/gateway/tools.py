"""nginx and wrk on this machine: found on PATH (or in /usr/sbin, where Debian puts nginx),
else installed from Debian's packages with apt-get (through sudo when not root)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("nginx-light", "wrk")
# Debian 13 dropped nginx-light; its plain nginx package is the same server.
FALLBACK_PACKAGES = ("nginx", "wrk")


class MissingTool(RuntimeError):
    """A tool the benchmark needs is missing and could not be installed."""


def find(name: str) -> str | None:
    """The path of `name`, looking in /usr/sbin too (not on a normal user's PATH)."""
    found = shutil.which(name)
    if found is None and Path("/usr/sbin", name).exists():
        found = str(Path("/usr/sbin", name))
    return found


def ensure_tools() -> dict[str, str]:
    """Paths of nginx and wrk, installing them when either is missing."""
    if find("nginx") is None or find("wrk") is None:
        _install()
    paths = {name: find(name) for name in ("nginx", "wrk")}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise MissingTool(f"{', '.join(missing)} still not found after installing {PACKAGES}")
    return {name: path for name, path in paths.items() if path is not None}


def _install() -> None:
    print(f"nginx or wrk is missing: installing {' '.join(PACKAGES)} with apt-get", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        raise MissingTool(_hint("not root and sudo is not installed"))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _apt([*sudo, "apt-get", "update", "-q"], env)
    for packages in (PACKAGES, FALLBACK_PACKAGES):
        done = _apt([*sudo, "apt-get", "install", "-y", "-q", *packages], env, check=False)
        if done.returncode == 0:
            return
    raise MissingTool(_hint(done.stderr.strip().splitlines()[-1] if done.stderr else "failed"))


def _apt(
    command: list[str], env: dict[str, str], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise MissingTool(_hint(str(exc))) from exc
    if check and done.returncode != 0:
        raise MissingTool(_hint(done.stderr.strip()[-500:] or f"exit {done.returncode}"))
    return done


def _hint(reason: str) -> str:
    return (
        f"could not install nginx and wrk ({reason}). Install them yourself "
        f"(`sudo apt-get install nginx-light wrk` on Debian/Ubuntu) and run again."
    )
