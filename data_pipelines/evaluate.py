"""Stage ``eval-sft``: a policy's held-out captions checked against the scene graphs.

    python -m data_pipelines.evaluate --model runs/demo/sft/model --data runs/demo/data \
        --split test --out runs/demo/eval/sft

For every held-out scene the policy writes a detailed caption (greedy decoding); each caption is
parsed with the world's caption grammar (``mmalign.world.parse_caption``) and checked against the
scene graph. It also answers the held-out yes/no questions. Reported:

* ``exact_caption_rate``: captions equal to the reference caption (case and spaces ignored);
* ``object_hallucination_rate``: object mentions naming no object of the scene / all mentions;
  ``distinct_hallucination_rate`` counts each object name once per caption (CHAIR_i-like);
* ``faithful_rate``: captions with no hallucinated object, no attribute and no relation error;
* ``yesno_accuracy``: existence/attribute/relation questions answered correctly (unparseable
  answers count as wrong and are counted separately).

Outputs (atomically, with a manifest): ``metrics.json`` and ``generations.jsonl`` (every prompt,
reference and generation, for inspection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmalign.collators import VisionChatCollator
from mmalign.data import ChatDataset
from mmalign.records import read_records
from mmalign.stage import StageOutput, atomic_write_jsonl, is_up_to_date
from mmalign.world import YESNO_TASKS, Scene, aggregate_checks, check_caption, parse_caption, parse_yes_no


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def generate_all(policy, records, batch_size: int, max_new_tokens: int, label: str) -> list[str]:
    """Greedy generations for ``records`` in order, batched, with a progress line."""
    collator = VisionChatCollator(policy.processor, max_length=4096, mode="generate", on_overlength="error")
    loader = DataLoader(ChatDataset(records), batch_size=batch_size, shuffle=False, collate_fn=collator)
    out: list[str] = []
    t0 = time.time()
    for i, batch in enumerate(loader, 1):
        out += policy.generate(batch, max_new_tokens=max_new_tokens)
        print(f"\r{label}: {len(out)}/{len(records)} ({len(out) / (time.time() - t0):.1f}/s)",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def evaluate(policy, data: Path, split: str, batch_size: int, max_new_tokens: int, limit: int) -> tuple[dict, list]:
    recs = read_records(data / split / "sft.jsonl", "sft", data_root=data)
    scenes = {}
    for line in (data / split / "scenes.jsonl").read_text().splitlines():
        d = json.loads(line)
        scenes[d["scene_id"]] = Scene.from_dict(d)
    captions = [r for r in recs if r.meta.get("task") == "detailed_caption"]
    yesno = [r for r in recs if r.meta.get("task") in YESNO_TASKS]
    if limit:
        captions, yesno = captions[:limit], yesno[:limit]

    gens = generate_all(policy, captions, batch_size, max_new_tokens, "captions")
    checks, rows = [], []
    for r, g in zip(captions, gens):
        check = check_caption(parse_caption(g), scenes[r.meta["scene_id"]])
        checks.append(check)
        rows.append({"id": r.id, "task": "detailed_caption", "reference": r.meta["answer"], "generation": g,
                     "exact": _norm(g) == _norm(r.meta["answer"]), **check.counts()})
    metrics = aggregate_checks(checks)
    metrics["exact_caption_rate"] = sum(row["exact"] for row in rows) / max(1, len(rows))

    answers = generate_all(policy, yesno, batch_size, 8, "yes/no")
    correct = unparsed = 0
    for r, a in zip(yesno, answers):
        pred = parse_yes_no(a)
        unparsed += pred is None
        ok = pred is not None and pred == r.meta["label"]
        correct += ok
        rows.append({"id": r.id, "task": r.meta["task"], "reference": r.meta["answer"], "generation": a, "correct": ok})
    metrics.update(yesno_questions=len(yesno), yesno_accuracy=correct / max(1, len(yesno)), yesno_unparsed=unparsed)
    return metrics, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="policy checkpoint folder (Hugging Face format)")
    ap.add_argument("--data", required=True, type=Path, help="the data stage's folder (scenes + records)")
    ap.add_argument("--split", default="test", help="held-out split to evaluate (default: test)")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="caption length cap in tokens")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many of each kind (0 = all)")
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    args = ap.parse_args(argv)

    from models.policy import HFPolicy

    model = Path(args.model)
    config = {"split": args.split, "max_new_tokens": args.max_new_tokens, "limit": args.limit, "decoding": "greedy"}
    inputs = [args.data, model / "config.json", *sorted(model.glob("*.safetensors"))]
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{args.out}: up to date, skipping (--force to redo)")
        return 0
    torch.manual_seed(0)
    policy = HFPolicy(str(model)).eval()
    with StageOutput(args.out, stage="eval", config=config, inputs=inputs) as st:
        metrics, rows = evaluate(policy, args.data, args.split, args.batch_size, args.max_new_tokens, args.limit)
        atomic_write_jsonl(st.path / "generations.jsonl", rows)
        (st.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        st.count("captions", int(metrics["captions"]))
        st.count("yesno_questions", metrics["yesno_questions"])
    print(f"{model} on {args.split} ({int(metrics['captions'])} held-out scenes):")
    print(f"  exact-caption rate        {metrics['exact_caption_rate']:.1%}")
    print(f"  object hallucination rate {metrics['object_hallucination_rate']:.1%} of object mentions "
          f"({metrics['distinct_hallucination_rate']:.1%} distinct, CHAIR_i-like)")
    print(f"  faithful captions         {metrics['faithful_rate']:.1%}")
    print(f"  yes/no accuracy           {metrics['yesno_accuracy']:.1%} ({metrics['yesno_unparsed']} unparsed)")
    print(f"  -> {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
