"""The ``sample`` stage: K responses per prompt from a policy checkpoint.

    python -m data_pipelines.sample --model runs/demo/sft/model --data runs/demo/data \\
        --split train --tasks detailed_caption --limit 500 --k 4 --out runs/demo/sample

Every method after SFT learns from feedback on the policy's *own* responses; this stage makes
them. Prompts are the (image, question) pairs of the data stage's records (``--tasks`` picks
which; each pair once). Decoding: ``--k`` samples per prompt with temperature / top-p, batched
with the KV cache, each batch seeded from ``(seed, batch index)`` (:func:`mmalign.shard.chunk_seed`),
so a run is reproducible for a given batch size, on any number of ranks:

    python -m torch.distributed.run --nproc_per_node 2 -m data_pipelines.sample ...   # or --shard I/N

Batch ``b`` of the global prompt list goes to rank ``b % N``; rank 0 merges in prompt order and
writes the output, identical to a one-rank run's (:mod:`mmalign.shard`).

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
from mmalign.shard import add_shard_args, chunk_seed
from mmalign.shard import setup as shard_setup
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


class Sampler:
    """``k`` samples for each prompt of one batch, seeded from ``(seed, batch index)``: a batch
    draws the same samples whichever rank runs it and whatever ran before it."""

    def __init__(self, policy, k: int, temperature: float, top_p: float, max_new_tokens: int, seed: int):
        self.policy, self.k, self.seed = policy, k, seed
        self.gen = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature, "top_p": top_p}
        self.collator = VisionChatCollator(policy.processor, max_length=1 << 16, mode="generate", on_overlength="error")
        self.device = next(policy.parameters()).device

    @torch.no_grad()
    def __call__(self, batch_index: int, records: list) -> list[list[str]]:
        prompts = ChatDataset([_prompt_only(r) for r in records])
        batch = self.collator([prompts[i] for i in range(len(prompts))])
        torch.manual_seed(chunk_seed(self.seed, batch_index))
        texts = self.policy.generate(to_device(batch, self.device), num_return_sequences=self.k, **self.gen)
        # generate returns the k samples of each prompt next to each other
        return [texts[i * self.k:(i + 1) * self.k] for i in range(len(records))]


def sample(policy, records: list, k: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
           seed: int, progress: bool = True) -> tuple[list[list[str]], float]:
    """``k`` samples per record (in record order) and the seconds it took, on this process alone
    (the same batches and seeds as :func:`main` on any number of ranks)."""
    from tqdm.auto import tqdm

    run = Sampler(policy, k, temperature, top_p, max_new_tokens, seed)
    out: list[list[str]] = []
    t0 = time.perf_counter()
    with tqdm(total=len(records) * k, desc="sampling", unit="resp", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for b in range(0, len(records), batch_size):
            out += run(b // batch_size, records[b:b + batch_size])
            bar.update(len(records[b:b + batch_size]) * k)
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
    ap.add_argument("--device", default="auto", help="auto (this rank's GPU when CUDA is there, else cpu), cpu, cuda, ...")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    ap.add_argument("--no-progress", action="store_true")
    add_shard_args(ap)
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

    from mmalign.components import load_component

    records = prompts_from(args.data, args.split, args.tasks, args.limit)
    if not records:
        ap.error(f"no {args.split} records with tasks {args.tasks} in {args.data}")
    shard = shard_setup(args)
    try:
        return _run(args, config, inputs, records, shard, load_component)
    finally:
        shard.close()


def _run(args, config: dict, inputs: list, records: list, shard, load_component) -> int:
    from tqdm.auto import tqdm

    parts = shard.parts(args.out, STAGE, config, inputs)
    policy = load_component(args.policy_class, path=str(args.model)).eval().to(shard.device(args.device))
    pid = checkpoint_id(args.model)
    run = Sampler(policy, args.k, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    n_mine = shard.items_mine(len(records), args.batch_size)
    t0 = time.perf_counter()
    with tqdm(total=n_mine * args.k, desc="sampling" if shard.world == 1 else f"sampling (rank 0 of {shard.world})",
              unit="resp", disable=args.no_progress or not shard.is_main, file=sys.stderr, dynamic_ncols=True) as bar:
        def work(b: int, chunk: list) -> list[list[str]]:
            out = run(b, chunk)
            bar.update(len(chunk) * args.k)
            return out

        merged = parts.map("samples", records, args.batch_size, work)
    if merged is None:  # not rank 0: its part is written, rank 0 merges
        print(f"{STAGE}: {shard}: {n_mine} prompts done, rank 0 writes {args.out}", file=sys.stderr)
        return 0
    texts, secs = merged.results, time.perf_counter() - t0
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
        st.info["ranks"] = shard.world
    parts.cleanup()
    n = len(records) * args.k
    print(f"{STAGE}: {n} responses ({len(records)} prompts x {args.k}) in {secs:.1f} s = {n / secs:.1f} responses/s "
          f"on {shard.world} rank(s); {len(rejects)} empty (-> rejects.jsonl); policy {pid} -> "
          f"{args.out / 'responses.jsonl'}")
    print(json.dumps({"example": rows[0]["response"] if rows else None})[:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
