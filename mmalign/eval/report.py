"""Markdown tables and PNG charts for one evaluation or a comparison of several.

Numbers print as ``value [low, high]`` (the 95% bootstrap interval); a paired difference prints
as ``+d [low, high]`` and gets a ``*`` when its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmalign.eval import summary as S

YESNO_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed_rate")
TYPE_ROWS = (("object", "chair_i", "chair_s", "object_cover", "object_cog"),
             ("attribute", "attribute_error_rate", "attribute_hal", "attribute_cover", "attribute_cog"),
             ("relation", "relation_error_rate", "relation_hal", "relation_cover", "relation_cog"))


def _metric_defs() -> dict[str, S.Metric]:
    out = {m.key: m for ms in S.METRIC_SETS.values() for m in ms}
    out.update({m.key: m for m in S.JUDGE})
    return out


def _label(key: str, defs: Mapping[str, S.Metric]) -> str:
    """A metric's printed name; distinct-n is computed outside the ratio metrics."""
    return defs[key].label if key in defs else key.replace("_", "-")


def fmt(v: Mapping[str, float] | None, percent: bool = True, signed: bool = False) -> str:
    """``42.0% [38.1, 46.2]`` / ``+3.1 [-0.4, 6.5]*`` (points) / ``n/a``."""
    if not v or v.get("value") is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
        return "n/a"
    k = 100 if percent else 1
    val, lo, hi = v["value"] * k, v["low"] * k, v["high"] * k
    sign = "+" if signed else ""
    unit = "" if signed or not percent else "%"
    if math.isnan(lo):
        return f"{val:{sign}.1f}{unit}"
    star = "*" if signed and (lo > 0 or hi < 0) else ""
    return f"{val:{sign}.1f}{unit} [{lo:.1f}, {hi:.1f}]{star}"


def _yesno_sections(doc: Mapping[str, Any]) -> list[str]:
    return [s for s, v in doc["sections"].items() if v["metric_set"].startswith("yesno")]


def _caption_sections(doc: Mapping[str, Any]) -> list[str]:
    return [s for s, v in doc["sections"].items() if v["metric_set"].endswith("caption")]


def markdown_report(doc: Mapping[str, Any]) -> str:
    """The whole evaluation as Markdown: settings, generative metrics per type, yes/no splits."""
    defs = _metric_defs()
    st = doc["settings"]
    lines = [f"# Evaluation of `{doc.get('model')}`", "",
             f"{doc['date']} on {doc['machine']}. Benchmark: {doc['benchmark']}. Decoding: {st.get('decoding')}, "
             f"max {st.get('max_new_tokens')} new tokens for captions, {st.get('yesno_max_new_tokens')} for yes/no; "
             f"batch {st.get('batch_size')} (yes/no {st.get('yesno_batch_size')}). "
             f"Intervals: 95% bootstrap over items ({st.get('n_boot')} resamples).", ""]
    for kind, t in doc.get("throughput", {}).items():
        lines.append(f"- {kind}: {t['prompts']} prompts in {t['seconds']} s = {t['per_second']} /s")
    lines.append("")
    for section in _caption_sections(doc):
        sec = doc["sections"][section]
        m = sec["metrics"]
        lines += [f"## {section} ({sec['n']} responses)", ""]
        if sec["metric_set"] == "world_caption":
            lines += ["| type | error rate (CHAIR-style) | Hal | Cover | Cog |", "|---|---|---|---|---|"]
            for name, err, hal, cover, cog in TYPE_ROWS:
                if name == "object":
                    lines.append(f"| object (CHAIR_i / CHAIR_s) | {fmt(m.get(err))} | {fmt(m.get(hal))} | "
                                 f"{fmt(m.get(cover))} | {fmt(m.get(cog))} |")
                else:
                    lines.append(f"| {name} | {fmt(m.get(err))} | {fmt(m.get(hal))} | {fmt(m.get(cover))} | "
                                 f"{fmt(m.get(cog))} |")
            lines.append("")
        lines += ["| metric | value [95% CI] |", "|---|---|"]
        shown = {k for row in TYPE_ROWS for k in row[1:]} if sec["metric_set"] == "world_caption" else set()
        for key, v in m.items():
            if key in shown:
                continue
            d = defs.get(key)
            lines.append(f"| {_label(key, defs)} | {fmt(v, d.percent if d else True)} |")
        lines.append("")
    ys = _yesno_sections(doc)
    if ys:
        cols = list(YESNO_COLUMNS)
        if any("f1_no" in doc["sections"][s]["metrics"] for s in ys):
            cols.append("f1_no")  # AMBER's F1 takes "no" as the positive class
        lines += ["## yes/no questions (POPE-style; \"yes\" is the positive class)", "",
                  "| split | n | " + " | ".join(defs[c].label for c in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for section in ys:
            sec = doc["sections"][section]
            cells = [fmt(sec["metrics"].get(c)) if c in sec["metrics"] else "" for c in cols]
            lines.append(f"| {section} | {sec['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, labels: Sequence[str], series: Sequence[tuple[str, Sequence[Mapping[str, float] | None]]], title: str,
          percent: bool = True) -> None:
    """Grouped bars with error bars (one group per label, one bar per series)."""
    import numpy as np

    k = 100 if percent else 1
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series):
        ys, err = [], [[], []]
        for v in vals:
            ok = v and v.get("value") is not None and not math.isnan(v["value"])
            y = v["value"] * k if ok else 0.0
            lo = v["low"] * k if ok and not math.isnan(v["low"]) else y
            hi = v["high"] * k if ok and not math.isnan(v["high"]) else y
            ys.append(y)
            err[0].append(max(0.0, y - lo))
            err[1].append(max(0.0, hi - y))
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if percent:
        ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)


def plot_report(doc: Mapping[str, Any], path: Path) -> None:
    """One PNG: hallucination per type (captions) and F1 per yes/no split, with 95% intervals."""
    docs = {"": doc}
    _plot(docs, path, title=f"{doc.get('model')}")


def _plot(docs: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    plt = _plt()
    first = next(iter(docs.values()))
    caps = _caption_sections(first)
    ys = _yesno_sections(first)
    panels = len(caps) + (2 if ys else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(5.5 * max(1, panels), 4.2), squeeze=False)
    axes = axes[0]
    i = 0
    for section in caps:
        keys = ["chair_i", "chair_s", "attribute_error_rate", "relation_error_rate", "hal_any"]
        keys = [k for k in keys if k in first["sections"][section]["metrics"]] or ["chair_i", "chair_s"]
        series = [(name or "value", [d["sections"].get(section, {}).get("metrics", {}).get(k) for k in keys])
                  for name, d in docs.items()]
        _bars(axes[i], keys, series, f"{section}: hallucination (lower is better)")
        i += 1
    # Accuracy beside F1: a model that always says "yes" scores F1 66.7% but accuracy 50%.
    for key, label in (("accuracy", "accuracy"), ("f1", "F1")):
        if not ys:
            break
        series = [(name or label, [d["sections"].get(s, {}).get("metrics", {}).get(key) for s in ys])
                  for name, d in docs.items()]
        _bars(axes[i], ys, series, f"yes/no {label} per split (higher is better)")
        i += 1
    if len(docs) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_markdown(cmp: Mapping[str, Any], names: Sequence[str]) -> str:
    """Side-by-side table per shared section: the baseline's value, then each run's value and
    its paired difference from the baseline (percentage points)."""
    defs = _metric_defs()
    runs = cmp["runs"]
    lines = ["# Comparison", "", f"Baseline: `{runs[0]}` ({names[0]}). Differences are run minus baseline on the "
             "same items, in percentage points (plain units for non-rates), with a paired 95% bootstrap interval; "
             "`*` marks an interval that excludes 0.", ""]
    for section in cmp["sections"]:
        base = cmp["metrics"][runs[0]]["sections"][section]["metrics"]
        header = f"| {section} | {names[0]} | " + " | ".join(f"{n} | Δ vs {names[0]}" for n in names[1:]) + " |"
        lines += [f"## {section}", "", header, "|---|---|" + "---|---|" * (len(runs) - 1)]
        for key in base:
            d = defs.get(key)
            pct = d.percent if d else True
            cells = [fmt(base.get(key), pct)]
            for r in runs[1:]:
                cells.append(fmt(cmp["metrics"][r]["sections"][section]["metrics"].get(key), pct))
                cells.append(fmt(cmp["diffs"][r][section].get(key), pct, signed=True) if key in cmp["diffs"][r][section] else "")
            lines.append(f"| {_label(key, defs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_compare(cmp: Mapping[str, Any], names: Sequence[str], path: Path) -> None:
    docs = {n: cmp["metrics"][r] for n, r in zip(names, cmp["runs"])}
    _plot(docs, path, title="comparison (95% intervals)")
