"""Why yes/no stays at chance: read the yes/no label out of the model's hidden state at the answer.

    python benchmarks/probe_yes_no.py --model runs/demo/sft/model --data runs/demo/data [--n 300]

For each yes/no task (existence, attribute, relation) of the world's records, at the position
that predicts the first answer token:

* ``answer_accuracy`` / ``yes_ratio``: the model's own choice, logit("Yes") vs logit("No");
* ``probe_accuracy_by_layer``: a logistic-regression probe trained on ``2n`` train questions'
  hidden states (embedding output, then each decoder layer) and scored on ``n`` val questions.

A probe at chance on every layer means the evidence the answer needs never reaches the answer
position -- the model does not fail to *read out* a comparison it made, it never makes it. A probe
well above chance with the answer at chance would point at the read-out instead. Results are
written to ``--out`` (JSON) and printed; docs/TESTBED.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

TASKS = ("yesno_existence", "yesno_attribute", "yesno_relation")


def _records(data: Path, split: str, task: str, limit: int) -> list[dict]:
    out = []
    with open(data / split / "sft.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["task"] == task:
                out.append(r)
                if len(out) == limit:
                    break
    return out


@torch.no_grad()
def answer_states(model, processor, data: Path, records: list[dict], yes: int, no: int, batch: int = 32):
    """Hidden states ``[N, layers + 1, H]`` and logit(yes) - logit(no) ``[N]`` at the answer position."""
    tok = processor.tokenizer
    tok.padding_side = "left"  # the answer position is then the last one of every row
    states, margins = [], []
    for i in range(0, len(records), batch):
        rows = records[i:i + batch]
        texts = [processor.apply_chat_template([r["messages"][0]], add_generation_prompt=True, tokenize=False)
                 for r in rows]
        images = [Image.open(data / r["images"][0]).convert("RGB") for r in rows]
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = model(**enc, output_hidden_states=True)
        states.append(torch.stack([h[:, -1] for h in out.hidden_states], 1))
        margins.append(out.logits[:, -1, yes] - out.logits[:, -1, no])
    return torch.cat(states), torch.cat(margins)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (standardised features, LBFGS)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    x = (train_x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, train_y) + 1e-2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = ((test_x - mu) / sd) @ w + b > 0
    return float((pred.float() == test_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="checkpoint folder (e.g. runs/demo/sft/model)")
    ap.add_argument("--data", required=True, type=Path, help="the data stage's folder")
    ap.add_argument("--n", type=int, default=300, help="val questions per task (2n train questions for the probe)")
    ap.add_argument("--out", type=Path, help="JSON results file")
    args = ap.parse_args(argv)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, use_safetensors=True).eval()
    yes, no = processor.tokenizer.encode("Yes")[0], processor.tokenizer.encode("No")[0]
    results = {}
    for task in TASKS:
        train, val = _records(args.data, "train", task, 2 * args.n), _records(args.data, "val", task, args.n)
        if not train or not val:
            continue
        htr, _ = answer_states(model, processor, args.data, train, yes, no)
        hva, margin = answer_states(model, processor, args.data, val, yes, no)
        ytr = torch.tensor([bool(r["label"]) for r in train]).float()
        yva = torch.tensor([bool(r["label"]) for r in val]).float()
        results[task] = {
            "n_val": len(val),
            "answer_accuracy": round(float(((margin > 0).float() == yva).float().mean()), 3),
            "yes_ratio": round(float((margin > 0).float().mean()), 3),
            "probe_accuracy_by_layer": [round(probe(htr[:, k], ytr, hva[:, k], yva), 3) for k in range(htr.shape[1])],
        }
        print(task, results[task], flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "results": results},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
