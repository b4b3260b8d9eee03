"""What every benchmark result and the demo report record about the machine they ran on: results
are only comparable on the same machine, and the same machine's speed moves by up to 2x from day
to day, so each result carries the machine and its measured fp32 GEMM rate beside the date."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
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


def gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    """The machine's fp32 matrix-multiply rate now, in GFLOP/s: the best of ``repeats`` timed
    ``n x n @ n x n`` products (2 n^3 flops each) with torch's own threads, after one warm-up.
    Printed beside every wall time, since wall times are only comparable at the same rate."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
