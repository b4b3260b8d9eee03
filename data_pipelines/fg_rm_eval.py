"""The ``fg-rm-eval`` stage: how well FGAIF's fine-grained reward models find hallucinated segments.

    python -m data_pipelines.fg_rm_eval \\
        --models object=runs/demo/fg-rm/object/model attribute=runs/demo/fg-rm/attribute/model \\
                 relation=runs/demo/fg-rm/relation/model \\
        --feedback runs/demo/feedback-val/oracle --data-root runs/demo/data --out runs/demo/fg-rm/eval

``--models``: ``TYPE=DIR`` per hallucination type (object, attribute, relation); one shared model
may be named for several types (``object=M attribute=M relation=M``, loaded and run once), and a
bare ``DIR`` stands for every type that model was trained for. ``--feedback``: held-out responses
with per-segment labels (the feedback stage's folder or its ``feedback.jsonl``; labelled by the
oracle, they are the ground truth), cut with the segmentation the models were trained on (their
export's ``segmentation``, :mod:`mmalign.segments`; the feedback records' ``annotations.segmentation``
must match it, or the stage stops before loading a model). Every response is scored (``FGRewardModel.segment_probs``,
the same row encoding as training) and each segment's prediction is the most probable class.

Output (atomic, with ``manifest.json``; skipped when up to date, ``--force`` redoes it):

* ``metrics.json`` / ``report.md``: per type, over all labelled segments with "hallucinated" as
  the positive class (a "hallucinated" prediction on an "n/a" or "correct" segment is a false
  positive: PPO would get a -1 there): precision, recall, F1 and accuracy with 95% bootstrap
  intervals that resample *responses* (the segments of one response are not independent;
  ``mmalign.metrics.bootstrap_ratio_ci``); the support of each class; the 3 x 3 confusion matrix
  (rows = label, columns = prediction); and two priors a useful model must beat: "always
  hallucinated" (precision = the base rate, recall 1) and "base rate" (say hallucinated at
  random with the base-rate probability: expected precision = recall = F1 = the base rate), plus
  the paired bootstrap interval of F1 minus the always-hallucinated F1.
* ``segments.jsonl``: per response, per type, the labels, predictions and probabilities.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
)

STAGE = "fg-rm-eval"


def _ci(v: tuple[float, float, float]) -> dict[str, float | None]:
    def clean(x: float) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    return {"value": clean(v[0]), "low": clean(v[1]), "high": clean(v[2])}


def type_metrics(labels: Sequence[Sequence[int]], preds: Sequence[Sequence[int]], n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Detection metrics of "hallucinated" (class 0 of :data:`mmalign.rewards.CLASSES`)
    for one type.

    ``labels[i]`` / ``preds[i]``: the class indices of response ``i``'s segments. Per response
    ``tp`` (label and prediction hallucinated), ``fp`` (prediction only), ``fn`` (label only);
    precision = sum tp / sum (tp + fp), recall = sum tp / sum (tp + fn), F1 = 2 tp / (2 tp + fp +
    fn), accuracy = right / segments, each with a percentile bootstrap interval over responses.
    Undefined ratios (0/0) are None.
    """
    from mmalign.metrics import bootstrap_ratio_ci, paired_bootstrap_ratio_diff
    from mmalign.rewards import CLASSES

    if len(labels) != len(preds):
        raise ValueError(f"{len(preds)} prediction lists for {len(labels)} label lists")
    k = len(CLASSES)
    conf = np.zeros((k, k), dtype=np.int64)
    tp, fp, fn, right, n, hal = (np.zeros(len(labels)) for _ in range(6))
    for i, (y, p) in enumerate(zip(labels, preds)):
        if len(y) != len(p):
            raise ValueError(f"response {i}: {len(p)} predictions for {len(y)} segments")
        for a, b in zip(y, p):
            conf[a, b] += 1
            tp[i] += a == 0 and b == 0
            fp[i] += a != 0 and b == 0
            fn[i] += a == 0 and b != 0
            right[i] += a == b
            hal[i] += a == 0
        n[i] = len(y)
    out: dict[str, Any] = {
        "responses": len(labels), "segments": int(n.sum()),
        "support": {c: int(conf[j].sum()) for j, c in enumerate(CLASSES)},
        "predicted": {c: int(conf[:, j].sum()) for j, c in enumerate(CLASSES)},
        "confusion": {"rows": "label", "columns": "prediction", "classes": list(CLASSES), "counts": conf.tolist()},
        "tp": int(tp.sum()), "fp": int(fp.sum()), "fn": int(fn.sum()),
    }
    if not len(labels) or not n.sum():
        return out
    kw = {"n_boot": n_boot, "seed": seed}
    out["precision"] = _ci(bootstrap_ratio_ci(tp, tp + fp, **kw))
    out["recall"] = _ci(bootstrap_ratio_ci(tp, tp + fn, **kw))
    out["f1"] = _ci(bootstrap_ratio_ci(2 * tp, 2 * tp + fp + fn, **kw))
    out["accuracy"] = _ci(bootstrap_ratio_ci(right, n, **kw))
    base = float(hal.sum() / n.sum())
    # always "hallucinated": tp = hal, fp = n - hal, fn = 0 -> F1 = 2 hal / (hal + n)
    always = {"precision": base, "recall": 1.0 if hal.sum() else None,
              "f1": _ci(bootstrap_ratio_ci(2 * hal, hal + n, **kw))}
    out["baselines"] = {
        "base_rate": base,
        "always_hallucinated": always,
        "random_at_base_rate": {"precision": base, "recall": base, "f1": base},
        "majority_class_accuracy": float(conf.sum(axis=1).max() / n.sum()),
    }
    out["f1_minus_always_hallucinated"] = _ci(paired_bootstrap_ratio_diff(2 * tp, 2 * tp + fp + fn, 2 * hal, hal + n,
                                                                          **kw))
    return out


def _pct(v: dict | None) -> str:
    if not v or v.get("value") is None:
        return "n/a"
    if v.get("low") is None:
        return f"{v['value']:.1%}"
    return f"{v['value']:.1%} [{v['low']:.1%}, {v['high']:.1%}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def table(metrics: dict[str, Any]) -> str:
    """The summary table (markdown) of ``metrics["types"]``."""
    lines = [("| type | segments | hallucinated / correct / n/a | precision | recall | F1 | accuracy | "
             "F1 always-hallucinated | F1 base rate | F1 - always-hallucinated |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t, m in metrics["types"].items():
        s = m["support"]
        b = m.get("baselines", {})
        lines.append(f"| {t} | {m['segments']} | {s['hallucinated']} / {s['correct']} / {s['n/a']} | "
                     f"{_pct(m.get('precision'))} | {_pct(m.get('recall'))} | {_pct(m.get('f1'))} | "
                     f"{_pct(m.get('accuracy'))} | {_pct(b.get('always_hallucinated', {}).get('f1'))} | "
                     f"{_num(b.get('random_at_base_rate', {}).get('f1'))} | "
                     f"{_pct(m.get('f1_minus_always_hallucinated'))} |")
    return "\n".join(lines)


def report_md(metrics: dict[str, Any]) -> str:
    from mmalign.rewards import CLASSES

    lines = ["# Fine-grained reward models on held-out responses", "",
             (f"{metrics['responses']} responses from `{metrics['feedback']}` (labels by "
             f"`{', '.join(metrics['label_sources'])}`; segmentation `{metrics.get('segmentation', 'fine')}`, "
             f"{metrics.get('segments_per_response', float('nan')):.2f} segments per response). "
             "\"hallucinated\" is the positive class over all labelled "
             "segments; 95% bootstrap intervals over responses "
             f"({metrics['n_boot']} resamples). A model is useful where its F1 beats the priors: "
             "\"always hallucinated\" and the base rate (random at the prior)."), "",
             table(metrics), "", "Models:", ""]
    for t, d in metrics["models"].items():
        lines.append(f"- {t}: `{d}`")
    for t, m in metrics["types"].items():
        c = m["confusion"]["counts"]
        lines += ["", f"## {t}: confusion (rows = label, columns = prediction)", "",
                  "| label \\ prediction | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
        lines += [f"| {CLASSES[j]} | " + " | ".join(str(x) for x in row) + " |" for j, row in enumerate(c)]
    return "\n".join(lines) + "\n"


def parse_models(specs: Sequence[str]) -> dict[str, Path | None]:
    """``TYPE=DIR`` entries -> type -> folder; a bare ``DIR`` maps to None under its own key
    (every type of that model, resolved once it is loaded)."""
    from mmalign.feedback import HALLUCINATION_TYPES

    out: dict[str, Any] = {}
    for s in specs:
        t, sep, d = s.partition("=")
        if not sep:
            out[f"*{s}"] = Path(s)
            continue
        if t not in HALLUCINATION_TYPES:
            raise ValueError(f"--models {s!r}: unknown type {t!r}; expected one of {list(HALLUCINATION_TYPES)}")
        if t in out:
            raise ValueError(f"--models names {t!r} twice")
        out[t] = Path(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, metavar="TYPE=DIR",
                    help="a fine-grained reward model export per type (object=DIR attribute=DIR relation=DIR); one "
                         "shared model may serve several types; a bare DIR = every type that model scores")
    ap.add_argument("--feedback", required=True, type=Path,
                    help="held-out feedback (the feedback stage's folder or its feedback.jsonl), e.g. the oracle's "
                         "labels of val-split samples")
    ap.add_argument("--data-root", required=True, type=Path, help="folder the records' image paths are relative to")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--batch-size", type=int, default=32, help="responses per forward")
    ap.add_argument("--limit", type=int, default=0, help="score at most this many responses (0 = all)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.n_boot < 1 or args.limit < 0:
        ap.error("need --batch-size >= 1, --n-boot >= 1 and --limit >= 0")
    try:
        spec = parse_models(args.models)
    except ValueError as e:
        ap.error(str(e))
    from mmalign.rewards.fine_grained import CONFIG_FILE, HEAD_FILE
    from mmalign.segments import recorded_segmentation

    segmentations: dict[str, str] = {}
    for d in spec.values():
        if not (d / CONFIG_FILE).is_file():
            ap.error(f"--models {d}: no {CONFIG_FILE} there (an FGRewardModule export.dir?)")
        try:
            segmentations[str(d)] = recorded_segmentation(json.loads((d / CONFIG_FILE).read_text()))
        except ValueError as e:  # bad JSON or an unknown segmentation
            ap.error(f"--models {d}: {d / CONFIG_FILE}: {e}")
    if len(set(segmentations.values())) != 1:
        ap.error(f"--models were trained on different segmentations {segmentations}: evaluate models of one "
                 "segmentation together")
    segmentation = next(iter(segmentations.values()))
    feedback = args.feedback / "feedback.jsonl" if args.feedback.is_dir() else args.feedback
    if not feedback.is_file():
        ap.error(f"--feedback {args.feedback}: no feedback.jsonl")
    dirs = sorted({str(d) for d in spec.values()})
    config = {"models": {k: str(v) for k, v in spec.items()}, "limit": args.limit, "n_boot": args.n_boot,
              "seed": args.seed, "segmentation": segmentation}
    inputs: list[Path] = [feedback]
    if (args.data_root / "manifest.json").is_file():
        inputs.append(args.data_root)  # a data stage output: its manifest changes when the images do
    for d in map(Path, dirs):
        inputs += [d / CONFIG_FILE, d / HEAD_FILE, *sorted(d.glob("*.safetensors"))]
    inputs = list(dict.fromkeys(inputs))
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    import torch

    from mmalign.feedback import HALLUCINATION_TYPES
    from mmalign.records import read_records, where
    from mmalign.rewards import CLASSES, SegmentItem
    from mmalign.rewards.fine_grained import (
        check_fg_record,
        fg_segment_probs,
        load_fg_reward_model,
    )

    # The input is checked before any model loads: a bad line fails in seconds, naming file:line.
    recs = read_records(feedback, "annotated", data_root=args.data_root, check_images="exists")
    if args.limit:
        recs = recs[: args.limit]
    if not recs:
        ap.error(f"{feedback}: no annotated responses")
    from mmalign.segments import check_same_segmentation

    for r in recs:  # before any model loads; the strict per-record check is check_fg_record below
        try:
            check_same_segmentation(segmentation, recorded_segmentation(r.annotations),
                                    f"{where(r.meta, r.id)}: the held-out labels")
        except ValueError as e:
            ap.error(f"{e}; the models ({', '.join(dirs)}) were trained on {segmentation!r} segments: label the "
                     f"held-out responses with the feedback stage's --segmentation {segmentation}")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = {d: load_fg_reward_model(d, device=device) for d in dirs}
    models = {}
    for key, d in spec.items():
        m = loaded[str(d)]
        for t in (m.types if key.startswith("*") else [key]):
            if t not in m.types:
                ap.error(f"--models {key}={d}: that model scores {m.types}, not {t}")
            if t in models and models[t] is not m:
                ap.error(f"--models gives two models for {t}")
            models[t] = m
    types = [t for t in HALLUCINATION_TYPES if t in models]
    model_dirs = {t: str(next(d for d in dirs if loaded[d] is models[t])) for t in types}

    gold = [check_fg_record(r, types, segmentation)[1] for r in recs]                     # per response (S, K)
    items = [SegmentItem(images=r.images, prompt=r.prompt, response=r.response, id=where(r.meta, r.id))
             for r in recs]
    probs = fg_segment_probs(models, items, batch_size=args.batch_size, progress=not args.no_progress)

    metrics: dict[str, Any] = {"feedback": str(feedback), "responses": len(recs), "models": model_dirs,
                               "segmentation": segmentation,
                               "segments_per_response": sum(map(len, gold)) / len(gold),
                               "label_sources": sorted({str(r.annotations.get("source", "unknown")) for r in recs}),
                               "classes": list(CLASSES), "n_boot": args.n_boot, "seed": args.seed, "types": {}}
    rows = [{"id": r.id, "response": r.response, "segments": [s["text"] for s in r.annotations["segments"]]}
            for r in recs]
    for k, t in enumerate(types):
        labels = [[row[k] for row in g] for g in gold]
        preds = [p[t].argmax(-1).tolist() for p in probs]
        for i, row in enumerate(rows):
            if len(preds[i]) != len(labels[i]):
                raise RuntimeError(f"{items[i].id}: {len(preds[i])} scored segments for {len(labels[i])} labelled")
            row[t] = {"labels": [CLASSES[c] for c in labels[i]], "predictions": [CLASSES[c] for c in preds[i]],
                      "probs": [[round(x, 5) for x in p] for p in probs[i][t].tolist()]}
        metrics["types"][t] = type_metrics(labels, preds, n_boot=args.n_boot, seed=args.seed)
    md = report_md(metrics)
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        atomic_write_text(st.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(st.path / "report.md", md)
        atomic_write_jsonl(st.path / "segments.jsonl", rows)
        st.count("responses", len(recs))
        for t in types:
            st.count(f"segments/{t}", metrics["types"][t]["segments"])
    print(table(metrics))
    print(f"-> {args.out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
