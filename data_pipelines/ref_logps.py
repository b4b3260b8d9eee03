"""The ``ref-logps`` stage: the reference model's log-probs of every preference pair, in one pass.

    python -m data_pipelines.ref_logps --model runs/demo/sft/model --pairs runs/demo/prefs/train/pairs.jsonl \\
        --data-root runs/demo/data --out runs/demo/ref/train

DPO's reference model is frozen, so its sequence log-probs of each chosen and rejected answer
never change during training. Computing them once here and storing them with the data removes
the reference forward from every training step (``DPOModule(reference="precomputed")``); the
loss is the same as with the reference on the fly (tested). Re-Align's visual pairs (records with
``rejected_images``) also get ``ref_chosen_rejimg_logp``: the chosen answer under the rejected images.

The stage reads the ``prefs`` pairs themselves, so plain DPO needs no reward model. MM-DPO's
reward margins (``make rm-score``) are joined to these pairs by id when MM-DPO loads its data
(``PreferenceDataModule(train_margins=..., val_margins=...)``, :func:`mmalign.data.join_margins`).

Output (atomic, with ``manifest.json``): ``pairs.jsonl``, the input records with
``ref_chosen_logp`` / ``ref_rejected_logp`` (summed log-probs of the answer tokens),
``ref_chosen_tokens`` / ``ref_rejected_tokens`` (how many tokens were scored), ``ref_model`` (the
checkpoint id; DPOModule refuses records made by another checkpoint) and ``ref_max_length``
(train with the same ``max_length``, or answers cut differently would disagree). Pairs that do
not fit ``--max-length`` are listed in ``rejects.jsonl`` with the reason, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmalign.collators import PreferenceCollator, to_device
from mmalign.data import PreferenceDataset
from mmalign.records import read_records
from mmalign.stage import StageOutput, atomic_write_jsonl, checkpoint_id, is_up_to_date

STAGE = "ref-logps"


def reference_logps(policy, records: list, batch_size: int, max_length: int, layout: str,
                    progress: bool = True) -> tuple[dict[str, tuple[float, float, int, int]], dict[str, str]]:
    """``{record id: (chosen logp, rejected logp, chosen tokens, rejected tokens)}`` under
    ``policy``'s reference view, and ``{record id: reason}`` for pairs that could not be scored."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    collator = PreferenceCollator(policy.processor, max_length=max_length, layout=layout, on_overlength="drop")
    loader = DataLoader(PreferenceDataset(records), batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(policy.parameters()).device
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"record id {dup!r} appears more than once; reference log-probs are stored by id")
    out: dict[str, tuple] = {}
    with torch.no_grad(), policy.reference() as ref, tqdm(total=len(records), desc="reference log-probs", unit="pair",
                                                           disable=not progress, file=sys.stderr,
                                                           dynamic_ncols=True) as bar:
        for k, batch in enumerate(loader):
            bar.update(min(batch_size, len(records) - k * batch_size))
            if batch is not None:
                parts = ref.pair_logprobs(to_device(batch, device))
                sums = [(parts[j] * parts[j + 1]).sum(1).tolist() for j in range(0, len(parts), 2)]
                counts = [parts[j + 1].sum(1).tolist() for j in range(0, len(parts), 2)]
                for i, m in enumerate(batch["meta"]):
                    out[m["id"]] = tuple(s[i] for s in sums) + tuple(int(n[i]) for n in counts)
    missing = {r.id: f"does not fit max_length={max_length} (image tokens + prompt + answer)"
               for r in records if r.id not in out}
    return out, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="the reference checkpoint (the policy DPO starts from)")
    ap.add_argument("--policy-class", default="models.policy.HFPolicy", help="Policy implementation to load it with")
    ap.add_argument("--pairs", required=True, type=Path, help="preference records (JSONL)")
    ap.add_argument("--data-root", type=Path, default=None, help="image paths are relative to this folder")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    ap.add_argument("--max-length", type=int, default=256, help="same as the DPO config's data max_length")
    ap.add_argument("--layout", choices=("shared_prompt", "concat"), default="shared_prompt",
                    help="pair layout (same log-probs; concat for Qwen2-VL style models)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    ap.add_argument("--force", action="store_true", help="recompute even if the output is up to date")
    args = ap.parse_args(argv)

    from mmalign.components import load_component

    config = {"model": checkpoint_id(args.model), "max_length": args.max_length, "layout": args.layout,
              "policy_class": args.policy_class}
    inputs = [args.pairs, args.model / "config.json"]
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{args.out}: up to date (use --force to recompute)")
        return 0
    try:
        records = read_records(args.pairs, "preference", data_root=args.data_root)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    policy = load_component(args.policy_class, path=str(args.model)).to(device).eval()
    t0 = time.perf_counter()
    scored, missing = reference_logps(policy, records, args.batch_size, args.max_length, args.layout)
    seconds = time.perf_counter() - t0
    # The input lines as written (every extra field kept); read_records raised on any bad line,
    # so the non-blank lines and the records correspond one to one, in order.
    with open(args.pairs, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    rows = []
    for obj, r in zip(raw, records):
        if r.id in scored:
            vals = scored[r.id]
            k = len(vals) // 2
            names = ("chosen", "rejected", "chosen_rejimg")[:k]
            rows.append({**obj, **{f"ref_{n}_logp": v for n, v in zip(names, vals[:k])},
                         **{f"ref_{n}_tokens": v for n, v in zip(names, vals[k:])},
                         "ref_model": config["model"], "ref_max_length": args.max_length})
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        atomic_write_jsonl(st.path / "pairs.jsonl", rows)
        atomic_write_jsonl(st.path / "rejects.jsonl", [{"id": k, "reason": v} for k, v in missing.items()])
        st.count("pairs", len(rows))
        st.count("rejected", len(missing))
        st.count("milliseconds", round(seconds * 1000))
    print(f"{len(rows)} pairs scored by {config['model']} in {seconds:.1f} s "
          f"({len(records) / max(seconds, 1e-9):.0f} pairs/s); {len(missing)} rejected -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
