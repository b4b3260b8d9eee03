"""The ``nlf`` stage: DRESS's natural-language-feedback data as conditioned SFT records.

    python -m data_pipelines.nlf --feedback runs/demo/feedback/oracle --data runs/demo/data \\
        --model runs/demo/sft/model --out runs/demo/nlf [--val-fraction 0.05] \\
        [--score-weights faithfulness=1] [--condition feedback|rating|none] \\
        [--feedback-template "Feedback: {feedback}"] [--good-feedback TEXT] [--thresholds 0.75] \\
        [--names bad good] [--template "Answer quality: {name}."] [--revisions 1] [--max-new-tokens 96] \\
        [--batch-size 32] [--seed 0] [--limit 0] [--judge runs/demo/judge/model [--judge-questions caption]]

DRESS (Chen et al. CVPR 2024, "DRESS: Instructing Large Vision-Language Models to Align and
Interact with Humans via Natural Language Feedback") trains with "generalized conditional RL": a
language-modelling loss on responses conditioned on their feedback. Its feedback comes in two
kinds, and this stage makes one kind of record from each.

The condition (``--condition``, :mod:`mmalign.conditions`):

* ``feedback`` (default; the paper's "conditioned on the NLF"): the critique text itself,
  ``--feedback-template`` with ``{feedback}`` (default ``"Feedback: {feedback}"``); a feedback
  record without a critique cannot be conditioned (an error naming it, or a reject with
  ``--on-error skip``). The *good-feedback text* that inference asks with is derived from the
  train split's critique examples (:func:`mmalign.conditions.derive_good_feedback`: the
  sentences most top-rated critiques share; with the world oracle "There is no hallucination in
  the answer."; every split's when train has none) unless ``--good-feedback`` gives it; it is written in ``condition.json``, and
  the trainer derives the same from the same records and saves it beside the model.
* ``rating``: the level of the record's score (:class:`ConditionScheme`, ``--thresholds`` /
  ``--names`` / ``--template``), e.g. "Answer quality: good.".
* ``none``: no condition (:class:`~mmalign.conditions.NoCondition`), DRESS's *unconditioned
  ablation*: the same critique examples and refinement episodes (same ids and meta) with no
  condition text in any message and ``condition: null``, so a DRESS model trained on them
  (``condition: none``) measures what conditioning on the feedback adds. Like ``rating`` it
  needs no critique text; a ``feedback`` run drops records without one (``rejects.jsonl``),
  so the two have the same records only when every feedback record has a critique (the
  oracle's always do).

Records:

* **critique examples** (critique NLF aligns responses): one per feedback record. ``score`` =
  the weighted mean (``--score-weights``, :func:`mmalign.ranking.overall`) of the feedback's
  scores; the condition (its critique, or the level of its score) is put before the question
  (first user turn): ``[user: image + "<condition> <question>", assistant: response]``.
* **refinement episodes** (refinement NLF teaches revising across turns): for every feedback
  record whose refinement says something to fix, the policy (``--model``) is asked to revise:
  ``[user: image + question, assistant: response, user: refinement]`` (generate mode; sampled
  with ``--temperature`` / ``--top-p``, batched, seeded ``seed + 100003 * (round - 1) + batch
  index``, so round 1 draws as the sample stage does). The revisions' judge -- the world oracle
  (:class:`mmalign.oracle.WorldOracle`, scenes of ``--data``), or a judge model with ``--judge``
  ("Who judges" below) -- judges the revision: ``score_after`` (same weights), hallucinated
  claims, a new critique and refinement. *Every* revision is kept, better or not, as ``[user:
  image + question, assistant: response, user: "<condition of the revision> <refinement>",
  assistant: revision]`` (the condition in the *last* user turn,
  :func:`mmalign.conditions.with_condition` ``turn="last"``): hindsight relabelling, the revision
  is what a model asked with that condition should write. The condition of the revision is the
  judge's critique of it (``feedback``) or the level of ``score_after`` (``rating``); the
  refinement feedback that drives the revision is the turn's text either way. With ``--revisions N`` round k+1
  refines round k's revision with the judge's new refinement, and each round is one record
  holding the whole conversation so far (earlier user turns as the policy saw them, without a
  condition; only the last assistant turn is meant to carry loss: train with ``train_on: last``,
  as ``configs/dress`` does). An episode stops when the judge finds nothing left to fix, or
  when a revision is empty (that one goes to ``rejects.jsonl``).

Before/after: the "before" of round 1 is the revisions' judge's judgement of the original
response (with the oracle judging, equal to the feedback record's own scores when the feedback
source is the oracle too; the feedback record's scores may come from another source on another
scale, so both sides of a comparison always come from the one judge), the "before" of round k+1 is
round k's "after". ``success`` = ``score_after > score_before``; ``fixed`` = fewer hallucinated
claims (object + attribute + relation) after than before.

Who judges: by default the world oracle, which needs scene graphs. ``--judge PATH`` has a judge
model judge the "before" responses and every round's revisions instead -- one ``annotate`` call
over all of a round's revisions, so the judge batches its questions -- loaded by
``--judge-class`` (default :class:`models.feedback_sources.VLMJudgeSource`) with
``--judge-questions`` (default ``caption``: the judge describes the image and checks the claims
against its description; only this mode also gives ``helpfulness``, which the default weights of
``make nlf`` use -- a weight naming a dimension the judge does not give is an error naming it).
Scene graphs are then not needed. The records' ``judged_by`` and the report name who judged; the
judge's path is in the stage config and its ``config.json`` and weights among the inputs, so
another judge re-runs the stage.

Caveat of the default ``--score-weights faithfulness=1``: faithfulness is the share of checkable
claims that hold, 1.0 when there are none, so a revision that makes no checkable claim (e.g. an
undertrained policy's noise) scores 1.0, "succeeds" and is "fixed". ``report.json`` counts such
revisions (``revisions_without_checkable_claims``); ``--score-weights
faithfulness=1,helpfulness=1`` (the oracle's coverage of the scene; a caption judge's share of the
objects it describes) scores them low.

"Nothing to fix": a refinement that is empty or the oracle's "No change is needed." makes no
episode; such feedback records are counted (``report.json``: ``feedback.without_refinement``).

Output (atomic, with ``manifest.json``; an unchanged re-run is skipped, ``--force`` redoes it):

* ``train/sft.jsonl``, ``val/sft.jsonl``: :class:`mmalign.records.SFTRecord` s, image paths
  relative to ``--data`` (read them with ``read_records(path, "sft", data_root=<--data>)``).
  Split by scene: ``val`` when sha256 of the scene id, as a fraction of 2^64, is below
  ``--val-fraction`` (:func:`mmalign.ranking.split_of`), so every record of a scene (all its
  responses, critique and refinement) lands in one split, whatever the seed or file order.
  Meta of a critique example: ``kind: "critique"``, ``score``, ``scores``, ``level`` (the
  rating level of the score, in both modes: the report counts it), ``condition`` (the text in
  the messages), ``critique``, ``refinement``, ``source_id`` (the feedback record), ``prompt_id``,
  ``scene_id``, ``task``, ``feedback_source`` (with ``--condition none``: ``condition`` null,
  the rest the same). Of a refinement episode: ``kind: "refinement"``,
  ``round``, ``score_before``, ``score_after``, ``scores_after``, ``success``, ``fixed``,
  ``hallucinated_before`` / ``hallucinated_after`` (per type), ``level``, ``condition``,
  ``refinement`` (the feedback the revision answers), ``critique`` (the judge's critique of the
  revision), ``checkable_claims_after``, ``judged_by`` (``"oracle"``, or the judge source's name,
  ``"judge"``), ``policy`` and the ids above.
* ``condition.json``: the condition scheme (``to_dict()``: ``{"mode": "feedback", "template",
  "good_feedback"}``, the rating scheme, or ``{"mode": "none"}``); the DRESS trainer must be given the same mode and
  template (``condition``, ``feedback_template``, or ``condition_thresholds`` /
  ``condition_names`` / ``condition_template``); it checks every record's condition.
* ``report.json`` / ``report.md``: the condition mode (and the good-feedback text with how it
  was derived: ``good_feedback``), records per kind and split, per rating level, per round the
  revisions' success and fix rates with 95% bootstrap intervals (over revisions), mean score
  before / after; feedback records without a refinement; why episodes stopped; rejects.
* ``rejects.jsonl``: feedback lines that could not be used (``--on-error skip``; otherwise the
  first one stops the stage with ``file:line: what is wrong``), feedback records without a
  critique (``--condition feedback``) and empty revisions, each with its ``reason``.

``--revisions 0`` makes critique examples only; ``--model`` and scene graphs are then not needed
(nor with ``--judge``: scene graphs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mmalign.conditions import ConditionScheme, FeedbackCondition
from mmalign.feedback import HALLUCINATION_TYPES, check_feedback
from mmalign.feedback_io import (
    Prompt,
    Response,
    add_judge_arguments,
    judge_stage_config,
    load_judge,
    read_feedback,
    weigh_feedback,
)
from mmalign.nlf_records import (
    KINDS,
    NO_CONDITION_LINE,
    add_feedback_arguments,
    add_scheme_arguments,
    condition_from,
    critique_record,
    refinement_record,
    resolve_good_feedback,
    scheme_from,
    summarize,
    summary_md,
    text_turn,
)
from mmalign.ranking import parse_weights, split_of
from mmalign.records import RecordError, SFTRecord
from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    checkpoint_id,
    is_up_to_date,
)

STAGE = "nlf"
#: refinements that ask for nothing (the world oracle writes the first for a perfect response)
NOTHING_TO_FIX = ("No change is needed.", "")
#: the seed of round r, batch b is seed + ROUND_SEED_STRIDE * (r - 1) + b
ROUND_SEED_STRIDE = 100_003
DEFAULT_WEIGHTS = "faithfulness=1"


# ---------------------------------------------------------------------------------------------
# records


def nothing_to_fix(refinement: str | None) -> bool:
    return refinement is None or refinement.strip() in NOTHING_TO_FIX


# ---------------------------------------------------------------------------------------------
# revising


@dataclass
class Episode:
    """One refinement episode in progress."""

    prompt: Prompt
    sample: Response
    split: str
    images: list[str]  # absolute
    conversation: list[dict]  # up to the assistant turn being refined
    refinement: str
    score: float = float("nan")  # the judge's (by default the oracle's) score of that turn
    hallucinated: dict[str, int] | None = None


def revise(policy, asks: list[tuple[str, list[str], list[dict]]], temperature: float, top_p: float,
           max_new_tokens: int, batch_size: int, seed: int, desc: str = "revising",
           progress: bool = True) -> list[str]:
    """One sampled answer per ``(id, absolute image paths, messages ending with a user turn)``,
    in order; batch ``b`` is seeded ``seed + b``."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from mmalign.collators import VisionChatCollator, to_device
    from mmalign.data import ChatDataset

    records = [SFTRecord(id=i, images=imgs, messages=msgs, meta={"source": i}) for i, imgs, msgs in asks]
    collator = VisionChatCollator(policy.processor, max_length=1 << 16, mode="generate", on_overlength="error")
    loader = DataLoader(ChatDataset(records), batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(policy.parameters()).device
    out: list[str] = []
    with torch.no_grad(), tqdm(total=len(records), desc=desc, unit="rev", disable=not progress, file=sys.stderr,
                               dynamic_ncols=True) as bar:
        for b, batch in enumerate(loader):
            torch.manual_seed(seed + b)
            texts = policy.generate(to_device(batch, device), max_new_tokens=max_new_tokens, do_sample=True,
                                    temperature=temperature, top_p=top_p, num_return_sequences=1)
            out += texts
            bar.update(len(texts))
    if len(out) != len(records):
        raise RuntimeError(f"the policy returned {len(out)} texts for {len(records)} prompts")
    return out


def judge_texts(judge, asks: list[tuple[Prompt, str, str, str]], weights: dict[str, float]) -> list[tuple]:
    """Feedback on each ``(prompt, text, record id, where)``, with its weighted scores, weighted
    score and hallucinated counts per type: ``(feedback, scores, score, hallucinated)``.

    The oracle (``judge.name == "oracle"``) checks each text against its prompt's scene graph; any
    other feedback source judges all of them in one ``annotate`` call (a model batches them).
    """
    items = [p.feedback_item(text, rid) for p, text, rid, _ in asks]
    if not items:
        return []
    if judge.name == "oracle":
        fbs = [judge.feedback(it, p.scene) for it, (p, *_rest) in zip(items, asks)]
    else:
        fbs = check_feedback(items, judge.annotate(items), judge.name)
    weighed = weigh_feedback(fbs, [where for *_rest, where in asks], weights,
                             f"the revisions' judge ({judge.name})", "--score-weights")
    return [(fb, scores, score, {t: int(fb.meta.get("hallucinated", {}).get(t, 0)) for t in HALLUCINATION_TYPES})
            for fb, scores, score in weighed]


# ---------------------------------------------------------------------------------------------


def build_report(summary: dict, stats: Counter, rejects: list[dict], seconds: float, extra: dict) -> dict:
    return {**extra, **summary,
            "feedback": {"records": stats["feedback_records"], "without_refinement": stats["without_refinement"],
                         "episodes": stats["episodes"]},
            "episodes_stopped": {k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("stop:")},
            "revisions_without_checkable_claims": stats["revisions_without_checkable_claims"],
            "rejects": {"total": len(rejects), "reasons": dict(Counter(r["reason"] for r in rejects))},
            "seconds": round(seconds, 2)}


def judged_by(rep: dict) -> str:
    """Who judged the revisions, for the report text."""
    if rep.get("judged_by", "oracle") == "oracle":
        return "the world oracle"
    return f"the {rep['judged_by']} {rep['judge']} ({rep['judge_class']}, questions {rep['judge_questions']})"


def report_md(rep: dict, scheme: ConditionScheme) -> str:
    w = ", ".join(f"{d}={v:g}" for d, v in rep["weights"].items())
    fb = rep["feedback"]
    cond = rep.get("condition", {})
    if cond.get("mode") == "feedback":
        g = rep["good_feedback"]
        how = (f"derived: {g['rule']} of the {g['top_examples']} top-rated (score {g['top_score']:g}) train critiques"
               if g.get("rule") else "given with --good-feedback")
        cond_line = (f"Condition: the critique text ({cond['template']!r}); inference asks with the good feedback "
                     f"{cond['good_feedback']!r} ({how}). Rating levels below are for the report only.")
    elif cond.get("mode") == "none":
        cond_line = NO_CONDITION_LINE
    else:
        cond_line = f"Condition: the rating level ({scheme.template!r})."
    lines = ["# DRESS natural-language-feedback data", "",
             (f"{fb['records']} feedback records ({fb['without_refinement']} with nothing to fix), "
              f"{fb['episodes']} refinement episodes, up to {rep['revisions_asked']} round(s); "
              f"score = weighted mean ({w}); revisions judged by {judged_by(rep)}."), "", cond_line, "",
             *summary_md(rep, scheme), ""]
    stopped = ", ".join(f"{k}: {v}" for k, v in rep["episodes_stopped"].items()) or "none"
    lines += [f"Episodes stopped before the last round: {stopped}.",
              (f"Revisions without any checkable claim: {rep['revisions_without_checkable_claims']} (faithfulness "
               "counts them as 1.0; helpfulness in --score-weights penalises an answer that says nothing)."),
              f"Rejected: {rep['rejects']['total']} {rep['rejects']['reasons'] or ''}".rstrip()
              + f" (rejects.jsonl). {rep['seconds']} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.nlf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feedback", required=True, type=Path,
                    help="the feedback stage's folder (feedback.jsonl) or an annotated-response JSONL file")
    ap.add_argument("--data", required=True, type=Path,
                    help="the data stage's folder: image root and <split>/scenes.jsonl (the oracle's scenes)")
    ap.add_argument("--model", type=Path,
                    help="the policy checkpoint that revises (Hugging Face folder; needed unless --revisions 0)")
    ap.add_argument("--policy-class", default="models.policy.HFPolicy", help="Policy implementation to load it with")
    ap.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of scenes (by a hash of the scene id) whose records go to val (default 0.05)")
    ap.add_argument("--score-weights", default=DEFAULT_WEIGHTS,
                    help=f"feedback score dimensions and weights of the score that picks the condition "
                         f"(default {DEFAULT_WEIGHTS}; the oracle also gives helpfulness)")
    add_feedback_arguments(ap)
    add_scheme_arguments(ap)
    ap.add_argument("--revisions", type=int, default=1,
                    help="refinement rounds per episode (0 = critique examples only; default 1)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of revisions (default 1.0)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of revisions (default 0.95)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="longest revision in tokens (default 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="conversations per generate() call (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampling (per round and batch; default 0)")
    ap.add_argument("--limit", type=int, default=0,
                    help="use at most this many feedback records, prompt by prompt in file order (0 = all)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="an unusable feedback line: stop with file:line (raise) or put it in rejects.jsonl (skip)")
    add_judge_arguments(ap, "a judge checkpoint folder: it judges the responses before and the revisions after, "
                            "instead of the world oracle (no scene graphs needed then)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        weights = parse_weights(args.score_weights)
        scheme = scheme_from(args.thresholds, args.names, args.template)
        # fcond: the feedback condition, NoCondition for none, None for rating (the rating scheme)
        fcond = condition_from(args)
    except ValueError as e:
        ap.error(str(e).replace("--weights", "--score-weights"))
    if args.revisions < 0 or args.limit < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("need --revisions >= 0, --limit >= 0, --batch-size >= 1 and --max-new-tokens >= 1")
    if not 0 <= args.val_fraction < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        ap.error("need 0 <= --val-fraction < 1, --temperature > 0 and 0 < --top-p <= 1")
    feedback = args.feedback / "feedback.jsonl" if args.feedback.is_dir() else args.feedback
    if not feedback.is_file():
        ap.error(f"--feedback {args.feedback}: no feedback.jsonl there")
    if args.revisions:
        if args.model is None:
            ap.error("--revisions > 0 needs --model (the policy that revises); --revisions 0 makes critique examples only")
        if not (args.model / "config.json").exists():
            ap.error(f"--model {args.model}: no config.json there (a Hugging Face checkpoint folder?)")
    judge_path = args.judge if args.revisions else None  # with no revision there is nothing to judge
    judge_config, judge_inputs = judge_stage_config(ap, args, judge_path)
    config = {"weights": weights, "scheme": scheme.to_dict(), "val_fraction": args.val_fraction,
              "revisions": args.revisions, "temperature": args.temperature, "top_p": args.top_p,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed,
              "limit": args.limit, "on_error": args.on_error,
              "policy_class": args.policy_class if args.revisions else None}
    if fcond is not None:  # rating mode keeps the config (and so the up-to-date check) it always had
        config["condition"] = fcond.to_dict()
    if judge_config is not None:  # likewise: without --judge the config is what it always was
        config["judge"] = judge_config
    inputs = [feedback, args.data]
    if args.revisions:
        inputs += [args.model / "config.json", *sorted(args.model.glob("*.safetensors"))]
    inputs += judge_inputs
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    from mmalign.oracle import WorldOracle
    from mmalign.scene_io import load_scenes

    t0 = time.perf_counter()
    scenes = None
    if args.revisions and judge_path is None:
        scenes = load_scenes(args.data)
        if not scenes:
            ap.error(f"refinement episodes are judged by the world oracle, which needs scene graphs "
                     f"(<data>/<split>/scenes.jsonl) under {args.data}; without them use --judge <checkpoint> "
                     "(a judge model judges the revisions) or --revisions 0")
    root = args.data.resolve()
    rejects: list[dict] = []
    stats: Counter = Counter()
    prompts = read_feedback(feedback, args.data, weights, scenes, args.on_error, rejects)
    for r in rejects:
        r["reason"] = f"input: {r['reason']}"
    todo = [(p, s) for p in prompts for s in p.samples][: args.limit or None]
    if not todo:
        raise RecordError(f"{feedback}: no usable annotated responses ({len(rejects)} rejected)")
    stats["feedback_records"] = len(todo)

    splits: dict[str, list[dict]] = {"train": [], "val": []}
    episodes: list[Episode] = []
    for p, s in todo:
        key = p.scene_id or (p.scene.scene_id if p.scene is not None else None) or (p.images[0] if p.images else p.id)
        split = split_of(str(key), args.val_fraction)
        ids = {"source_id": s.sample_id, "prompt_id": p.id, "scene_id": p.scene_id, "task": p.task,
               "feedback_source": s.scored_by}
        if isinstance(fcond, FeedbackCondition) and not (s.critique or "").strip():
            msg = f"{p.where} (response {s.sample_id!r}): no critique text, and --condition feedback conditions on it"
            if args.on_error == "raise":
                raise RecordError(msg + " (--condition rating or none does not need one; --on-error skip drops it)")
            rejects.append({"id": s.sample_id, "reason": "no critique", "where": msg})
            continue
        splits[split].append(critique_record(
            f"{s.sample_id}-critique", p.images, p.prompt, s.text, s.overall, scheme,
            {"scores": s.scores, "critique": s.critique, "refinement": s.refinement, **ids}, fcond))
        if nothing_to_fix(s.refinement):
            stats["without_refinement"] += 1
            continue
        if args.revisions:
            episodes.append(Episode(p, s, split, [str(root / rel) for rel in p.images],
                                    p.prompt + [text_turn("assistant", s.text)], s.refinement.strip()))
    stats["episodes"] = len(episodes)

    pid = None
    judge = None
    if episodes:
        import torch

        from mmalign.components import load_component

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if judge_path is None:
            judge = WorldOracle(scenes)
        else:
            judge = load_judge(args, judge_path, progress=not args.no_progress, device=device)
        # the "before" of round 1, judged like the revisions (one call for a model judge)
        befores = judge_texts(judge, [(ep.prompt, ep.sample.text, f"{ep.sample.sample_id}-before",
                                       f"{ep.prompt.where} (response {ep.sample.sample_id!r})") for ep in episodes],
                              weights)
        for ep, (_fb, _sc, score, hal) in zip(episodes, befores):
            ep.score, ep.hallucinated = score, hal
        policy = load_component(args.policy_class, path=str(args.model)).eval().to(device)
        pid = checkpoint_id(args.model)
        active = episodes
        for rnd in range(1, args.revisions + 1):
            if not active:
                break
            convs = [ep.conversation + [text_turn("user", ep.refinement)] for ep in active]
            texts = revise(policy, [(f"{ep.sample.sample_id}-refine{rnd}", ep.images, c) for ep, c in zip(active, convs)],
                           args.temperature, args.top_p, args.max_new_tokens, args.batch_size,
                           args.seed + ROUND_SEED_STRIDE * (rnd - 1), desc=f"revising (round {rnd})",
                           progress=not args.no_progress)
            texts = [t.strip() for t in texts]
            # the round's revisions judged together (one annotate call for a model judge)
            verdicts = iter(judge_texts(judge, [(ep.prompt, text, f"{ep.sample.sample_id}-refine{rnd}",
                                                 f"{ep.prompt.where} ({ep.sample.sample_id}-refine{rnd})")
                                                for ep, text in zip(active, texts) if text], weights))
            nxt = []
            for ep, conv, text in zip(active, convs, texts):
                rid = f"{ep.sample.sample_id}-refine{rnd}"
                if not text:
                    rejects.append({"id": rid, "reason": "empty revision", "round": rnd,
                                    "source_id": ep.sample.sample_id, "messages": conv})
                    stats["stop:empty revision"] += rnd < args.revisions
                    continue
                fb, scores, score, hal = next(verdicts)
                checkable = int(fb.meta.get("claims", 0)) - int(fb.meta.get("unverifiable", 0))
                stats["revisions_without_checkable_claims"] += checkable == 0
                meta = {"scores_after": scores, "fixed": sum(hal.values()) < sum(ep.hallucinated.values()),
                        "checkable_claims_after": checkable,
                        "hallucinated_before": ep.hallucinated, "hallucinated_after": hal,
                        "refinement": ep.refinement, "critique": fb.critique, "judged_by": judge.name, "policy": pid,
                        "source_id": ep.sample.sample_id, "prompt_id": ep.prompt.id, "scene_id": ep.prompt.scene_id,
                        "task": ep.prompt.task, "feedback_source": ep.sample.scored_by}
                splits[ep.split].append(refinement_record(rid, ep.prompt.images, conv, text, ep.score, score, rnd,
                                                          scheme, meta, fcond))
                ep.conversation, ep.score, ep.hallucinated = conv + [text_turn("assistant", text)], score, hal
                if rnd == args.revisions:
                    continue
                if nothing_to_fix(fb.refinement):
                    stats["stop:nothing left to fix"] += 1
                    continue
                ep.refinement = fb.refinement.strip()
                nxt.append(ep)
            active = nxt

    extra = {"feedback": str(feedback), "weights": weights, "scheme": scheme.to_dict(),
             "revisions_asked": args.revisions, "policy": pid, "val_fraction": args.val_fraction,
             "judged_by": "oracle" if judge_path is None else getattr(judge, "name", "judge")}
    if judge_path is not None:
        extra.update(judge=str(judge_path), judge_class=args.judge_class, judge_questions=args.judge_questions)
    condition = scheme.to_dict()
    if isinstance(fcond, FeedbackCondition):
        fcond, how = resolve_good_feedback(fcond, splits)
        condition = fcond.to_dict()
        extra.update(condition=condition, good_feedback=how)
    elif fcond is not None:  # none: condition.json says so; the rating levels stay in the report only
        condition = fcond.to_dict()
        extra.update(condition=condition)
    else:
        extra.update(condition={"mode": "rating", **condition})
    seconds = time.perf_counter() - t0
    rep = build_report(summarize(splits, scheme), stats, rejects, seconds, extra)
    md = report_md(rep, scheme)
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        for split, rows in splits.items():
            atomic_write_jsonl(st.path / split / "sft.jsonl", rows)
            for k in KINDS:
                st.count(f"{split}/{k}", sum(r["kind"] == k for r in rows))
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        atomic_write_text(st.path / "condition.json", json.dumps(condition, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(st.path / "report.md", md)
        st.count("feedback_records", stats["feedback_records"])
        st.count("without_refinement", stats["without_refinement"])
        st.count("rejected", len(rejects))
        st.info.update(scheme=scheme.to_dict(), condition=condition, policy=pid)
    print(md)
    print(f"{STAGE}: {rep['records']['total']['total']} records ({rep['records']['total']['train']} train, "
          f"{rep['records']['total']['val']} val) in {seconds:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
