"""The ``feedback`` stage: label sampled responses with a feedback source.

    python -m data_pipelines.feedback --responses runs/demo/sample --data runs/demo/data \\
        --source judge --judge runs/demo/judge/model --out runs/demo/feedback

Sources (one interface, ``mmalign.feedback.FeedbackSource``):

* ``oracle``: checks every claim against the scene graph (``mmalign.oracle.WorldOracle``); exact,
  the ground truth the others are measured against;
* ``judge``: a judge model checks each claim (``models.feedback_sources.VLMJudgeSource``; any
  image-text-to-text checkpoint, ``--judge``): against its own description of the image
  (``--judge-questions caption``, the default, which also scores helpfulness: the share of the
  described objects the answer refers to), by content questions (``lookup``) or yes/no questions
  (``yesno``);
* ``detector``: a zero-shot object detector checks object existence
  (``models.feedback_sources.DetectorSource``, ``--detector``).

Each response is split into segments (``mmalign.segments``, ``--segmentation``: ``released``, the
splitter of the released FGAIF / Fine-Grained RLHF code and the default, or ``fine``, one segment
per object phrase; the choice is written into every record's ``annotations.segmentation`` and the
manifest, and the fine-grained reward models and PPO refuse labels cut another way); each segment
gets an object /
attribute / relation label (hallucinated, correct, n/a), the response scores (faithfulness, and
helpfulness where the source can tell) and DRESS-style critique and refinement text.

Scale-out: the responses are labelled in chunks of ``--chunk-size`` (one ``annotate`` call each,
so a judge batches its questions within a chunk); chunk ``c`` goes to rank ``c % N`` under
``python -m torch.distributed.run --nproc_per_node N -m data_pipelines.feedback ...`` (or
``--shard I/N``), and rank 0 merges in input order: the output is the same on any number of ranks
(:mod:`mmalign.shard`). The agreement report is computed once, on rank 0, over all responses.

Output (atomic, with ``manifest.json``): ``feedback.jsonl`` (the annotated-response records with
``annotations`` filled), ``rejects.jsonl`` (input lines that could not be read, with the reason),
``report.json`` / ``report.md``: the segmentation, segments per response, label counts per type and, whenever scene graphs exist and the
source is not the oracle, the source's agreement with the oracle per label type (precision and
recall of "hallucinated" over segments, with 95% bootstrap intervals).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mmalign.feedback import (
    HALLUCINATION_TYPES,
    FeedbackItem,
    check_feedback,
    feedback_from_json,
    feedback_to_json,
    prompt_text,
)
from mmalign.records import ReadReport, read_records
from mmalign.scene_io import load_scenes
from mmalign.segments import DEFAULT_SEGMENTATION, check_segmentation, split_segments
from mmalign.shard import add_shard_args
from mmalign.shard import setup as shard_setup
from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
)
from mmalign.tables import pct_ci

STAGE = "feedback"
SOURCES = {"oracle": None, "judge": "models.feedback_sources.VLMJudgeSource",
           "detector": "models.feedback_sources.DetectorSource"}


def agreement(source_fb: list, oracle_fb: list) -> dict[str, Any]:
    """Per type: how the source's segment labels compare with the oracle's.

    Over segments the oracle labels (not "n/a"): TP = both say hallucinated, FP = only the
    source does, FN = only the oracle does. precision = TP/(TP+FP), recall = TP/(TP+FN), with
    95% bootstrap intervals over *responses* (the segments of one response are not independent).
    Both sides segment the same text with the same segmenter, so segments align by index.
    """
    from mmalign.metrics import bootstrap_ratio_ci

    out: dict[str, Any] = {}
    for t in HALLUCINATION_TYPES:
        per = {"tp": [], "fp": [], "fn": [], "agree": [], "n": []}
        for s, o in zip(source_fb, oracle_fb):
            c = Counter()
            for ss, os_ in zip(s.segments or [], o.segments or []):
                ol, sl = os_.labels[t], ss.labels[t]
                if ol == "n/a":
                    continue
                c["n"] += 1
                c["agree"] += (sl == ol)
                c["tp"] += (sl == "hallucinated" and ol == "hallucinated")
                c["fp"] += (sl == "hallucinated" and ol != "hallucinated")
                c["fn"] += (sl != "hallucinated" and ol == "hallucinated")
            for k, column in per.items():
                column.append(c[k])
        res: dict[str, Any] = {k: int(sum(v)) for k, v in per.items()}
        if res["n"]:
            for name, num, den in (("precision", per["tp"], [a + b for a, b in zip(per["tp"], per["fp"])]),
                                   ("recall", per["tp"], [a + b for a, b in zip(per["tp"], per["fn"])]),
                                   ("accuracy", per["agree"], per["n"])):
                if sum(den):
                    v, lo, hi = bootstrap_ratio_ci(num, den, n_boot=1000)
                    res[name] = {"value": v, "low": lo, "high": hi}
        out[t] = res
    return out


def label_counts(fbs: list) -> dict[str, Any]:
    counts: dict[str, Any] = {t: Counter() for t in HALLUCINATION_TYPES}
    any_hal = Counter()
    no_segments = 0
    n_segments = 0
    for fb in fbs:
        if not fb.segments:
            no_segments += 1
            continue
        n_segments += len(fb.segments)
        for t in HALLUCINATION_TYPES:
            labels = [s.labels[t] for s in fb.segments]
            counts[t].update(labels)
            any_hal[t] += "hallucinated" in labels
    return {"segments": {t: dict(c) for t, c in counts.items()},
            "responses_with_hallucination": dict(any_hal),
            "responses": len(fbs), "responses_without_segments": no_segments,
            "segments_total": n_segments, "segments_per_response": n_segments / len(fbs) if fbs else 0.0}


def check_segmentation_of(items: list[FeedbackItem], fbs: list, segmentation: str) -> None:
    """Every feedback's segments tile its response exactly as ``segmentation`` cuts it: a source
    that ignored the stage's ``--segmentation`` (or a custom one with its own splitter) would
    write labels that the reward models and PPO read at other positions. An error names the item."""
    for it, fb in zip(items, fbs):
        if fb.segments is None:
            continue
        got = [(s.start, s.end) for s in fb.segments]
        want = [(s.start, s.end) for s in split_segments(it.response, segmentation)]
        if got != want:
            raise ValueError(f"{STAGE}: item {it.id!r}: the source's segments {got} are not the "
                             f"{segmentation!r} segmentation of the response {want}; does the source take "
                             "`segmentation`?")


def report_md(source: str, counts: dict, agree: dict | None, segmentation: str = DEFAULT_SEGMENTATION) -> str:
    lines = [f"# Feedback from `{source}`", "", (f"{counts['responses']} responses "
             f"({counts['responses_without_segments']} without any segment); segmentation `{segmentation}`, "
             f"{counts.get('segments_per_response', 0.0):.2f} segments per response."), "",
             "| type | hallucinated | correct | n/a | responses with a hallucination |", "|---|---|---|---|---|"]
    for t in HALLUCINATION_TYPES:
        c = counts["segments"][t]
        lines.append(f"| {t} | {c.get('hallucinated', 0)} | {c.get('correct', 0)} | {c.get('n/a', 0)} | "
                     f"{counts['responses_with_hallucination'].get(t, 0)} |")
    if agree:
        lines += ["", "Agreement with the oracle (segments the oracle labels; \"hallucinated\" is positive):", "",
                  "| type | segments | precision | recall | accuracy |", "|---|---|---|---|---|"]
        for t in HALLUCINATION_TYPES:
            a = agree[t]
            lines.append(f"| {t} | {a['n']} | {pct_ci(a.get('precision'))} | {pct_ci(a.get('recall'))} | "
                         f"{pct_ci(a.get('accuracy'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", required=True, type=Path, help="the sample stage's folder (responses.jsonl)")
    ap.add_argument("--data", required=True, type=Path, help="the data stage's folder (images; scene graphs if any)")
    ap.add_argument("--source", choices=sorted(SOURCES), default="oracle")
    ap.add_argument("--judge", type=Path, help="judge checkpoint folder (--source judge)")
    ap.add_argument("--detector", type=Path, help="zero-shot detector checkpoint folder (--source detector)")
    ap.add_argument("--source-class", help="override the class path of the judge/detector source")
    ap.add_argument("--teacher", type=Path,
                    help="optional teacher language model (folder) that rewrites critique and refinement from the "
                         "labels, as DRESS prompts GPT-4; prompts in --teacher-prompts")
    ap.add_argument("--teacher-prompts", default="configs/feedback/teacher.yaml")
    ap.add_argument("--judge-questions", choices=("caption", "lookup", "yesno"), default="caption",
                    help="how the judge verifies a claim: against its own description of the image ('caption'), "
                         "by content questions compared in code ('lookup', TIFA-style: 'What color is the star?') or "
                         "by the claim's yes/no question ('yesno': 'Is there a star?'); docs/TESTBED.md has each "
                         "one's agreement with the oracle")
    ap.add_argument("--segmentation", default=DEFAULT_SEGMENTATION,
                    help="how responses are cut into labelled segments: 'released' (the released FGAIF / "
                         "Fine-Grained RLHF splitter: spaCy sentences, then a cut after , ; ! ? only with >= 5 words "
                         "before and > 5 after), 'released:<spaCy pipeline name or folder>' (the same with that "
                         "pipeline's sentences, e.g. en_core_web_sm as the release loads), or 'fine' (one segment per "
                         "object phrase)")
    ap.add_argument("--batch-size", type=int, default=64, help="questions per judge call")
    ap.add_argument("--chunk-size", type=int, default=64,
                    help="responses per annotate call, the unit of work a rank takes (a judge batches the questions "
                         "of one chunk; the output depends on it, not on the number of ranks)")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    ap.add_argument("--no-progress", action="store_true")
    add_shard_args(ap)
    args = ap.parse_args(argv)
    if args.chunk_size < 1:
        ap.error("--chunk-size must be >= 1")
    try:
        args.segmentation = check_segmentation(args.segmentation)
    except ValueError as e:
        ap.error(str(e))
    model = {"judge": args.judge, "detector": args.detector}.get(args.source)
    if args.source != "oracle" and model is None:
        ap.error(f"--source {args.source} needs --{args.source} <checkpoint folder>")
    responses = args.responses / "responses.jsonl" if args.responses.is_dir() else args.responses
    config = {"source": args.source, "model": str(model) if model else None, "source_class": args.source_class,
              "teacher": str(args.teacher) if args.teacher else None,
              "teacher_prompts": args.teacher_prompts if args.teacher else None, "chunk_size": args.chunk_size,
              "judge_questions": args.judge_questions if args.source == "judge" else None,
              "segmentation": args.segmentation}
    inputs = [responses, args.data] + ([model / "config.json", *sorted(model.glob("*.safetensors"))] if model else [])
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    shard = shard_setup(args)
    try:
        return _run(ap, args, config, inputs, responses, model, shard)
    finally:
        shard.close()


def _run(ap, args, config: dict, inputs: list, responses: Path, model: Path | None, shard) -> int:
    from tqdm.auto import tqdm

    from mmalign.oracle import WorldOracle

    scenes = load_scenes(args.data)
    parts = shard.parts(args.out, STAGE, config, inputs)
    # Rank 0 owns the output; the other ranks read the same records and put their copy of the
    # rejects beside their parts (removed with them).
    out_ctx = StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) if shard.is_main \
        else contextlib.nullcontext()
    with out_ctx as st:
        rejects_path = st.path / "rejects.jsonl" if st is not None else parts.folder / f"rejects.rank{shard.rank}.jsonl"
        # Skipped lines go to rejects.jsonl and their count to the manifest and the printout:
        # never lost silently.
        read_rep = ReadReport(str(responses))
        recs = read_records(responses, "annotated", data_root=args.data, check_images="exists", on_error="skip",
                            rejects_path=rejects_path, report=read_rep)
        items = [FeedbackItem(id=r.id, prompt=prompt_text(r.prompt), response=r.response,
                              image=r.images[0] if r.images else None, reference=r.meta.get("reference"),
                              meta={"scene_id": r.meta.get("scene_id")}) for r in recs]
        oracle = WorldOracle(scenes, segmentation=args.segmentation) if scenes else None
        if args.source == "oracle":
            if oracle is None:
                ap.error(f"--source oracle needs scene graphs (<data>/<split>/scenes.jsonl) under {args.data}")
            source = oracle
        else:
            from mmalign.components import load_component

            kwargs: dict[str, Any] = {"path": str(model), "trust_remote_code": args.trust_remote_code,
                                      "segmentation": args.segmentation}
            if args.source == "judge":
                # one bar over the chunks below instead of one per annotate call
                kwargs.update(batch_size=args.batch_size, progress=False, questions=args.judge_questions)
            source = load_component(args.source_class or SOURCES[args.source], **kwargs)
        teacher = None
        if args.teacher:
            from mmalign.components import load_component

            teacher = load_component("models.feedback_sources.TeacherCritic", path=str(args.teacher),
                                     prompt_file=args.teacher_prompts, trust_remote_code=args.trust_remote_code)
        n_mine = shard.items_mine(len(items), args.chunk_size)
        with tqdm(total=n_mine, desc=f"feedback ({source.name})", unit="resp", file=sys.stderr, dynamic_ncols=True,
                  disable=args.no_progress or not shard.is_main) as bar:
            def annotate(_: int, chunk: list[FeedbackItem]) -> list[dict]:
                fbs = check_feedback(chunk, source.annotate(chunk))
                if teacher is not None:
                    fbs = check_feedback(chunk, teacher.rewrite_all(chunk, fbs))
                bar.update(len(chunk))
                return [feedback_to_json(fb) for fb in fbs]

            merged = parts.map("feedback", items, args.chunk_size, annotate)
        if merged is None:  # not rank 0: its part is written, rank 0 merges
            print(f"{STAGE}: {shard}: {n_mine} responses labelled, rank 0 writes {args.out}", file=sys.stderr)
            return 0
        fbs = check_feedback(items, [feedback_from_json(d) for d in merged.results])
        check_segmentation_of(items, fbs, args.segmentation)
        agree = None
        if oracle is not None and source is not oracle:
            ofb = oracle.annotate(items)
            agree = agreement(fbs, ofb)
        counts = label_counts(fbs)
        root = args.data.resolve()
        rows = []
        for r, fb in zip(recs, merged.results):
            row = r.to_json()
            row["images"] = [str(Path(p).resolve().relative_to(root)) for p in r.images]
            row["annotations"] = {"source": source.name, "segmentation": args.segmentation, **fb}
            if args.teacher:
                row["annotations"]["critique_by"] = str(args.teacher)
            rows.append(row)
        atomic_write_jsonl(st.path / "feedback.jsonl", rows)
        report = {"source": source.name, "segmentation": args.segmentation, "counts": counts,
                  "agreement_with_oracle": agree}
        atomic_write_text(st.path / "report.json", json.dumps(report, indent=2) + "\n")
        md = report_md(source.name, counts, agree, args.segmentation)
        atomic_write_text(st.path / "report.md", md)
        st.count("responses", len(rows))
        st.count("rejected", read_rep.rejected)
        if read_rep.rejected:
            print(f"{STAGE}: {read_rep.rejected} unreadable response line(s) skipped -> {args.out / 'rejects.jsonl'}",
                  file=sys.stderr)
        for t in HALLUCINATION_TYPES:
            for label, n in counts["segments"][t].items():
                st.count(f"segments/{t}/{label}", n)
        st.info["ranks"] = shard.world
        st.info["segmentation"] = args.segmentation
    parts.cleanup()
    print(md)
    print(f"-> {args.out / 'feedback.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
