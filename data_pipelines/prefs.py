"""The ``prefs`` stage: ranked responses per prompt and every preference pair among them (MM-RLHF).

    python -m data_pipelines.prefs --feedback runs/demo/feedback/oracle --data runs/demo/data \\
        --out runs/demo/prefs [--inject-per-prompt 2] [--include-reference] [--val-fraction 0.1] \\
        [--weights faithfulness=0.7,helpfulness=0.3] [--min-margin 0] [--seed 0] \\
        [--inject-scoring auto|oracle|parent|judge] [--judge runs/demo/judge/model [--judge-questions caption]]

MM-RLHF (Zhang et al. 2025, "MM-RLHF: The Next Step Forward in Multimodal LLM Alignment") ranks
several responses to one (image, prompt) by per-dimension scores and trains MM-DPO on *every*
ranked pair with a strict preference, not only best against worst. This stage builds that data
from the feedback stage:

* the policy's own samples (``source: "sample"``) with the scores, critique and refinement the
  feedback source gave them;
* ``--inject-per-prompt`` extra, worse responses per prompt (``source: "inject:<kind>"``):
  :func:`mmalign.inject.inject` adds one object / attribute / relation hallucination to a sample
  (the best-scored one it can edit; kinds rotate per prompt, drawn with a per-prompt rng
  seeded by ``--seed`` and the prompt id), so the pair (sample, injected copy) differs only in
  that hallucination;
* with ``--include-reference``, the data set's reference answer (``source: "reference"``).

Scores. When the feedback source is the oracle, injected and reference responses are scored by
the same :class:`mmalign.oracle.WorldOracle` on the prompt's scene graph, so one ranking has one
scale. With another source (a judge), ``--inject-scoring parent`` (the ``auto`` choice then)
gives an injected response its parent's scores from that source moved by the oracle's change
between parent and copy, so a copy never outranks the sample it was made from because of a
scale difference; ``oracle`` uses the oracle's scores as they are. ``--inject-scoring judge``
(the ``auto`` choice when ``--judge PATH`` is given and every sample was scored by the judge) has
that judge model annotate the injected copies (and the reference): all of them are collected
first and judged in one ``annotate`` call (one more call per retry round below), so a judge-fed
ranking has one scale and no oracle score; ``scored_by`` is then ``"judge"``. The judge is loaded
by ``--judge-class`` (default :class:`models.feedback_sources.VLMJudgeSource`) with
``--judge-questions`` (default ``caption``, the one mode that gives ``helpfulness``, which the
default ``--weights`` use). The injection itself still needs the scene graph (it picks what is
absent from the scene); a copy the judge does not score below its parent is dropped, as under
the oracle, and the slot tries its next candidate (kind, parent) in the next round. Every
response records ``scored_by``. ``overall`` = weighted mean of the ``--weights`` dimensions
(rounded to 1e-10, so float noise never makes a preference). Identical texts (after stripping) are kept once per
prompt; a tie in ``overall`` makes no pair, nor does a margin under ``--min-margin``.

Output (atomic, with ``manifest.json`` holding the input hashes, so an unchanged re-run is
skipped):

* ``ranked.jsonl``: one record per prompt: ``id``, ``images``, ``prompt``, ``split``,
  ``scene_id``, ``task`` and ``responses`` best first, each ``{"text", "source", "scores",
  "overall", "critique", "refinement", "scored_by"}`` (+ ``sample_id``, or ``injection`` with
  the kind, the changed span and ``parent_rank``);
* ``train/pairs.jsonl``, ``val/pairs.jsonl``: :class:`mmalign.records.PreferenceRecord` s, one
  per pair ``(i, j)`` of :func:`mmalign.losses.dpo.all_pairs` over the ranking, id
  ``<prompt id>-<i>-<j>`` with ``i``, ``j`` = positions in the ranking (0 = best), plus meta
  ``prompt_id``, ``chosen_rank``, ``rejected_rank``, ``scores_*``, ``critique_*``, ``source_*``,
  ``task``. A prompt goes wholly to val when a hash of its id falls under ``--val-fraction``;
  the split does not depend on the seed, so it is stable across runs;
* ``report.json`` / ``report.md``: prompts, responses per source, injections made and why some
  could not be, pairs per split, who is chosen (sample / injected / reference), margins, score
  distributions per source;
* ``rejects.jsonl``: input lines that could not be used (``--on-error skip``), with the reason.

A line that cannot be used (malformed JSON or record, no feedback, a weighted score missing, no
scene graph for its image when one is needed) stops the stage with ``file:line: what is wrong``,
or with ``--on-error skip`` goes to ``rejects.jsonl`` and is counted. A NaN or infinite score is
always an error: it means the feedback source is broken, and dropping such lines would bias the
data towards the responses it could score.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from mmalign.feedback import FeedbackItem, check_feedback
from mmalign.feedback_io import (
    Prompt,
    Response,
    add_judge_arguments,
    judge_stage_config,
    load_judge,
    read_feedback,
    weigh_feedback,
    weighted_scores,
)
from mmalign.inject import INJECTION_KINDS, try_inject
from mmalign.ranking import (
    distribution,
    overall,
    parse_stage_args,
    parse_weights,  # noqa: F401  (re-exported: prefs.parse_weights is this stage's --weights parser)
    rank,
    ranked_pairs,
    split_of,  # no seed here: the split does not depend on --seed
)
from mmalign.records import RecordError
from mmalign.scene_io import load_scenes
from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
)

STAGE = "prefs"
SOURCES = ("sample", *(f"inject:{k}" for k in INJECTION_KINDS), "reference")
DEFAULT_WEIGHTS = "faithfulness=0.7,helpfulness=0.3"
INJECT_SCORING = ("auto", "oracle", "parent", "judge")


# ---------------------------------------------------------------------------------------------
# ranking


def _oracle_feedback(oracle, p: Prompt, text: str, rid: str):
    return oracle.feedback(p.feedback_item(text, rid), p.scene)


def _candidates(p: Prompt, parents: list[Response], order: list[str], k: int, rng: random.Random,
                texts: set[str], stats: dict[str, Counter]):
    """Injected copies for slot ``k``, lazily, in the order they are tried: the kinds rotated by
    ``k``, for each kind the parents best first; yields ``(kind, parent, injection)``. A kind
    that cannot be injected into a parent, or a copy whose text is already in ``texts``, is
    counted in ``stats["inject_failed"]`` and passed over."""
    for kind in order[k % len(order):] + order[:k % len(order)]:
        for parent in parents:
            inj = try_inject(parent.text, p.scene, kind, rng, stats["inject_failed"])
            if inj is None:
                continue
            if inj.text.strip() in texts:
                stats["inject_failed"][f"{kind}: same text as a response already there"] += 1
                continue
            yield kind, parent, inj


def _injected(kind: str, inj, parent: Response, sc: dict[str, float], ov: float, fb, scored_by: str) -> Response:
    return Response(inj.text, f"inject:{kind}", sc, ov, fb.critique, fb.refinement, scored_by,
                    injection={"kind": kind, "original": inj.original, "replacement": inj.replacement,
                               "start": inj.start, "end": inj.end},
                    parent=parent)


class _PromptState:
    """A prompt's responses while its ranking is built: samples first, then the reference, then
    injected copies, each text once; the injection rng and the parents."""

    def __init__(self, p: Prompt, seed: int, kinds: list[str], stats: dict[str, Counter]):
        self.p, self.stats = p, stats
        self.responses: list[Response] = []
        self.texts: set[str] = set()
        for s in p.samples:
            self.add(s)
        # per-prompt rng: the result for a prompt does not depend on the other prompts or their order
        self.rng = random.Random(f"{seed}:{p.id}")
        self.order = list(kinds)
        self.rng.shuffle(self.order)

    def add(self, r: Response) -> bool:
        key = r.text.strip()
        if key in self.texts:
            self.stats["duplicates_dropped"][r.source] += 1
            return False
        self.texts.add(key)
        self.responses.append(r)
        return True

    def parents(self) -> list[Response]:
        # best sample first: it has the most correct claims to corrupt, and its copy then differs
        # from the top of the ranking by exactly one hallucination
        return rank(r for r in self.responses if r.source == "sample")

    def below_parent(self, kind: str, ov: float, parent: Response) -> bool:
        if ov < parent.overall:
            return True
        # e.g. a parent whose every claim is already false: one more false claim leaves
        # faithfulness at 0, and a copy that ties its parent is no worse response
        self.stats["inject_failed"][f"{kind}: the copy does not score below its parent"] += 1
        return False

    def ranked(self, n_inject: int) -> list[Response]:
        if sum(r.source.startswith("inject:") for r in self.responses) < n_inject:
            self.stats["prompts"]["short_of_injections"] += 1
        return rank(self.responses)  # stable: ties keep construction order


def rank_prompt(p: Prompt, oracle, weights: dict[str, float], n_inject: int, kinds: list[str],
                include_reference: bool, inject_scoring: str, seed: int, stats: dict[str, Counter]) -> list[Response]:
    """The prompt's responses (samples, reference, injected copies), deduplicated, best first,
    the added ones scored by the oracle (``inject_scoring`` "oracle" or "parent"; for "judge"
    see :func:`rank_prompts_judged`).

    Ties keep their order of construction (samples in file order, the reference, then injected
    copies), so the ranking is deterministic.
    """
    st = _PromptState(p, seed, kinds, stats)
    if include_reference:
        if p.reference is None:
            stats["prompts"]["without_reference"] += 1
        else:
            fb = _oracle_feedback(oracle, p, p.reference, f"{p.id}-reference")
            sc, ov = weighted_scores(fb.scores, weights, f"{p.where} (reference of prompt {p.id!r})")
            st.add(Response(p.reference, "reference", sc, ov, fb.critique, fb.refinement, "oracle"))
    parents = st.parents()
    for k in range(n_inject):
        for kind, parent, inj in _candidates(p, parents, st.order, k, st.rng, st.texts, stats):
            fb = _oracle_feedback(oracle, p, inj.text, f"{p.id}-inject{k}")
            where = f"{p.where} (injected copy of {parent.sample_id!r})"
            sc, ov = weighted_scores(fb.scores, weights, where)
            scored_by = "oracle"
            if inject_scoring == "parent":
                pfb = _oracle_feedback(oracle, p, parent.text, f"{p.id}-parent{k}")
                psc, _ = weighted_scores(pfb.scores, weights, where)
                sc = {d: parent.scores[d] + sc[d] - psc[d] for d in weights}
                ov = overall(sc, weights, ndigits=10)
                scored_by = f"{parent.scored_by}+oracle-delta"
            if st.below_parent(kind, ov, parent):
                st.add(_injected(kind, inj, parent, sc, ov, fb, scored_by))
                stats["injected"][kind] += 1
                break
    return st.ranked(n_inject)


def _judge_scores(judge, items: list[FeedbackItem], wheres: list[str], weights: dict[str, float]) -> list[tuple]:
    """``(feedback, weighted scores, overall)`` of each item by the judge, in one ``annotate`` call."""
    if not items:
        return []
    return weigh_feedback(check_feedback(items, judge.annotate(items), judge.name), wheres, weights,
                          "the judge", "--weights with --inject-scoring judge")


def rank_prompts_judged(prompts: list[Prompt], judge, weights: dict[str, float], n_inject: int, kinds: list[str],
                        include_reference: bool, seed: int, stats: dict[str, Counter]) -> list[list[Response]]:
    """:func:`rank_prompt` for every prompt with the added responses scored by ``judge``, batched.

    Round 1 collects, over all prompts, the reference and the first candidate copy of every
    injection slot (as :func:`rank_prompt` tries them) and has the judge annotate them in one
    call; a copy the judge does not score below its parent is dropped and its slot's next
    candidate goes into the next round's call, until every slot is filled or out of candidates.
    """
    states = [_PromptState(p, seed, kinds, stats) for p in prompts]
    parents = [st.parents() for st in states]  # the samples only: fixed before anything is added
    slots = [{k: _candidates(st.p, ps, st.order, k, st.rng, st.texts, stats) for k in range(n_inject)}
             for st, ps in zip(states, parents)]
    asks: list[tuple] = []  # (prompt index, slot or None for the reference, kind, parent, injection, item, where)
    for i, st in enumerate(states):
        p = st.p
        if not include_reference:
            continue
        if p.reference is None:
            stats["prompts"]["without_reference"] += 1
        elif p.reference.strip() in st.texts:
            stats["duplicates_dropped"]["reference"] += 1
        else:
            st.texts.add(p.reference.strip())  # a copy with the reference's text is a duplicate too
            asks.append((i, None, None, None, None, p.feedback_item(p.reference, f"{p.id}-reference"),
                         f"{p.where} (reference of prompt {p.id!r})"))
    rnd = 0
    while True:
        rnd += 1
        for i, st in enumerate(states):
            for k, cands in list(slots[i].items()):
                got = next(cands, None)
                if got is None:  # out of candidates: the prompt is short of this injection
                    del slots[i][k]
                    continue
                kind, parent, inj = got
                st.texts.add(inj.text.strip())  # pending: another slot's copy must not repeat it
                asks.append((i, k, kind, parent, inj, st.p.feedback_item(inj.text, f"{st.p.id}-inject{k}-round{rnd}"),
                             f"{st.p.where} (injected copy of {parent.sample_id!r})"))
        if not asks:
            break
        scored = _judge_scores(judge, [a[5] for a in asks], [a[6] for a in asks], weights)
        for (i, k, kind, parent, inj, _it, _w), (fb, sc, ov) in zip(asks, scored):
            st = states[i]
            if k is None:
                st.texts.discard(st.p.reference.strip())
                st.add(Response(st.p.reference, "reference", sc, ov, fb.critique, fb.refinement, judge.name))
            elif st.below_parent(kind, ov, parent):
                st.texts.discard(inj.text.strip())
                st.add(_injected(kind, inj, parent, sc, ov, fb, judge.name))
                stats["injected"][kind] += 1
                del slots[i][k]
            else:
                st.texts.discard(inj.text.strip())
        asks = []
    return [st.ranked(n_inject) for st in states]


def pairs_of(p: Prompt, ranked: list[Response], min_margin: float) -> list[dict]:
    """Every strict-preference pair (all_pairs over the ranking) as PreferenceRecord JSON."""
    return [rec.to_json() for rec in ranked_pairs(p.id, p.images, p.prompt, ranked, min_margin=min_margin,
                                                   meta={"task": p.task})]


# ---------------------------------------------------------------------------------------------
# report


def _kind_of(source: str) -> str:
    return "injected" if source.startswith("inject:") else source


def _dist(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    d = distribution(values, ndigits=4)
    return {"n": d["n"], "mean": d["mean"], **d}  # this report's key order: n, mean, min, ...


def build_report(ranked: list[tuple[Prompt, list[Response], str]], pairs: dict[str, list[dict]],
                 stats: dict[str, Counter], rejects: list[dict], weights: dict[str, float], seconds: float) -> dict:
    per_source: dict[str, list[Response]] = defaultdict(list)
    for _p, rs, _s in ranked:
        for r in rs:
            per_source[r.source].append(r)
    all_pairs_ = [x for v in pairs.values() for x in v]
    chosen = Counter(_kind_of(x["source_chosen"]) for x in all_pairs_)
    matchups = Counter(f"{_kind_of(x['source_chosen'])} > {_kind_of(x['source_rejected'])}" for x in all_pairs_)
    margins = {s: [x["score_chosen"] - x["score_rejected"] for x in v] for s, v in pairs.items()}
    n_pairs = len(all_pairs_)
    return {
        "weights": weights,
        "prompts": {"total": len(ranked), "train": sum(s == "train" for *_x, s in ranked),
                    "val": sum(s == "val" for *_x, s in ranked),
                    "without_pairs": sum(1 for _p, rs, _s in ranked if len({r.overall for r in rs}) < 2),
                    **dict(stats["prompts"])},
        "responses": {"total": sum(len(v) for v in per_source.values()),
                      **{s: len(per_source[s]) for s in SOURCES if per_source[s]}},
        "duplicates_dropped": dict(stats["duplicates_dropped"]),
        "scored_by": dict(Counter(r.scored_by for v in per_source.values() for r in v)),
        "injections": {"made": dict(stats["injected"]), "failed_attempts": dict(sorted(stats["inject_failed"].items()))},
        "pairs": {"total": n_pairs, **{s: len(v) for s, v in pairs.items()}},
        "chosen_is": {k: {"pairs": n, "share": round(n / n_pairs, 4)} for k, n in sorted(chosen.items())},
        "matchups": dict(sorted(matchups.items())),
        "margin": {s: _dist(m) for s, m in margins.items()},
        "mean_margin": round(statistics.fmean([m for v in margins.values() for m in v]), 4) if n_pairs else None,
        "scores": {s: {"overall": _dist([r.overall for r in per_source[s]]),
                       **{d: _dist([r.scores[d] for r in per_source[s]]) for d in weights}}
                   for s in SOURCES if per_source[s]},
        "rejects": {"total": len(rejects), "reasons": dict(Counter(r["reason"] for r in rejects))},
        "seconds": round(seconds, 2),
    }


def report_md(rep: dict) -> str:
    pr, pa = rep["prompts"], rep["pairs"]
    w = ", ".join(f"{d} {v:g}" for d, v in rep["weights"].items())
    lines = ["# Preference data (MM-RLHF ranking, all pairs)", "",
             (f"{pr['total']} prompts ({pr['train']} train, {pr['val']} val; {pr['without_pairs']} without any "
              f"pair), {rep['responses']['total']} responses, {pa['total']} pairs ({pa.get('train', 0)} train, "
              f"{pa.get('val', 0)} val), mean margin {rep['mean_margin']}. Overall = weighted mean ({w})."), "",
             "| source | responses | overall mean | min | median | max |", "|---|---|---|---|---|---|"]
    for s, d in rep["scores"].items():
        o = d["overall"]
        lines.append(f"| {s} | {o['n']} | {o['mean']:.3f} | {o['min']:.3f} | {o['median']:.3f} | {o['max']:.3f} |")
    lines += ["", "| chosen is | pairs | share |", "|---|---|---|"]
    lines += [f"| {k} | {v['pairs']} | {v['share']:.1%} |" for k, v in rep["chosen_is"].items()]
    lines += ["", "| chosen > rejected | pairs |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rep["matchups"].items()]
    inj = rep["injections"]
    short = pr.get("short_of_injections", 0)
    lines += ["", (f"Injected copies (each scores below its parent sample): {inj['made'] or 'none'}; "
                   f"{short} prompts got fewer than asked.")]
    if inj["failed_attempts"]:
        lines += ["", "Injection attempts that gave no usable copy (the next sample or kind was tried then):", ""]
        lines += [f"- {k}: {v}" for k, v in inj["failed_attempts"].items()]
    if rep["duplicates_dropped"]:
        lines += ["", f"Identical texts kept once: dropped {rep['duplicates_dropped']}."]
    lines += ["", f"Scored by: {rep['scored_by']}. Rejected input lines: {rep['rejects']['total']} "
              f"{rep['rejects']['reasons'] or ''}".rstrip() + f". {rep['seconds']} s."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feedback", required=True, type=Path,
                    help="the feedback stage's folder (feedback.jsonl) or an annotated-response JSONL file")
    ap.add_argument("--data", required=True, type=Path,
                    help="the data stage's folder: image root and <split>/scenes.jsonl scene graphs")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--inject-per-prompt", type=int, default=2,
                    help="hallucination-injected copies of a sample to add per prompt (0 = none; default 2)")
    ap.add_argument("--kinds", nargs="+", choices=INJECTION_KINDS, default=list(INJECTION_KINDS),
                    help="injection kinds to rotate through (default: all)")
    ap.add_argument("--inject-scoring", choices=INJECT_SCORING, default="auto",
                    help="how injected copies (and the reference) are scored: oracle = the world oracle's scores; "
                         "parent = the parent sample's scores moved by the oracle's change; judge = annotated by "
                         "the --judge model; auto = oracle when the feedback source is the oracle, judge when it is "
                         "the judge and --judge is given, else parent")
    ap.add_argument("--include-reference", action="store_true",
                    help="add the data set's reference answer as a response (scored like the injected copies: by "
                         "the oracle, or by the judge with --inject-scoring judge)")
    add_judge_arguments(ap, "judge checkpoint folder (--inject-scoring judge)")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS,
                    help=f"score dimensions and their weights in the overall score (default {DEFAULT_WEIGHTS})")
    ap.add_argument("--min-margin", type=float, default=0.0,
                    help="least overall-score difference that makes a pair (default 0: any strict preference)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of prompts (by id hash) for val")
    ap.add_argument("--seed", type=int, default=0, help="seeds the injections (with each prompt id)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="an unusable input line: stop with file:line (raise) or write it to rejects.jsonl (skip)")
    args, weights = parse_stage_args(ap, argv)
    if args.inject_per_prompt < 0 or not 0 <= args.val_fraction < 1 or not args.min_margin >= 0:
        ap.error("need --inject-per-prompt >= 0, 0 <= --val-fraction < 1 and --min-margin >= 0")
    feedback = args.feedback / "feedback.jsonl" if args.feedback.is_dir() else args.feedback
    if not feedback.is_file():
        ap.error(f"--feedback {args.feedback}: no feedback.jsonl there")
    if args.inject_scoring == "judge" and args.judge is None:
        ap.error("--inject-scoring judge needs --judge <checkpoint folder>")
    judge_config, judge_inputs = judge_stage_config(ap, args, args.judge)
    config = {"weights": weights, "inject_per_prompt": args.inject_per_prompt, "kinds": args.kinds,
              "inject_scoring": args.inject_scoring, "include_reference": args.include_reference,
              "min_margin": args.min_margin, "val_fraction": args.val_fraction, "seed": args.seed,
              "on_error": args.on_error}
    inputs = [feedback, args.data]
    if judge_config is not None:  # without --judge the config and inputs are what they always were
        config["judge"] = judge_config
        inputs += judge_inputs
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    from mmalign.oracle import WorldOracle

    t0 = time.perf_counter()
    # the injection needs the scene (it picks what is absent from it); scoring needs it unless the judge scores
    need_scene = args.inject_per_prompt > 0 or (args.include_reference and args.inject_scoring != "judge")
    scenes = load_scenes(args.data) if need_scene else None
    if need_scene and not scenes:
        ap.error(f"injection and --include-reference need scene graphs (<data>/<split>/scenes.jsonl) under {args.data}; "
                 "use --inject-per-prompt 0 without them (and --inject-scoring judge for the reference)")
    oracle = WorldOracle(scenes) if scenes else None
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        rejects: list[dict] = []
        prompts = read_feedback(feedback, args.data, weights, scenes, args.on_error, rejects)
        if not prompts:
            raise RecordError(f"{feedback}: no usable annotated responses ({len(rejects)} rejected, see the errors)")
        sources = {s.scored_by for p in prompts for s in p.samples}
        scoring = args.inject_scoring
        if scoring == "auto":
            scoring = ("oracle" if sources == {"oracle"} else
                       "judge" if args.judge is not None and sources == {"judge"} else "parent")
        stats: dict[str, Counter] = defaultdict(Counter)
        ranked, pairs = [], {"train": [], "val": []}
        n_inject = args.inject_per_prompt if scenes else 0
        if scoring == "judge":
            judge = load_judge(args, args.judge)
            per_prompt = rank_prompts_judged(prompts, judge, weights, n_inject, args.kinds, args.include_reference,
                                             args.seed, stats)
        else:
            per_prompt = [rank_prompt(p, oracle, weights, n_inject, args.kinds, args.include_reference, scoring,
                                      args.seed, stats) for p in prompts]
        for p, rs in zip(prompts, per_prompt):
            split = split_of(p.id, args.val_fraction)
            ranked.append((p, rs, split))
            pairs[split] += pairs_of(p, rs, args.min_margin)
        atomic_write_jsonl(st.path / "ranked.jsonl", [
            {"id": p.id, "images": p.images, "prompt": p.prompt, "responses": [r.to_json(rs) for r in rs],
             "split": split, "scene_id": p.scene_id, "task": p.task} for p, rs, split in ranked])
        for split, rows in pairs.items():
            atomic_write_jsonl(st.path / split / "pairs.jsonl", rows)
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        seconds = time.perf_counter() - t0
        rep = build_report(ranked, pairs, stats, rejects, weights, seconds)
        rep["feedback_sources"] = sorted(sources)
        rep["inject_scoring"] = scoring
        if scoring == "judge":
            rep.update(judge=str(args.judge), judge_class=args.judge_class, judge_questions=args.judge_questions)
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2) + "\n")
        md = report_md(rep)
        atomic_write_text(st.path / "report.md", md)
        st.count("prompts", len(ranked))
        st.count("responses", rep["responses"]["total"])
        for split, rows in pairs.items():
            st.count(f"{split}/pairs", len(rows))
        st.count("rejected", len(rejects))
        st.info.update(feedback_sources=sorted(sources), inject_scoring=scoring)
    print(md)
    print(f"{STAGE}: {len(ranked)} prompts, {rep['responses']['total']} responses, {len(pairs['train'])} train / "
          f"{len(pairs['val'])} val pairs in {seconds:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
