"""What every benchmark result records about the machine it ran on (results are only comparable
on the same machine, so each result file carries this beside the date)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine_base() -> dict[str, Any]:
    """CPU model, core counts, memory, Python, platform, and the repository commit (``+dirty``
    when the working tree has changes)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import psutil

        physical, mem = psutil.cpu_count(logical=False), round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, mem = None, None

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical, "memory_gib": mem,
            "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": commit + ("+dirty" if dirty else "")}
