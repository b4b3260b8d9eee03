"""The ``score_rm`` stage: score every preference pair with a trained reward model.

    python -m data_pipelines.score_rm --rm runs/demo/rm/critique/model \\
        --pairs runs/demo/prefs/val/pairs.jsonl --data-root runs/demo/data --out runs/demo/rm/critique/scored-val

For each pair the reward model scores the chosen and the rejected response. A critique model
(``mode: critique``, MM-RLHF) first writes its own critique of each response (greedy), then reads
its score at the critique's end; ``--critique reference`` scores with the record's reference
(oracle) critique instead (MM-RLHF's ``use_gt_critic``), and ``--with-reference-critique`` does
both, to separate the head's errors from the critic's. ``--num-critic k`` samples ``k`` critiques
per response (``--temperature`` > 0, ``--top-p``, ``--sample-seed``) and averages the scores read
after each, MM-RLHF's ``--num_critic`` (``llava/eval/eval_mm_reward_bench.py`` in
github.com/Kwai-YuanQi/MM-RLHF: default 1 with temperature 0, i.e. one greedy critique, which is
the default here too: ``k`` critiques cost ``k`` times the generation). A scalar model scores in
one forward pass.

Pairs share responses (every ranked pair of a prompt), so each distinct (images, prompt,
response) is critiqued and scored once, in length-sorted batches; this is what makes the stage
fast enough to give MM-DPO the reward margin ``delta`` of every training pair.

Output (atomic, with ``manifest.json``; an unchanged re-run is skipped):

* ``pairs.jsonl``: the input records as they were, plus ``reward_chosen``, ``reward_rejected``,
  ``reward_margin`` (= chosen - rejected) and, for a critique model, ``rm_critique_chosen`` /
  ``rm_critique_rejected`` (the critique the score was read after; the first of them with
  ``--num-critic`` > 1, when ``rm_critiques_chosen`` / ``rm_critiques_rejected`` list all of
  them and ``rm_critique_scores_chosen`` / ``rm_critique_scores_rejected`` the score after
  each, whose mean is ``reward_chosen`` / ``reward_rejected``);
* ``report.json`` / ``report.md``: ranking accuracy (share of pairs with reward_chosen >
  reward_rejected; a tie is wrong) with a 95% bootstrap interval that resamples *prompts*
  (``prompt_id``; the pairs of one prompt share responses, so they are not independent), by
  pair kind when the records say where responses came from (``source_chosen`` /
  ``source_rejected``); the margins' distribution; and for a critique model with reference
  critiques, the critique quality: precision and recall of the hallucinated objects it names
  ("There is no <object> in the image.", the oracle's sentence for an absent object) against the
  reference critique, agreement on "There is no hallucination in the answer.", exact-match rate,
  mean length in words.

Errors name the input: a malformed record is ``file:line: what is wrong``; a critique-mode run
with ``--critique reference`` over a record without reference critiques names that record; a
NaN or infinite score stops the stage naming the records (a broken model must not feed MM-DPO).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mmalign.records import (
    PreferenceRecord,
    RecordError,
    iter_jsonl,
    message_text,
    read_records,
    where,
)
from mmalign.rewards import CRITIQUE_KEYS
from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
)

STAGE = "score_rm"
NO_HALLUCINATION = "There is no hallucination in the answer."
_ABSENT = re.compile(r"There is no ([A-Za-z][A-Za-z -]*?) in the image\.")


# ---------------------------------------------------------------------------------------------
# critique quality (pure)


def absent_objects(critique: str) -> set[str]:
    """The objects a critique says are not in the image: the phrase of every "There is no <X> in
    the image." sentence whose ``X`` carries no colour or size word (those sentences, "There is
    no blue circle in the image.", report a wrong attribute of an object that is there; see
    :func:`mmalign.oracle.critique_and_refinement`). Lower-cased: ``{"star", "cross"}``."""
    from mmalign.world import COLORS, SIZES

    attrs = set(COLORS) | set(SIZES)
    out = set()
    for m in _ABSENT.finditer(critique):
        phrase = m.group(1).strip().lower()
        if not set(phrase.split()) & attrs:
            out.add(phrase)
    return out


def says_no_hallucination(critique: str) -> bool:
    """Whether the critique gives the oracle's all-clear sentence."""
    return NO_HALLUCINATION.lower() in critique.lower()


def critique_quality(generated: list[str], reference: list[str], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How a reward model's critiques compare with the reference (oracle) critiques, item by item.

    * object precision = sum |G & R| / sum |G|, recall = sum |G & R| / sum |R|, with ``G`` and
      ``R`` the :func:`absent_objects` of the generated and the reference critique of an item
      (micro-averaged, 95% bootstrap intervals over items); F1 of the two point values;
    * ``all_clear_accuracy``: share of items where both or neither say "There is no hallucination
      in the answer." (read it with ``all_clear``, how many of each side say it: when almost no
      reference does, a critic that never says it agrees almost always);
    * ``exact_match``: share of items whose critiques are equal (after stripping);
    * mean length in words of each side.
    """
    from mmalign.metrics import bootstrap_ci, bootstrap_ratio_ci, words

    if len(generated) != len(reference):
        raise ValueError(f"{len(generated)} generated critiques for {len(reference)} references")
    if not generated:
        raise ValueError("no critiques to compare")
    tp, n_gen, n_ref, clear, exact = [], [], [], [], []
    for g, r in zip(generated, reference):
        gs, rs = absent_objects(g), absent_objects(r)
        tp.append(len(gs & rs))
        n_gen.append(len(gs))
        n_ref.append(len(rs))
        clear.append(float(says_no_hallucination(g) == says_no_hallucination(r)))
        exact.append(float(g.strip() == r.strip()))
    p = bootstrap_ratio_ci(tp, n_gen, n_boot=n_boot, seed=seed)
    rc = bootstrap_ratio_ci(tp, n_ref, n_boot=n_boot, seed=seed)
    f1 = 2 * p[0] * rc[0] / (p[0] + rc[0]) if p[0] + rc[0] > 0 else 0.0
    return {
        "n": len(generated),
        "object_precision": list(p), "object_recall": list(rc), "object_f1": f1,
        "objects_named": {"generated": sum(n_gen), "reference": sum(n_ref), "both": sum(tp)},
        "all_clear_accuracy": list(bootstrap_ci(clear, n_boot=n_boot, seed=seed)),
        "all_clear": {"generated": sum(map(says_no_hallucination, generated)),
                      "reference": sum(map(says_no_hallucination, reference))},
        "exact_match": list(bootstrap_ci(exact, n_boot=n_boot, seed=seed)),
        "mean_words": {"generated": statistics.fmean(len(words(g)) for g in generated),
                       "reference": statistics.fmean(len(words(r)) for r in reference)},
    }


def ranking_accuracy(chosen: list[float], rejected: list[float], clusters: list[str], n_boot: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """Share of pairs with ``chosen > rejected`` (a tie is wrong), with a 95% bootstrap interval
    that resamples clusters (prompts): per cluster, correct pairs over pairs, micro-averaged."""
    from mmalign.metrics import bootstrap_ratio_ci

    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c, r, k in zip(chosen, rejected, clusters):
        per[k][0] += c > r
        per[k][1] += 1
    num, den = zip(*per.values())
    acc = bootstrap_ratio_ci(num, den, n_boot=n_boot, seed=seed)
    return {"accuracy": list(acc), "pairs": len(chosen), "prompts": len(per),
            "ties": sum(c == r for c, r in zip(chosen, rejected))}


# ---------------------------------------------------------------------------------------------
# the stage


def _answer(messages: list[dict]) -> str:
    return message_text(messages[0])


def _where(rec: PreferenceRecord) -> str:
    return where(rec.meta, rec.id, default="?")


def unique_items(records: list[PreferenceRecord]) -> tuple[list[dict], list[tuple[int, int]]]:
    """Distinct (images, prompt, response) of the pairs, and for each pair the indices of its
    chosen and rejected item. Each item keeps the first reference critique seen for it."""
    index: dict[tuple, int] = {}
    items: list[dict] = []
    pairs: list[tuple[int, int]] = []
    for rec in records:
        prompt_key = json.dumps(rec.prompt, sort_keys=True)
        ids = []
        for side, msgs in (("chosen", rec.chosen), ("rejected", rec.rejected)):
            answer = _answer(msgs).strip()
            key = (tuple(rec.images), prompt_key, answer)
            if key not in index:
                index[key] = len(items)
                items.append({"images": rec.images, "prompt": rec.prompt, "answer": answer,
                              "reference": rec.meta.get(CRITIQUE_KEYS[side]), "where": f"{_where(rec)} ({side})"})
            ids.append(index[key])
        pairs.append((ids[0], ids[1]))
    return items, pairs


def _quantiles(xs: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"mean": statistics.fmean(xs), "p10": qs[0], "median": statistics.median(xs), "p90": qs[-1],
            "min": min(xs), "max": max(xs)}


def _pct(ci: list[float]) -> str:
    p, lo, hi = ci
    if math.isnan(p):
        return "n/a"
    return f"{100 * p:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def render_report(rep: dict[str, Any]) -> str:
    acc = rep["ranking"]
    lines = [f"# Reward model scores: `{rep['rm']}` ({rep['mode']}, critique: {rep['critique'] or 'none'})", "",
             (f"{acc['pairs']} pairs over {acc['prompts']} prompts from `{rep['pairs']}`; {rep['items']} distinct "
             f"responses scored ({rep['seconds']['total']:.1f} s, {rep['items_per_second']:.1f} responses/s)."), "",
             (f"**Ranking accuracy** (reward_chosen > reward_rejected; ties {acc['ties']} count as wrong; 95% "
             f"interval resampling prompts): **{_pct(acc['accuracy'])}**"), ""]
    smp = rep.get("sampling")
    if smp:
        how = ("one greedy critique per response" if smp["temperature"] == 0 else
               f"{smp['num_critic']} critique(s) per response sampled at temperature {smp['temperature']:g}, "
               f"top-p {smp['top_p']:g}, seed {smp['sample_seed']}, scores averaged")
        lines += [f"Critiques: {how}.", ""]
    if "ranking_reference_critique" in rep:
        lines += [(f"With the reference (oracle) critique instead of its own: "
                  f"{_pct(rep['ranking_reference_critique']['accuracy'])}"), ""]
    if rep.get("by_kind"):
        lines += ["| pair (chosen > rejected) | pairs | accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {v['pairs']} | {_pct(v['accuracy'])} |" for k, v in rep["by_kind"].items()]
        lines.append("")
    m = rep["margin"]
    lines += [(f"Margins (chosen - rejected): mean {m['mean']:.3f}, median {m['median']:.3f}, "
              f"10-90 % [{m['p10']:.3f}, {m['p90']:.3f}], range [{m['min']:.3f}, {m['max']:.3f}]."), ""]
    q = rep.get("critique_quality")
    if q:
        lines += ["## Critique quality against the reference (oracle) critique", "",
                  (f"{q['n']} responses. Hallucinated objects named (\"There is no <object> in the image.\"): "
                  f"precision {_pct(q['object_precision'])}, recall {_pct(q['object_recall'])}, "
                  f"F1 {100 * q['object_f1']:.1f} % ({q['objects_named']['generated']} named, "
                  f"{q['objects_named']['reference']} in the references, {q['objects_named']['both']} in both)."), "",
                  (f"Agreement on \"{NO_HALLUCINATION}\": {_pct(q['all_clear_accuracy'])} (said by "
                   f"{q['all_clear']['generated']} generated and {q['all_clear']['reference']} reference critiques). "
                  f"Exact match: {_pct(q['exact_match'])}. Mean words: {q['mean_words']['generated']:.1f} generated, "
                  f"{q['mean_words']['reference']:.1f} reference."), ""]
        if rep.get("examples"):
            lines += ["Examples (reference, then generated):", ""]
            for ex in rep["examples"]:
                lines += [f"- {ex['answer']}", f"  - reference: {ex['reference']}", f"  - generated: {ex['generated']}"]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", required=True, type=Path, help="reward model export folder (RewardModule export.dir)")
    ap.add_argument("--pairs", required=True, type=Path, help="JSONL of preference records (prefs stage pairs.jsonl)")
    ap.add_argument("--data-root", type=Path, help="folder the records' image paths are relative to "
                                                   "(default: the pairs file's folder)")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--critique", choices=["generate", "reference"], default="generate",
                    help="critique model: score after its own greedy critique (generate) or after the record's "
                         "reference critique (reference, MM-RLHF's use_gt_critic)")
    ap.add_argument("--with-reference-critique", action="store_true",
                    help="critique model, --critique generate: also score with the reference critiques and report "
                         "both accuracies (one extra forward per response)")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="responses per generate / forward call (5,856 demo train pairs = 2,574 responses: 67 s on 2 "
                         "CPU cores at 64, 125 s at 32; both while other jobs shared the cores)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="longest critique generated")
    ap.add_argument("--num-critic", type=int, default=1,
                    help="critique model, --critique generate: critiques sampled per response, their scores averaged "
                         "(MM-RLHF's --num_critic; default 1; > 1 needs --temperature > 0)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="critique sampling temperature; 0 (default, as MM-RLHF's scorer) = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when sampling critiques")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the critique sampling")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0 = all)")
    ap.add_argument("--policy-class", help="override the policy class path recorded in reward_config.json")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the intervals")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.limit < 0 or args.n_boot < 1:
        ap.error("need --batch-size >= 1, --max-new-tokens >= 1, --limit >= 0 and --n-boot >= 1")
    if args.num_critic < 1 or not args.temperature >= 0 or not 0 < args.top_p <= 1:
        ap.error("need --num-critic >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    if args.num_critic > 1 and args.temperature == 0:
        ap.error(f"--num-critic {args.num_critic} with --temperature 0: greedy critiques are identical; "
                 "sample them (--temperature > 0) or use --num-critic 1")
    cfg_file = args.rm / "reward_config.json"
    if not cfg_file.is_file():
        ap.error(f"--rm {args.rm}: no reward_config.json there (a RewardModule export.dir?)")
    rm_cfg = json.loads(cfg_file.read_text())
    mode = rm_cfg.get("mode")
    if mode != "critique" and (args.critique == "reference" or args.with_reference_critique):
        ap.error(f"--critique reference / --with-reference-critique need a critique reward model; {args.rm} is {mode!r}")
    critique = (args.critique if mode == "critique" else None)
    with_ref = bool(critique == "generate" and args.with_reference_critique)
    if args.num_critic > 1 and critique != "generate":
        ap.error(f"--num-critic {args.num_critic} averages generated critiques: it needs a critique model "
                 f"({args.rm} is {mode!r}) and --critique generate")
    sampling = {"num_critic": args.num_critic, "temperature": args.temperature, "top_p": args.top_p,
                "sample_seed": args.sample_seed} if critique == "generate" else None

    config = {"data_root": str(args.data_root) if args.data_root else None, "critique": critique,
              "with_reference_critique": with_ref, "max_new_tokens": args.max_new_tokens if critique == "generate" else None,
              "limit": args.limit, "policy_class": args.policy_class, "n_boot": args.n_boot, "seed": args.seed,
              "sampling": sampling}
    inputs = [args.pairs, cfg_file, *sorted(args.rm.glob("*.safetensors"))]
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    import torch

    from mmalign.rewards.critique import RewardItem, RewardScorer, load_reward_model

    t0 = time.perf_counter()
    records = read_records(args.pairs, "preference", data_root=args.data_root, check_images="exists", on_error="raise")
    raw = [obj for _, obj, _ in iter_jsonl(args.pairs)]  # read_records raised on any bad line: same order
    if args.limit:
        records, raw = records[: args.limit], raw[: args.limit]
    if not records:
        raise RecordError(f"{args.pairs}: no preference records")
    items, pair_items = unique_items(records)
    needs_ref = critique == "reference" or with_ref
    if needs_ref:
        for it in items:
            if not isinstance(it["reference"], str) or not it["reference"].strip():
                raise RecordError(f"{it['where']}: no reference critique ('critique_chosen' / 'critique_rejected'), "
                                  f"which --critique reference / --with-reference-critique need")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_reward_model(args.rm, device=device, policy_class=args.policy_class)
    scorer = RewardScorer(model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          progress=not args.no_progress, num_critic=args.num_critic, temperature=args.temperature,
                          top_p=args.top_p, seed=args.sample_seed)
    ritems = [RewardItem(images=it["images"], prompt=it["prompt"], answer=it["answer"], critique=it["reference"],
                         id=it["where"]) for it in items]
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    critiques: list[str | None]
    samples: list[list[str]] | None = None
    if critique == "generate":
        samples = scorer.critique_samples(ritems)
        critiques = [c[0] for c in samples]   # the first: what rm_critique_* and the critique quality use
        seconds["generate"] = time.perf_counter() - t
        t = time.perf_counter()
    elif critique == "reference":
        critiques = [it["reference"] for it in items]
    else:
        critiques = [None] * len(items)
    per_critique = scorer.critique_scores(ritems, (samples or critiques) if critique else None)  # type: ignore[arg-type]
    scores = [sum(v) / len(v) for v in per_critique]   # the mean over an item's critiques
    seconds["score"] = time.perf_counter() - t
    ref_scores = None
    if with_ref:
        t = time.perf_counter()
        ref_scores = scorer.scores(ritems, [it["reference"] for it in items])
        seconds["score_reference_critique"] = time.perf_counter() - t

    chosen = [scores[c] for c, _ in pair_items]
    rejected = [scores[r] for _, r in pair_items]
    clusters = [str(rec.meta.get("prompt_id") or rec.id) for rec in records]
    out_records = []
    for obj, (ci, ri), c, r in zip(raw, pair_items, chosen, rejected):
        row = {**obj, "reward_chosen": c, "reward_rejected": r, "reward_margin": c - r}
        if critique:
            row.update(rm_critique_chosen=critiques[ci], rm_critique_rejected=critiques[ri])
        if samples is not None and args.num_critic > 1:
            row.update(rm_critiques_chosen=samples[ci], rm_critiques_rejected=samples[ri],
                       rm_critique_scores_chosen=per_critique[ci], rm_critique_scores_rejected=per_critique[ri])
        out_records.append(row)

    report: dict[str, Any] = {"rm": str(args.rm), "mode": mode, "critique": critique, "sampling": sampling,
                              "pairs": str(args.pairs),
                              "items": len(items), "ranking": ranking_accuracy(chosen, rejected, clusters, args.n_boot,
                                                                                args.seed),
                              "margin": _quantiles([c - r for c, r in zip(chosen, rejected)])}
    if ref_scores is not None:
        report["ranking_reference_critique"] = ranking_accuracy(
            [ref_scores[c] for c, _ in pair_items], [ref_scores[r] for _, r in pair_items], clusters, args.n_boot,
            args.seed)
    kinds: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        sc, sr = rec.meta.get("source_chosen"), rec.meta.get("source_rejected")
        if sc is not None and sr is not None:
            kinds[f"{sc} > {sr}"].append(i)
    report["by_kind"] = {k: ranking_accuracy([chosen[i] for i in ix], [rejected[i] for i in ix],
                                             [clusters[i] for i in ix], args.n_boot, args.seed)
                         for k, ix in sorted(kinds.items())}
    if critique == "generate":
        refs = [(i, it["reference"]) for i, it in enumerate(items) if isinstance(it["reference"], str)]
        if refs:
            report["critique_quality"] = critique_quality([critiques[i] for i, _ in refs], [r for _, r in refs],
                                                          args.n_boot, args.seed)
            report["examples"] = [{"answer": items[i]["answer"], "reference": r, "generated": critiques[i]}
                                  for i, r in refs[:3]]
    seconds["total"] = time.perf_counter() - t0
    report["seconds"] = seconds
    report["items_per_second"] = len(items) / max(1e-9, seconds["score"] + seconds.get("generate", 0.0))
    report["device"] = device

    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        atomic_write_jsonl(st.path / "pairs.jsonl", out_records)
        atomic_write_text(st.path / "report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(st.path / "report.md", render_report(report) + "\n")
        st.count("pairs", len(out_records))
        st.count("responses", len(items))
        st.info.update(mode=mode, accuracy=report["ranking"]["accuracy"][0])
    print(render_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
