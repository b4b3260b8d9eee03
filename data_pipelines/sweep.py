"""The ``sweep`` stage: choose a method's learning rate, steps, beta ... on the validation scenes.

    python -m data_pipelines.sweep --out runs/demo/sweep/mmdpo --data runs/demo/data \\
        --grid model.init_args.optim.lr=5e-6,1e-5,2e-5 --grid model.init_args.beta=0.1,0.3 \\
        --baseline runs/demo/sweep/sft-val --select chair_i --guard object_cover=-0.05 \\
        -- --config configs/dpo/mmdpo.yaml --data.init_args.train_file ... (the method's `mmalign fit` arguments)

Hyperparameters are tuned on the validation scenes and results reported on the test scenes: this
stage trains every point of a grid (the Cartesian product of the ``--grid KEY=V1,V2,...`` axes,
each key a ``mmalign fit`` option without its leading dashes) through the real CLI, evaluates
each exported model on ``--split val`` (the first ``--limit`` scenes) with ``mmalign eval``, and
picks the point with the lowest ``--select`` metric (a caption metric of the world benchmark:
``chair_i``, ``chair_s``, ``attribute_error_rate``, ...) among those that keep every ``--guard
METRIC=DELTA``: the metric may fall at most ``-DELTA`` below the ``--baseline`` evaluation's value
(``object_cover=-0.05``: coverage not lower by more than 5 points than the baseline's). When no point
keeps the guards, the best unguarded point is still reported and ``best.json`` says so.

The same ``--grid`` size per method is the sweep budget the issue asks to keep equal; the report
states the budget (points x steps) so sweeps are compared on it.

Output (atomic, in ``--out``): ``points/<slug>/`` (each point's training run, ``model/`` and
``eval/``), ``sweep.jsonl`` (one row per point: its overrides, wall seconds, every caption metric
with its interval, the guards it keeps), ``sweep.md`` (the table), ``best.json`` (the chosen
overrides, ready to paste into a config or a command line) and ``manifest.json``. A point whose
evaluation exists with the same overrides is not trained again, so a killed sweep resumes where it
stopped; ``--force`` redoes every point.

A failed training or evaluation stops the sweep with the point, the command and its exit status;
the points already done stay on disk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmalign.stage import atomic_write_jsonl, atomic_write_text

STAGE = "sweep"
#: The section of the world benchmark's metrics.json the selection reads.
SECTION = "captions"


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["model.init_args.beta=0.1,0.3", ...]`` -> ``[("model.init_args.beta", ["0.1", "0.3"]), ...]``.

    Values stay strings: ``mmalign fit`` parses them as it parses its own command line. A key given
    twice, an empty key or value list, or a key with a leading ``--`` is an error naming it."""
    grid: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. model.init_args.optim.lr=1e-5,2e-5)")
        if key.startswith("-"):
            raise ValueError(f"--grid {spec!r}: give the option without its leading dashes ({key.lstrip('-')})")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"--grid {spec!r}: no values")
        if key in seen:
            raise ValueError(f"--grid {spec!r}: {key} is given twice")
        seen.add(key)
        grid.append((key, vals))
    return grid


def grid_points(grid: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """Every combination, the first axis varying slowest (the order the table lists them)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in grid))]


def slug(point: Mapping[str, str]) -> str:
    """A folder name for a point: the last part of each key with its value, filesystem-safe
    (``model.init_args.optim.lr=1e-5`` -> ``lr=1e-5``)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9=._+-]", "_", "_".join(parts)) or "default"


def parse_guards(specs: Sequence[str]) -> dict[str, float]:
    """``["object_cover=-0.05"]`` -> ``{"object_cover": -0.05}`` (the most a metric may fall)."""
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, delta = spec.partition("=")
        try:
            out[name.strip()] = float(delta)
        except ValueError:
            raise ValueError(f"--guard {spec!r}: expected METRIC=DELTA, e.g. object_cover=-0.05") from None
        if not sep or not name.strip():
            raise ValueError(f"--guard {spec!r}: expected METRIC=DELTA")
    return out


def caption_metrics(metrics_json: Path) -> dict[str, dict[str, float]]:
    """The caption section's metrics of an evaluation (``{name: {value, low, high, n}}``)."""
    doc = json.loads(Path(metrics_json).read_text())
    try:
        return doc["sections"][SECTION]["metrics"]
    except KeyError:
        raise ValueError(f"{metrics_json}: no {SECTION!r} section (is it a world benchmark evaluation?)") from None


def keeps_guards(metrics: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]] | None,
                 guards: Mapping[str, float]) -> dict[str, bool]:
    """Per guard: does the point's value stay within ``delta`` of the baseline's (value >= base + delta)?"""
    if not guards:
        return {}
    if baseline is None:
        raise ValueError("guards need --baseline (the evaluation they are measured against)")
    out = {}
    for name, delta in guards.items():
        if name not in metrics or name not in baseline:
            raise ValueError(f"guard {name!r}: not a caption metric of both evaluations")
        out[name] = metrics[name]["value"] >= baseline[name]["value"] + delta - 1e-12
    return out


def choose(rows: Sequence[Mapping[str, Any]], select: str) -> tuple[Mapping[str, Any], bool]:
    """The row with the lowest ``select`` metric among those keeping every guard (first in grid
    order on a tie), and whether it keeps them; when none does, the lowest of all, and False.
    Points whose metric is undefined (NaN) are passed over; if every point's is, a ValueError."""
    # An undefined metric (NaN: CHAIR_i of captions that name no object) never wins.
    defined = [r for r in rows if math.isfinite(r["metrics"][select]["value"])]
    if not defined:
        raise ValueError(f"no point has a defined {select} ({len(rows)} points; e.g. CHAIR_i is undefined "
                         "when no caption names an object)")
    ok = [r for r in defined if all(r["guards"].values())]
    best = min(ok or defined, key=lambda r: r["metrics"][select]["value"])
    return best, bool(ok)


def sweep_budget(points: Sequence[Mapping[str, str]], fit_args: Sequence[str]) -> str:
    """The sweep's size in words: points x steps (steps from the grid, else the fit arguments)."""
    steps = {p.get("trainer.max_steps") for p in points}
    if steps == {None}:
        fixed = [fit_args[i + 1] for i, a in enumerate(fit_args[:-1]) if a == "--trainer.max_steps"]
        steps = {fixed[-1] if fixed else None}
    if steps == {None}:
        return f"{len(points)} points x the config's steps"
    if len(steps) == 1:
        return f"{len(points)} points x {steps.pop()} steps"
    return f"{len(points)} points, trainer.max_steps in {{{', '.join(sorted(steps, key=float))}}}"


def _fmt(m: Mapping[str, float] | None) -> str:
    if m is None:
        return "-"
    return f"{100 * m['value']:.1f} [{100 * m['low']:.1f}, {100 * m['high']:.1f}]"


def report_md(rows: Sequence[Mapping[str, Any]], best: Mapping[str, Any], guarded: bool, select: str,
              shown: Sequence[str], baseline: Mapping[str, Mapping[str, float]] | None, budget: str) -> str:
    keys = list(rows[0]["overrides"]) if rows else []
    head = ["point", *[k.rsplit(".", 1)[-1] for k in keys], *shown, "guards", "seconds"]
    lines = [f"# Sweep: lowest {select} on the validation scenes", "",
             f"Budget: {budget}. Chosen: `{best['slug']}`"
             + ("" if guarded else " (no point kept every guard: the lowest of all)") + ".", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if baseline is not None:
        lines.append("| baseline | " + " | ".join("" for _ in keys) + (" | " if keys else "")
                     + " | ".join(_fmt(baseline.get(m)) for m in shown) + " | | |")
    for r in rows:
        mark = " **(chosen)**" if r["slug"] == best["slug"] else ""
        g = ", ".join(f"{k} {'ok' if v else 'FAILS'}" for k, v in r["guards"].items()) or "-"
        lines.append("| " + " | ".join([r["slug"] + mark, *[r["overrides"][k] for k in keys],
                                         *[_fmt(r["metrics"].get(m)) for m in shown], g, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], where: str, log: Path) -> None:
    """Run one command, its output to ``log``; a failure names the point, the command and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{where}: exit status {rc}: {' '.join(cmd)}\n(last lines of {log}):\n{tail}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, fit_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.sweep",
        description="Train every point of a hyperparameter grid through `mmalign fit`, evaluate each on the "
                    "validation scenes and choose the best (arguments after -- go to `mmalign fit`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="sweep folder")
    ap.add_argument("--data", type=Path, required=True, help="the data stage's folder (the world's scenes)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="one axis: an `mmalign fit` option without dashes and its values (repeatable)")
    ap.add_argument("--split", default="val", help="the scenes points are evaluated on (never test: that is for reporting)")
    ap.add_argument("--limit", type=int, default=100, help="evaluate on the first N scenes of --split (0 = all)")
    ap.add_argument("--select", default="chair_i", help="caption metric to minimise")
    ap.add_argument("--guard", action="append", default=[], metavar="METRIC=DELTA",
                    help="a point qualifies only if METRIC >= baseline + DELTA (e.g. object_cover=-0.05)")
    ap.add_argument("--baseline", type=Path, help="an evaluation folder on the same split and limit (guards and the table)")
    ap.add_argument("--show", default="chair_i,chair_s,object_cover,attribute_error_rate,relation_error_rate",
                    help="caption metrics in the table")
    ap.add_argument("--seed", type=int, default=0, help="seed_everything of every point")
    ap.add_argument("--eval-args", default="", help="extra `mmalign eval` arguments, one string (e.g. '--n-boot 200')")
    ap.add_argument("--force", action="store_true", help="retrain points whose evaluation exists")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = ap.parse_args(argv)
    if args.split == "test":
        ap.error("--split test: tune on the validation scenes and report on the test scenes")
    try:
        grid = parse_grid(args.grid)
        guards = parse_guards(args.guard)
    except ValueError as e:
        ap.error(str(e))
    if not fit_args:
        ap.error("give the method's `mmalign fit` arguments after -- (at least --config ...)")
    for a in fit_args:
        if a in ("--trainer.default_root_dir", "--model.init_args.export.dir", "--seed_everything"):
            ap.error(f"{a} is set per point by the sweep; leave it out of the fit arguments")
    shown = [m.strip() for m in args.show.split(",") if m.strip()]
    if args.select not in shown:
        shown.insert(0, args.select)
    baseline = caption_metrics(args.baseline / "metrics.json") if args.baseline else None
    if baseline is not None and args.select not in baseline:
        ap.error(f"--select {args.select}: not a caption metric of {args.baseline}")

    points = grid_points(grid) if grid else [{}]
    slugs = [slug(p) for p in points]
    if len(set(slugs)) != len(slugs):
        ap.error("two grid points map to the same folder name: use distinct values")
    budget = sweep_budget(points, fit_args)
    py = sys.executable
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (point, name) in enumerate(zip(points, slugs), 1):
        pdir = args.out / "points" / name
        overrides = [x for k, v in point.items() for x in (f"--{k}", v)]
        fit = [py, "-m", "mmalign.cli", "fit", *fit_args, *overrides, "--seed_everything", str(args.seed),
               "--trainer.default_root_dir", str(pdir), "--model.init_args.export.dir", str(pdir / "model")]
        ev = [py, "-m", "mmalign.cli", "eval", "--model", str(pdir / "model"), "--data", str(args.data),
              "--split", args.split, "--limit", str(args.limit), "--out", str(pdir / "eval"), "--no-progress",
              *args.eval_args.split()]
        if args.dry_run:
            print(" ".join(fit))
            print(" ".join(ev))
            continue
        done = pdir / "point.json"
        if not args.force and done.is_file() and json.loads(done.read_text()).get("overrides") == point \
                and (pdir / "eval/metrics.json").is_file():
            row = json.loads(done.read_text())
            print(f"[{i}/{len(points)}] {name}: done before, {args.select} {row['metrics'][args.select]['value']:.4f}",
                  file=sys.stderr)
        else:
            print(f"[{i}/{len(points)}] {name}: training and evaluating ...", file=sys.stderr)
            t0 = time.perf_counter()
            _run(fit, f"point {name} (training)", pdir / "fit.log")
            _run(ev, f"point {name} (evaluation)", pdir / "eval.log")
            metrics = caption_metrics(pdir / "eval/metrics.json")
            row = {"slug": name, "overrides": point, "seconds": round(time.perf_counter() - t0, 1), "metrics": metrics}
            atomic_write_text(done, json.dumps(row, indent=1))
            print(f"[{i}/{len(points)}] {name}: {args.select} {metrics[args.select]['value']:.4f} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr)
        if args.select not in row["metrics"]:
            raise SystemExit(f"point {name}: {args.select!r} is not among its caption metrics")
        row["guards"] = keeps_guards(row["metrics"], baseline, guards)
        rows.append(row)
    if args.dry_run:
        return 0
    try:
        best, guarded = choose(rows, args.select)
    except ValueError as e:
        raise SystemExit(f"{args.out}: {e}") from None
    atomic_write_jsonl(args.out / "sweep.jsonl", rows)
    atomic_write_text(args.out / "sweep.md", report_md(rows, best, guarded, args.select, shown, baseline, budget))
    atomic_write_text(args.out / "best.json", json.dumps(
        {"slug": best["slug"], "overrides": best["overrides"], "select": args.select,
         "value": best["metrics"][args.select]["value"], "kept_guards": guarded, "budget": budget,
         "split": args.split, "limit": args.limit}, indent=1))
    atomic_write_text(args.out / "manifest.json", json.dumps(
        {"stage": STAGE, "grid": grid, "guards": guards, "select": args.select, "split": args.split,
         "limit": args.limit, "seed": args.seed, "fit_args": fit_args, "baseline": str(args.baseline or ""),
         "points": [r["slug"] for r in rows]}, indent=1))
    print(f"{args.out}/sweep.md: chosen {best['slug']} ({args.select} {best['metrics'][args.select]['value']:.4f}"
          + ("" if guarded else "; no point kept every guard") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
