"""The Lua cost table by N, from `bench/lua_cost.py` (written beside this benchmark) when
it is there. It runs in a process of its own with a time limit (what is left of the
run's 20 minutes), so a slow or broken script under test can neither hang nor sink a run
whose figures are already measured; the section then says why the table is missing."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300.0
MISSING = "bench/lua_cost.py is missing: no Lua cost table in this run."
CALL = "from bench.lua_cost import markdown_table; print(markdown_table(), end='')"


def lua_cost_table(timeout_s: float = TIMEOUT_S) -> str:
    if importlib.util.find_spec("bench.lua_cost") is None:
        print(MISSING, flush=True)
        return MISSING + "\n"
    print(f"Lua cost by N (bench/lua_cost.py, at most {timeout_s:.0f} s)", flush=True)
    # Its own session: on a timeout its redis-server goes with it (one process group).
    process = subprocess.Popen(
        [sys.executable, "-c", CALL],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        table, errors = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return _give_up(f"bench/lua_cost.py did not finish within {timeout_s:.0f} s")
    finally:
        if process.poll() is None:  # timed out, or interrupted
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    if process.returncode != 0:
        last = errors.strip().splitlines()[-1:] or [f"exit {process.returncode}"]
        return _give_up(f"bench/lua_cost.py failed ({last[0]})")
    return table


def _give_up(reason: str) -> str:
    text = f"{reason}: no Lua cost table in this run (`python -m bench.lua_cost` prints it)."
    print(text, flush=True)
    return text + "\n"
