"""The demo's one report: ``runs/<RUN>/report.md`` with report-metrics.png and report-training.png.

    python -m data_pipelines.report --run runs/demo --runs sft sft-continued mmdpo realign fgaif dress \\
        --ablations dpo realign-text fgaif-seq fgaif-oracle dress-uncond --refine sft sft-continued dress

What it reads (all written by earlier stages; nothing is recomputed from the models):

* ``eval/<run>/`` of every method (``mmalign eval`` outputs): one table, every method against SFT
  and against SFT-continued on the same held-out scenes, each number with its 95% bootstrap
  interval and each difference with a paired 95% interval (``*``: excludes 0). SFT-continued is
  the fair baseline: the SFT model trained for as many further steps as the preference methods,
  so a difference from it is the method's, not the extra steps'. Ablations and controls are added
  when they have been evaluated (``make ablations``).
* ``refine/compare/compare.json`` (the refinement benchmark, DRESS's multi-turn setting: the
  ``--refine`` runs side by side with paired differences from SFT, as ``python -m
  data_pipelines.refine_bench compare`` wrote it, ``make eval-dress``). It must have been made from
  the ``refine/<run>/`` outputs now in place (its manifest's input hashes); when it is missing or
  older, the report says so, with the command that makes it, and leaves the table out.
* ``rm/scored/val`` and ``fg-rm/<source>/eval`` (how good the reward models are, in one line each).
* ``timings.jsonl`` (``mmalign.timed``): the wall time of each stage's latest run.
* ``<run>/logs/metrics.csv`` (Lightning's CSV logs): the training curves.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmalign.eval.refine_metrics import fmt_metric

STAGE = "report"

#: Display names of the runs the Makefile produces.
NAMES = {"sft": "SFT", "sft-continued": "SFT-continued", "mmdpo": "MM-DPO (MM-RLHF)", "realign": "rDPO (Re-Align)",
         "fgaif": "FGAIF-PPO", "dress": "DRESS", "dpo": "DPO (ablation)", "realign-text": "text-only DPO (ablation)",
         "fgaif-seq": "PPO sequence reward (ablation)", "fgaif-oracle": "PPO oracle rewards (control)",
         "dress-uncond": "DRESS unconditioned (ablation)"}

#: The table's columns: (section, metric, header). POPE is the existence split of the yes/no
#: benchmark; "helpfulness" here is object coverage (share of the scene's objects the caption
#: names): the synthetic world has no preference judge, and coverage is what a caption that
#: hallucinates less by saying less gives up.
COLUMNS = (("captions", "chair_i", "CHAIR_i ↓"), ("captions", "chair_s", "CHAIR_s ↓"),
           ("existence/random", "f1", "POPE F1 random ↑"), ("existence/popular", "f1", "POPE F1 popular ↑"),
           ("existence/adversarial", "f1", "POPE F1 adversarial ↑"),
           ("captions", "attribute_error_rate", "attribute errors ↓"),
           ("captions", "relation_error_rate", "relation errors ↓"),
           ("captions", "object_cover", "helpfulness: object coverage ↑"))

#: Refinement-benchmark rows: (turn, metric, label).
REFINE_ROWS = ((0, "false_per_caption", "false claims per caption, turn 0"),
               (1, "false_per_caption", "false claims per caption, turn 1"),
               (2, "false_per_caption", "false claims per caption, turn 2"),
               (1, "fixed_claim_share", "turn-0 false claims fixed after turn 1"),
               (2, "fixed_claim_share", "turn-0 false claims fixed after turn 2"),
               (2, "introduced_per_caption", "new false claims per caption, turn 2"),
               (2, "coverage", "helpfulness: coverage, turn 2"))

#: Training curves: run -> (primary column, secondary column or None). The first column present wins.
CURVES = (("train/reward/total", "train/kl"), ("train/loss", "train/reward_accuracy"))


def pct(v: Mapping[str, float] | None, percent: bool = True, signed: bool = False) -> str:
    from mmalign.eval.report import fmt

    return fmt(v, percent=percent, signed=signed)


def _metric(doc: Mapping[str, Any], section: str, key: str) -> Mapping[str, float] | None:
    return doc["sections"].get(section, {}).get("metrics", {}).get(key)


def main_table(cmp_sft: Mapping[str, Any], cmp_cont: Mapping[str, Any] | None, runs: Sequence[str],
               folders: Mapping[str, str]) -> list[str]:
    """Rows = methods; every cell: value [95% CI], then Δ vs SFT and Δ vs SFT-continued (paired)."""
    header = "| method | " + " | ".join(h for _, _, h in COLUMNS) + " |"
    lines = [header, "|---|" + "---|" * len(COLUMNS)]
    for run in runs:
        f = folders[run]
        doc = cmp_sft["metrics"][f]
        cells = []
        for section, key, _ in COLUMNS:
            parts = [pct(_metric(doc, section, key))]
            if run != "sft":
                d = cmp_sft["diffs"].get(f, {}).get(section, {}).get(key)
                parts.append(f"Δ SFT {pct(d, signed=True)}" if d else "")
            if cmp_cont and run not in ("sft", "sft-continued"):
                d = cmp_cont["diffs"].get(f, {}).get(section, {}).get(key)
                parts.append(f"Δ cont. {pct(d, signed=True)}" if d else "")
            cells.append("<br>".join(p for p in parts if p))
        lines.append(f"| **{NAMES.get(run, run)}** | " + " | ".join(cells) + " |")
    return lines


def refine_table(cmp: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    runs = cmp["runs"]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for turn, key, label in REFINE_ROWS:
        if turn >= cmp["turns"]:
            continue
        cells = []
        for i, r in enumerate(runs):
            v = cmp["metrics"][r]["turns"][turn]["metrics"].get(key)
            cell = fmt_metric(v, key) if v else "n/a"
            if i:
                d = cmp["diffs"][r][turn].get(key)
                cell += f"<br>Δ {names[0]} {fmt_metric(d, key, signed=True)}" if d else ""
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def read_refine_compare(folder: Path, runs: Sequence[Path]) -> dict[str, Any]:
    """The refinement benchmark's comparison of ``runs`` (baseline first), as ``python -m
    data_pipelines.refine_bench compare`` wrote it: ``folder/compare.json``.

    Raises FileNotFoundError when it is missing, ValueError when it was made from other runs or
    from earlier outputs of them (the input hashes in its manifest differ from the runs' now);
    both messages give the command that makes it.
    """
    from mmalign.stage import input_hash, read_manifest

    path = folder / "compare.json"
    redo = (f"python -m data_pipelines.refine_bench compare {' '.join(map(str, runs))} --names "
            f"{' '.join(r.name for r in runs)} --out {folder} (what `make eval-dress` runs)")
    manifest = read_manifest(folder)
    if not path.is_file() or manifest is None:
        raise FileNotFoundError(f"{path}: missing, so the refinement benchmark's comparison is not in the report; "
                                f"make it with: {redo}")
    stored = [entry.get("sha256") for entry in manifest.get("inputs", [])]
    if stored != [input_hash(r) for r in runs]:
        raise ValueError(f"{path} was not made from the refinement runs now in place ({', '.join(r.name for r in runs)}, "
                         f"in this order): other runs, or earlier outputs of them; make it again with: {redo}")
    return json.loads(path.read_text())


def timing_rows(path: Path) -> tuple[list[dict[str, Any]], float]:
    """The latest successful run of each stage, in the order the stages first ran."""
    latest: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return [], 0.0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            stage, seconds = str(rec["stage"]), float(rec["seconds"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: not a timing line ({e})") from None
        if rec.get("rc", 0) == 0 and stage != STAGE:
            latest.pop(stage, None)  # re-insert: order = when the output now in place was made
            latest[stage] = {"stage": stage, "seconds": seconds, "started": rec.get("started", "")}
    rows = list(latest.values())
    return rows, sum(r["seconds"] for r in rows)


def read_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSV log -> column -> [(step, value)] (empty cells skipped)."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or "nan"))
            except ValueError:
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or not v:
                    continue
                try:
                    x = float(v)
                except ValueError:
                    continue
                if math.isfinite(x):
                    out.setdefault(k, []).append((step, x))
    return out


def _ema(ys: Sequence[float]) -> list[float]:
    """Exponential moving average over about a tenth of the curve (short quick-scale runs log
    a handful of points; a fixed 0.1 would lag behind all of them)."""
    alpha = min(0.5, max(0.02, 10 / max(1, len(ys))))
    out, m = [], None
    for y in ys:
        m = y if m is None else (1 - alpha) * m + alpha * y
        out.append(m)
    return out


def plot_training(run_dir: Path, runs: Sequence[str], path: Path) -> list[str]:
    """One panel per run: its main training signal (thin: logged, bold: smoothed) and, dashed on
    the right axis, the second one (DPO reward accuracy, PPO KL). Returns the runs plotted."""
    from mmalign.eval.report import _plt

    panels = []
    for run in runs:
        log = run_dir / run / "logs" / "metrics.csv"
        if not log.exists():
            continue
        curves = read_curves(log)
        for primary, secondary in CURVES:
            if primary in curves:
                panels.append((run, primary, curves[primary], secondary, curves.get(secondary or "", [])))
                break
    if not panels:
        return []
    plt = _plt()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (run, primary, pts, secondary, pts2) in zip(axes.flat, panels):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=0.6, alpha=0.4, color="C0")
        ax.plot(xs, _ema(ys), lw=1.8, color="C0", label=primary)
        ax.set_title(NAMES.get(run, run), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(primary, fontsize=8, color="C0")
        ax.grid(alpha=0.3)
        if pts2:
            ax2 = ax.twinx()
            x2, y2 = zip(*pts2)
            ax2.plot(x2, _ema(y2), lw=1.2, ls="--", color="C3")
            ax2.set_ylabel(secondary, fontsize=8, color="C3")
    fig.suptitle("training curves (thin: logged, bold: smoothed; dashed, right axis: secondary)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [p[0] for p in panels]


def plot_metrics(cmp: Mapping[str, Any], runs: Sequence[str], folders: Mapping[str, str], path: Path) -> None:
    """Grouped bars with 95% intervals: caption hallucination per type, POPE F1 per split, coverage."""
    from mmalign.eval.report import _bars, _plt

    plt = _plt()
    groups = (("hallucination in captions (lower is better)",
               [c for c in COLUMNS if c[0] == "captions" and c[1] != "object_cover"]),
              ("POPE F1 per split (higher is better)", [c for c in COLUMNS if c[0].startswith("existence")]),
              ("object coverage (higher is better)", [c for c in COLUMNS if c[1] == "object_cover"]))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [4, 3, 1.6]})
    for ax, (title, cols) in zip(axes, groups):
        series = [(NAMES.get(r, r), [_metric(cmp["metrics"][folders[r]], s, k) for s, k, _ in cols]) for r in runs]
        _bars(ax, [h.rstrip(" ↑↓") for _, _, h in cols], series, title)
    # One legend under the panels: inside a panel it covers bars once there are ten methods.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("every method on the same held-out scenes (95% bootstrap intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 5), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build(run_dir: Path, runs: Sequence[str], ablations: Sequence[str], refine: Sequence[str], scale: str,
          n_boot: int = 1000, refine_compare: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The report's Markdown and JSON. ``refine_compare``: the folder of the refinement
    benchmark's comparison (default ``run_dir/refine/compare``); ``n_boot`` applies to the
    method table (the comparison has its own, from when it was made)."""
    from mmalign.eval.runner import compare_runs
    from mmalign.machine import gemm_gflops, machine_base

    if runs[:2] != ["sft", "sft-continued"][: len(runs[:2])] or "sft" not in runs:
        raise ValueError("--runs must start with sft (the baseline), then sft-continued")
    evals = run_dir / "eval"
    missing = [r for r in runs if not (evals / r / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no evaluation for {', '.join(missing)} (eval/<run>/metrics.json); "
                                f"run `make demo` (or `make eval-<method>`) first")
    present = list(runs) + [a for a in ablations if (evals / a / "metrics.json").exists()]
    folders = {r: str(evals / r) for r in present}
    cmp_sft = compare_runs([evals / r for r in present], n_boot=n_boot)
    cmp_cont = (compare_runs([evals / r for r in present if r != "sft"], n_boot=n_boot)
                if "sft-continued" in present and len(present) > 2 else None)
    first = cmp_sft["metrics"][folders["sft"]]
    n_scenes = first["sections"]["captions"]["n"]

    lines = [f"# mmalign report: `{run_dir}`", "",
             (f"Scale **{scale}**; {n_scenes} held-out test scenes per method (the same scenes for every method); "
             f"machine: {first.get('machine', '?')}; report written "
             f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."), "",
             ("Every cell: the value with its 95% bootstrap interval over scenes; below it the paired difference "
             "from SFT and from SFT-continued (the fair baseline: SFT trained as many further steps), in "
             "percentage points with a paired 95% interval; `*` marks an interval that excludes 0. ↓: lower is "
             "better. POPE: the existence yes/no questions of the world benchmark per split; helpfulness: object "
             "coverage (share of the scene's objects the caption names). Definitions: docs/EVALUATION.md."), "",
             "## Every method vs SFT and SFT-continued", ""]
    lines += main_table(cmp_sft, cmp_cont, present, folders)
    lines += ["", "![metrics per method](report-metrics.png)", ""]

    refine_present = [r for r in refine if (run_dir / "refine" / r / "metrics.json").exists()]
    refine_cmp = refine_missing = None
    if len(refine_present) >= 2 and refine_present[0] == "sft":
        lines += ["## Refinement benchmark (multi-turn, DRESS's setting)", ""]
        try:
            refine_cmp = read_refine_compare(refine_compare or run_dir / "refine" / "compare",
                                             [run_dir / "refine" / r for r in refine_present])
        except (FileNotFoundError, ValueError) as e:
            refine_missing = str(e)
            print(f"{STAGE}: {e}", file=sys.stderr)
            lines += [f"Not shown: {e}", ""]
    if refine_cmp is not None:
        lines += [(f"{refine_cmp['scenes']} held-out scenes: caption, the oracle's refinement, answer again "
                  f"({refine_cmp['turns'] - 1} turns). Details: `{run_dir}/refine/*/report.md`."), ""]
        lines += refine_table(refine_cmp, [NAMES.get(r, r) for r in refine_present])
        lines.append("")

    rm_lines = _reward_model_lines(run_dir)
    if rm_lines:
        lines += ["## Reward models (held-out)", "", *rm_lines, ""]

    rows, total = timing_rows(run_dir / "timings.jsonl")
    trained = plot_training(run_dir, present, run_dir / "report-training.png")
    if trained:
        lines += ["## Training curves", "", "![training curves](report-training.png)", ""]
    gflops = gemm_gflops()
    if rows:
        lines += ["## Wall time per stage", "",
                  (f"Machine speed when this report was written: **{gflops:.0f} GFLOP/s** fp32 GEMM (1024^3, best "
                  "of 10; the same host has measured up to 2x apart on different days, so compare wall times only "
                  "at a similar rate). "
                  f"The latest run of each stage (`{run_dir}/timings.jsonl`, written by `mmalign.timed` around every "
                  "stage command: interpreter start and imports included). Stages `make` found up to date keep "
                  "the time of the run that made their output."), "",
                  "| stage | wall time | started |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {_duration(r['seconds'])} | {r['started']} |" for r in rows]
        lines += [f"| **total** | **{_duration(total)}** (at {gflops:.0f} GFLOP/s) | |", ""]
    plot_metrics(cmp_sft, present, folders, run_dir / "report-metrics.png")
    doc = {"run": str(run_dir), "scale": scale, "runs": present, "scenes": n_scenes, "machine": machine_base(),
           "gemm_gflops": round(gflops, 1), "timings": rows, "total_seconds": round(total, 1),
           "table": {r: {f"{s}:{k}": _metric(cmp_sft["metrics"][folders[r]], s, k) for s, k, _ in COLUMNS}
                     for r in present},
           "vs_sft": {r: {f"{s}:{k}": cmp_sft["diffs"].get(folders[r], {}).get(s, {}).get(k) for s, k, _ in COLUMNS}
                      for r in present if r != "sft"},
           "vs_sft_continued": ({r: {f"{s}:{k}": cmp_cont["diffs"].get(folders[r], {}).get(s, {}).get(k)
                                     for s, k, _ in COLUMNS} for r in present if r not in ("sft", "sft-continued")}
                                if cmp_cont else {}),
           "refine": refine_cmp["diffs"] if refine_cmp else None,
           **({"refine_missing": refine_missing} if refine_missing else {})}
    return "\n".join(lines) + "\n", doc


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _reward_model_lines(run_dir: Path) -> list[str]:
    out = []
    for name, path in (("critique reward model", run_dir / "rm" / "scored" / "val" / "report.json"),
                       ("scalar Bradley-Terry reward model", run_dir / "rm" / "scalar" / "scored-val" / "report.json")):
        if not path.exists():
            continue
        rep = json.loads(path.read_text())
        acc = rep.get("ranking", {}).get("accuracy")  # [value, low, high]
        if acc:
            v = {"value": acc[0], "low": acc[1], "high": acc[2]}
            out.append(f"- {name}: ranking accuracy on {rep['ranking'].get('pairs', '?')} held-out pairs {pct(v)}")
    fg = sorted((run_dir / "fg-rm").glob("*/eval/metrics.json"))
    for path in fg:
        m = json.loads(path.read_text())
        parts = [f"{t} F1 {pct(v.get('f1'))}" for t, v in m.get("types", {}).items()]
        if parts:
            out.append(f"- fine-grained reward models ({path.parent.parent.name} labels), 'hallucinated' per "
                       f"segment vs the oracle: " + "; ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    from mmalign.stage import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m data_pipelines.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the run folder (runs/<RUN>)")
    ap.add_argument("--runs", nargs="+", default=["sft", "sft-continued", "mmdpo", "realign", "fgaif", "dress"],
                    help="methods in table order; the first is sft, the second sft-continued")
    ap.add_argument("--ablations", nargs="*", default=[], help="added when evaluated")
    ap.add_argument("--refine", nargs="*", default=["sft", "sft-continued", "dress"],
                    help="refinement-benchmark runs (sft first)")
    ap.add_argument("--scale", default="quick", help="the Makefile's SCALE, printed in the report")
    ap.add_argument("--refine-compare", type=Path,
                    help="the refinement benchmark's comparison of the --refine runs, a folder holding compare.json "
                         "(python -m data_pipelines.refine_bench compare; default <run>/refine/compare)")
    ap.add_argument("--n-boot", type=int, default=1000,
                    help="bootstrap resamples of the method table (the refinement comparison keeps those it was "
                         "made with)")
    args = ap.parse_args(argv)
    try:
        md, doc = build(args.run, args.runs, args.ablations, args.refine, args.scale, n_boot=args.n_boot,
                        refine_compare=args.refine_compare)
    except (ValueError, FileNotFoundError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    # The PNGs are written in place above; the Markdown and JSON last, each atomically, so a
    # report.md on disk always belongs to a finished report (it is the Makefile's marker).
    atomic_write_text(args.run / "report.json", json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(args.run / "report.md", md)
    print(f"-> {args.run}/report.md, report.json, report-metrics.png, report-training.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
