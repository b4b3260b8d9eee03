"""``mmalign eval``: hallucination evaluation of a checkpoint, and comparisons of several.

    # the synthetic world's held-out split: captions (CHAIR, AMBER-style per type) + POPE-style splits
    mmalign eval --model runs/demo/sft/model --data runs/demo/data --out runs/demo/eval/sft

    # real published formats, with an image folder
    mmalign eval --model PATH --images val2014/ --pope coco_pope_random.json coco_pope_adversarial.json \\
        --coco-instances instances_val2014.json --limit 500 --out runs/llava/eval
    mmalign eval --model PATH --images AMBER/image --amber-queries query_all.json \\
        --amber-annotations annotations.json --out runs/llava/eval-amber

    # a DRESS model is asked with the best condition saved beside it (dress_condition.json: the
    # good-feedback text of a feedback-conditioned model, the best level of a rating-conditioned
    # one); --condition TEXT asks with another, --no-condition with none
    mmalign eval --model runs/demo/dress/model --data runs/demo/data --out runs/demo/eval/dress

    # on N ranks (processes or GPUs): batch b runs on rank b % N, rank 0 merges and writes; the
    # output is the same as on one rank (mmalign.shard); without torchrun: --shard I/N per process
    python -m torch.distributed.run --nproc_per_node 2 -m mmalign.cli eval --model ... --out ...

    # side by side: the first run is the baseline; later runs get paired differences
    mmalign eval compare runs/demo/eval/sft runs/demo/eval/mmdpo --out runs/demo/eval/compare

Outputs (atomic, with manifest.json): metrics.json (every rate with its 95% bootstrap
interval, settings, throughput), report.md, generations.jsonl (every prompt, answer and score
columns, for inspection) and chart.png. Metric definitions: docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.conditions import CONDITION_FILE
from mmalign.eval.pope import STRATEGIES
from mmalign.eval.runner import DEFAULT_JUDGE, DEFAULT_POLICY
from mmalign.eval.world_bench import CAPTION_PROMPT


def _run_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmalign eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", required=True, help="checkpoint folder (Hugging Face format), loaded by --policy-class")
    m.add_argument("--policy-class", default=DEFAULT_POLICY,
                   help=f"Policy implementation to load --model with (default: {DEFAULT_POLICY})")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--device", default="auto",
                   help="where the model runs: auto (this rank's GPU when CUDA is there, else cpu), cpu, cuda, cuda:1 ...")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own Python code (off by default: it runs arbitrary code)")
    b = ap.add_argument_group("benchmark (the synthetic world, or any of the published formats)")
    b.add_argument("--data", type=Path, help="the data stage's folder (synthetic world; uses <data>/<split>/scenes.jsonl)")
    b.add_argument("--split", default="test", help="world split to evaluate (default: test, held out)")
    b.add_argument("--kinds", nargs="+", default=["existence", "attribute", "relation"],
                   choices=["existence", "attribute", "relation"], help="world yes/no question kinds")
    b.add_argument("--splits", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                   help="POPE negative-sampling splits for the world's questions")
    b.add_argument("--images", type=Path, help="image folder for the published formats (paths must stay inside it)")
    b.add_argument("--pope", type=Path, nargs="+", default=[], help="POPE question files (JSON lines)")
    b.add_argument("--coco-instances", type=Path, help="COCO instances_*.json: caption its images, score CHAIR")
    b.add_argument("--amber-queries", type=Path, help="AMBER query JSON (query_all.json, ...)")
    b.add_argument("--amber-annotations", type=Path, help="AMBER annotations.json")
    b.add_argument("--limit", type=int, default=0, help="use only the first N scenes / COCO images / AMBER queries (0 = all)")
    g = ap.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=32, help="caption prompts per generate() call")
    g.add_argument("--yesno-batch-size", type=int, default=128,
                   help="yes/no prompts per generate() call (short answers: bigger batches amortise the per-step cost)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="caption length cap in tokens")
    g.add_argument("--yesno-max-new-tokens", type=int, default=8, help="yes/no answer length cap in tokens")
    g.add_argument("--prompt", default=CAPTION_PROMPT, help=f"caption prompt (default: {CAPTION_PROMPT!r})")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--condition", metavar="TEXT",
                   help="DRESS condition put before the first user text of the prompts of --condition-kinds "
                        f"(default: the best condition of the model folder's {CONDITION_FILE} when it has one -- its "
                        "good-feedback text, or its best rating level -- else none)")
    c.add_argument("--no-condition", action="store_true",
                   help=f"ask without a condition even when the model folder has {CONDITION_FILE}")
    g.add_argument("--condition-kinds", default="caption", type=_condition_kinds, metavar="KINDS",
                   help="which prompts carry the condition: caption, yesno or caption,yesno (default: caption -- "
                        "DRESS's feedback is written on captions, so its models learn the condition only before "
                        "captions; put before a yes/no question it is text they never saw, and the demo's DRESS "
                        "models then answer no to every POPE question)")
    j = ap.add_argument_group("optional judge (MMHal-Bench style: a model rates each caption 0-6 against the reference)")
    j.add_argument("--judge", help="judge checkpoint folder (any Hugging Face model)")
    j.add_argument("--judge-class", default=DEFAULT_JUDGE, help=f"feedback source class (default: {DEFAULT_JUDGE})")
    o = ap.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="output folder")
    o.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval")
    o.add_argument("--seed", type=int, default=0, help="question sampling and bootstrap seed")
    o.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    from mmalign.shard import add_shard_args

    add_shard_args(ap)
    return ap


def run_main(argv: list[str]) -> int:
    import torch

    from mmalign.components import load_component
    from mmalign.eval import runner as R
    from mmalign.eval.report import fmt
    from mmalign.stage import is_up_to_date

    ap = _run_parser()
    args = ap.parse_args(argv)
    real = args.pope or args.coco_instances or args.amber_queries or args.amber_annotations
    if not args.data and not real:
        ap.error("name a benchmark: --data (synthetic world) and/or --pope / --coco-instances / --amber-*")
    if real and not args.images:
        ap.error("--images is required with --pope / --coco-instances / --amber-*")
    if bool(args.amber_queries) != bool(args.amber_annotations):
        ap.error("--amber-queries and --amber-annotations go together")
    model = Path(args.model)
    if not model.exists():
        ap.error(f"--model {model}: no such folder")

    try:
        condition, condition_source = resolve_condition(model, args.condition, args.no_condition)
    except ValueError as e:
        ap.error(str(e))

    benches = []
    if args.data:
        benches.append(R.world_benchmark(args.data, args.split, args.limit, args.seed, args.kinds, args.splits,
                                         prompt=args.prompt))
    if args.pope:
        benches.append(R.pope_benchmark(args.pope, args.images))
    if args.coco_instances:
        benches.append(R.coco_chair_benchmark(args.coco_instances, args.images, args.limit, args.prompt))
    if args.amber_queries:
        benches.append(R.amber_benchmark(args.amber_queries, args.amber_annotations, args.images, args.limit))
    bench = benches[0]
    for other in benches[1:]:
        bench = bench + other

    settings = {
        "model": str(model), "policy_class": args.policy_class, "dtype": args.dtype, "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens, "yesno_max_new_tokens": args.yesno_max_new_tokens,
        "batch_size": args.batch_size, "yesno_batch_size": args.yesno_batch_size, "prompt": args.prompt,
        "n_boot": args.n_boot, "seed": args.seed,
        "benchmark": bench.name, "limit": args.limit, "split": args.split if args.data else None,
        "kinds": args.kinds, "splits": args.splits, "judge": args.judge,
    }
    # Recorded only when a condition is used or a model's own is turned off, so outputs made before
    # conditions existed stay up to date.
    if condition or condition_source:
        settings.update(condition=condition, condition_source=condition_source)
    if condition:
        settings.update(condition_kinds=args.condition_kinds)
    inputs = [p for p in (args.data, args.coco_instances, args.amber_queries, args.amber_annotations, *args.pope) if p]
    inputs += [model / "config.json", *sorted(model.glob("*.safetensors"))]
    inputs = [p for p in inputs if Path(p).exists()]
    if not args.force and is_up_to_date(args.out, settings, inputs):
        print(f"{args.out}: up to date, skipping (--force to redo)")
        return 0
    from mmalign.shard import setup as shard_setup

    shard = shard_setup(args)
    try:
        parts = shard.parts(args.out, "eval", settings, inputs)
        torch.manual_seed(args.seed)
        if shard.is_main:
            print(f"{bench.name}: {len(bench.items)} items in {len(bench.metric_sets)} sections; loading {model}"
                  + (f" on {shard.world} ranks" if shard.world > 1 else ""), file=sys.stderr)
        policy = load_component(args.policy_class, path=str(model), dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code).eval().to(shard.device(args.device))
        judge = None
        if args.judge:
            judge = load_component(args.judge_class, path=args.judge, trust_remote_code=args.trust_remote_code)
        doc = R.evaluate(policy, bench, args.out, settings, inputs=inputs, judge=judge, n_boot=args.n_boot,
                         progress=not args.no_progress, parts=parts)
    finally:
        shard.close()
    if doc is None:  # not rank 0: its parts are written, rank 0 merges
        print(f"mmalign eval: {shard}: done, rank 0 writes {args.out}", file=sys.stderr)
        return 0
    print(_summary_lines(doc, fmt))
    print(f"-> {args.out}/report.md, metrics.json, generations.jsonl, chart.png")
    return 0


def _condition_kinds(text: str) -> list[str]:
    """``--condition-kinds``: a comma-separated subset of caption, yesno (argparse type)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("caption", "yesno")]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give caption, yesno or caption,yesno")
    return list(dict.fromkeys(kinds))


def resolve_condition(model: Path, condition: str | None, no_condition: bool) -> tuple[str, str]:
    """(condition text, where it came from) for a model: ``--condition`` when given, nothing with
    ``--no-condition``, else the best condition of the scheme saved beside the model
    (:func:`mmalign.conditions.load_scheme`; ``best()``: a feedback scheme's good-feedback text in
    its template, a rating scheme's best level), else nothing -- as for a DRESS model trained with
    ``condition: none`` (the unconditioned ablation), which is exported without a scheme. The
    source is "" when there is no condition to speak of (no flag, no scheme). A malformed scheme
    file is a ValueError."""
    from mmalign.conditions import load_scheme

    if condition is not None and no_condition:
        raise ValueError("--condition and --no-condition exclude each other")
    if condition is not None:  # an explicit empty text asks without a condition
        return (condition, "--condition") if condition.strip() else ("", "--condition ''")
    scheme = load_scheme(model)
    if no_condition:
        return "", f"--no-condition: {CONDITION_FILE} ignored" if scheme is not None else ""
    if scheme is not None:
        return scheme.best(), f"{model / CONDITION_FILE}"
    return "", ""


def _summary_lines(doc: dict, fmt) -> str:
    """The headline numbers, printed at the end of a run."""
    out = [f"{doc['model']} ({doc['benchmark']}), 95% bootstrap intervals:"]
    if doc["settings"].get("condition"):
        out.append(f"  condition: {doc['settings']['condition']!r}")
    for section, sec in doc["sections"].items():
        m = sec["metrics"]
        if sec["metric_set"].endswith("caption"):
            keys = [k for k in ("chair_i", "chair_s", "object_cover", "attribute_error_rate", "relation_error_rate",
                                "hal_any", "judge_score") if k in m]
            out.append(f"  {section} (n={sec['n']}): " + "; ".join(
                f"{k} {fmt(m[k], k != 'judge_score')}" for k in keys))
        else:
            out.append(f"  {section:22s} (n={sec['n']}): F1 {fmt(m.get('f1'))}  acc {fmt(m.get('accuracy'))}  "
                       f"yes {fmt(m.get('yes_ratio'))}  unparsed {m.get('unparsed_rate', {}).get('value', 0):.1%}")
    for kind, t in doc["throughput"].items():
        out.append(f"  throughput {kind}: {t['per_second']} prompts/s ({t['prompts']} in {t['seconds']} s)")
    return "\n".join(out)


def compare_main(argv: list[str]) -> int:
    from mmalign.eval.report import compare_markdown, plot_compare
    from mmalign.eval.runner import compare_runs
    from mmalign.stage import atomic_write_text

    ap = argparse.ArgumentParser(prog="mmalign eval compare",
                                 description="Side-by-side table and chart of several `mmalign eval` runs; the first "
                                             "is the baseline and every other run gets its paired difference from it "
                                             "(same items, 95% paired bootstrap interval).")
    ap.add_argument("runs", nargs="+", type=Path, help="output folders of `mmalign eval` (baseline first)")
    ap.add_argument("--names", nargs="+", help="short names for the runs (default: folder names)")
    ap.add_argument("--out", type=Path, help="write compare.md, compare.json and compare.png here")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    names = args.names or [r.name for r in args.runs]
    if len(names) != len(args.runs):
        ap.error(f"{len(names)} names for {len(args.runs)} runs")
    try:
        cmp = compare_runs(args.runs, n_boot=args.n_boot)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmalign eval compare: {e}", file=sys.stderr)
        return 2
    md = compare_markdown(cmp, names)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "compare.md", md)
        atomic_write_text(args.out / "compare.json", json.dumps(cmp, indent=2, default=str) + "\n")
        plot_compare(cmp, names, args.out / "compare.png")
        print(f"-> {args.out}/compare.md, compare.json, compare.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mmalign.records import RecordError
    from mmalign.shard import ShardError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    try:
        return run_main(argv)
    except (RecordError, FileNotFoundError, ShardError) as e:
        # Bad input files, or a failed rank: one clear line naming the file and record (the rank
        # and its part), no traceback.
        print(f"mmalign eval: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
