"""The ``sample`` stage: K responses per prompt from a policy checkpoint.

    python -m data_pipelines.sample --model runs/demo/sft/model --data runs/demo/data \\
        --split train --tasks detailed_caption --limit 500 --k 4 --out runs/demo/sample

Every method after SFT learns from feedback on the policy's *own* responses; this stage makes
them. Prompts are the (image, question) pairs of the data stage's records (``--tasks`` picks
which; each pair once). Decoding: ``--k`` samples per prompt with temperature / top-p, batched
with the KV cache, seeded per batch (``seed + batch index``), so a run is reproducible for a
given batch size.

Output (atomic, with ``manifest.json``): ``responses.jsonl``, one annotated-response record per
sample (``mmalign.records.AnnotatedResponse``: ``id``, ``images`` relative to the data root,
``prompt``, ``response``, empty ``annotations``, plus ``generation`` settings, ``policy`` id,
``sample_index``, ``scene_id``, ``task`` and the data set's ``reference`` answer). A sample that
cannot be a record (empty after stripping) goes to ``rejects.jsonl`` with its reason and is
counted; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmalign.collators import VisionChatCollator, to_device
from mmalign.data import ChatDataset
from mmalign.records import read_records
from mmalign.stage import StageOutput, atomic_write_jsonl, checkpoint_id, is_up_to_date

STAGE = "sample"


def prompts_from(data: Path, split: str, tasks: list[str], limit: int) -> list:
    """The split's records of ``tasks``, one per distinct (image, question), in file order."""
    recs = read_records(data / split / "sft.jsonl", "sft", data_root=data)
    seen, out = set(), []
    for r in recs:
        if tasks and r.meta.get("task") not in tasks:
            continue
        key = (tuple(r.images), r.meta.get("question"))
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out[: limit or None]


def _prompt_only(r):
    """The record without its assistant turn: what the policy is asked."""
    user = [m for m in r.messages if m["role"] != "assistant"]
    return type(r)(id=r.id, images=r.images, messages=user, meta=r.meta)


def sample(policy, records: list, k: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
           seed: int, progress: bool = True) -> tuple[list[list[str]], float]:
    """``k`` samples per record (in record order) and the seconds it took."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    collator = VisionChatCollator(policy.processor, max_length=1 << 16, mode="generate", on_overlength="error")
    loader = DataLoader(ChatDataset([_prompt_only(r) for r in records]), batch_size=batch_size, shuffle=False,
                        collate_fn=collator)
    device = next(policy.parameters()).device
    out: list[list[str]] = []
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=len(records) * k, desc="sampling", unit="resp", disable=not progress,
                               file=sys.stderr, dynamic_ncols=True) as bar:
        for b, batch in enumerate(loader):
            torch.manual_seed(seed + b)
            texts = policy.generate(to_device(batch, device), max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                    top_p=top_p, num_return_sequences=k)
            # generate returns the k samples of each prompt next to each other
            out += [texts[i * k:(i + 1) * k] for i in range(len(texts) // k)]
            bar.update(len(texts))
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="policy checkpoint folder (Hugging Face format)")
    ap.add_argument("--policy-class", default="models.policy.HFPolicy", help="Policy implementation to load it with")
    ap.add_argument("--data", required=True, type=Path, help="the data stage's folder (records + images)")
    ap.add_argument("--split", default="train", help="which split's prompts (default: train; eval uses test)")
    ap.add_argument("--tasks", nargs="*", default=["detailed_caption"], help="record tasks to prompt with")
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts (0 = all)")
    ap.add_argument("--k", type=int, default=4, help="responses per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.k < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        ap.error("need --k >= 1, --temperature > 0 and 0 < --top-p <= 1")
    if not (args.model / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json there (a Hugging Face checkpoint folder?)")

    config = {"split": args.split, "tasks": args.tasks, "limit": args.limit, "k": args.k,
              "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "seed": args.seed, "policy_class": args.policy_class}
    inputs = [args.data, args.model / "config.json", *sorted(args.model.glob("*.safetensors"))]
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    from mmalign.eval.runner import load_component

    records = prompts_from(args.data, args.split, args.tasks, args.limit)
    if not records:
        ap.error(f"no {args.split} records with tasks {args.tasks} in {args.data}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    policy = load_component(args.policy_class, path=str(args.model)).eval().to(device)
    pid = checkpoint_id(args.model)
    texts, secs = sample(policy, records, args.k, args.temperature, args.top_p, args.max_new_tokens,
                         args.batch_size, args.seed, progress=not args.no_progress)
    gen = {k: config[k] for k in ("temperature", "top_p", "max_new_tokens", "k", "seed")}
    rows, rejects = [], []
    root = args.data.resolve()
    for r, samples in zip(records, texts):
        user = [m for m in r.messages if m["role"] != "assistant"]
        for j, t in enumerate(samples):
            row = {"id": f"{r.id}-s{j}", "images": [str(Path(p).resolve().relative_to(root)) for p in r.images],
                   "prompt": user, "response": t, "annotations": {}, "generation": gen, "policy": pid,
                   "sample_index": j, "source_id": r.id, "scene_id": r.meta.get("scene_id"),
                   "task": r.meta.get("task"), "reference": r.meta.get("answer")}
            if not t.strip():
                rejects.append({**row, "reason": "empty response"})
            else:
                rows.append(row)
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        atomic_write_jsonl(st.path / "responses.jsonl", rows)
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        st.count("prompts", len(records))
        st.count("responses", len(rows))
        st.count("rejected_empty", len(rejects))
        st.count("milliseconds", round(secs * 1000))
    n = len(records) * args.k
    print(f"{STAGE}: {n} responses ({len(records)} prompts x {args.k}) in {secs:.1f} s = {n / secs:.1f} responses/s; "
          f"{len(rejects)} empty (-> rejects.jsonl); policy {pid} -> {args.out / 'responses.jsonl'}")
    print(json.dumps({"example": rows[0]["response"] if rows else None})[:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
