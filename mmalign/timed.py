"""Run one pipeline stage's command and record its wall time: ``python -m mmalign.timed --log
runs/demo/timings.jsonl --stage sft -- <command...>``.

Why a wrapper and not each stage timing itself: the wall time a user waits for includes the
interpreter start and the imports (several seconds per stage here), and the Makefile is the one
place that knows which command is which stage. The wrapper imports nothing heavy, runs the
command as a child (its exit status and signals pass through unchanged) and appends one JSON line
per run to the log; the demo report (``data_pipelines.report``) shows the latest line per stage.
A stage that `make` skips because it is up to date leaves no line, so the report keeps the time
of the run that produced the output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def stage_name(target: str, root: str) -> str:
    """A readable stage name from a make target: ``runs/demo/rm/scored/train/manifest.json`` ->
    ``rm/scored/train``; ``runs/demo/sft/model/config.json`` -> ``sft``; phony targets as they are."""
    rel = target
    root = root.rstrip("/") + "/"
    rel = rel.removeprefix(root)
    parts = rel.split("/")
    if len(parts) > 1 and "." in parts[-1]:  # a marker file: the stage is its folder
        parts = parts[:-1]
    if len(parts) > 1 and parts[-1] == "model":  # exported models: <run>/model
        parts = parts[:-1]
    if len(parts) == 1 and "." in parts[0]:  # a file directly in the run folder: report.md -> report
        parts = [parts[0].rsplit(".", 1)[0]]
    return "/".join(parts)


def append_line(log: Path, record: dict) -> None:
    """One line, written with a single O_APPEND write so that parallel stages (make -j) never
    interleave within a line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def split_command(argv: list[str] | None, usage: str) -> tuple[list[str], list[str]] | None:
    """``[options] -- command ...`` -> (options, command); None (after printing ``usage``) when
    there is no ``--``. The wrappers (this module, mmalign.plan) run a command given after it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(f"usage: {usage}", file=sys.stderr)
        return None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def main(argv: list[str] | None = None) -> int:
    split = split_command(argv, "python -m mmalign.timed --log FILE (--stage NAME | --target T --root R) -- command ...")
    if split is None:
        return 2
    opts, command = split
    ap = argparse.ArgumentParser(prog="python -m mmalign.timed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", type=Path, required=True, help="JSONL file the timing line is appended to")
    ap.add_argument("--stage", help="stage name (default: derived from --target and --root)")
    ap.add_argument("--target", help="the make target ($@)")
    ap.add_argument("--root", default="", help="the run folder, stripped from --target")
    args = ap.parse_args(opts)
    if not command:
        ap.error("no command after --")
    stage = args.stage or stage_name(args.target or command[0], args.root)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(command)
    except OSError as e:
        print(f"mmalign.timed: cannot run {command[0]!r} for stage {stage}: {e}", file=sys.stderr)
        return 127
    # Ctrl-C reaches the child through the process group; wait for it rather than dying first and
    # leaving it orphaned.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    append_line(args.log, {"stage": stage, "seconds": round(seconds, 2), "rc": rc,
                           "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
                           "command": " ".join(command)})
    if rc == 0:
        print(f"[{stage}: {seconds:.1f} s]", file=sys.stderr)
    # A child killed by a signal reports -N; the shell convention is 128 + N.
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    raise SystemExit(main())
