"""What every benchmark shares: a case run in a fresh process, ratio cells, the process's resident memory.

What it knows: running ``python -m MODULE --worker CASE_JSON`` (or ``python -m MODULE CASE_JSON``) and reading the
last stdout line as the case's JSON result; formatting a ratio of two measurements; reading the resident set size.
What it does not know: what any benchmark measures; every number comes from a run, none is written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Mapping


def ratio(num: object, den: object) -> str:
    """``num / den`` to two decimals, or "-" when either side is missing (None, a failed case) or zero."""
    if not isinstance(num, (int, float)) or not isinstance(den, (int, float)) or not num or not den:
        return "-"
    return f"{num / den:.2f}"


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def spawn_case(module: str, case: Mapping[str, Any], *, flag: str | None = None,
               env: Mapping[str, str] | None = None) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """Run one case as ``python -m module [flag] CASE_JSON`` in a fresh process (so its peak memory is its own).

    Returns (the parsed last stdout line, or None when the process failed or printed nothing; the process)."""
    argv = [sys.executable, "-m", module, *([flag] if flag else []), json.dumps(dict(case))]
    proc = subprocess.run(argv, capture_output=True, text=True, env=None if env is None else dict(env))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, proc
    return json.loads(lines[-1]), proc
