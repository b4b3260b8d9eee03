"""The ``refine-bench`` stage: DRESS's refinement benchmark on held-out scenes.

    python -m data_pipelines.refine_bench --model runs/demo/dress/model --data runs/demo/data \\
        --split test --limit 200 --turns 2 --out runs/demo/refine/dress
    python -m data_pipelines.refine_bench compare runs/demo/refine/sft runs/demo/refine/dress \\
        --out runs/demo/refine/compare

DRESS (Chen et al., CVPR 2024) trains a model to *interact*: answer, receive natural-language
feedback, answer again. This stage measures that on held-out scenes with the scene-graph oracle
(:class:`mmalign.oracle.WorldOracle`) as the feedback source:

* turn 0: the detailed-caption prompt of the evaluation's world benchmark (``--prompt``, default
  "Describe the image in detail."), greedy; the oracle judges the caption (its false claims per
  type) and writes its refinement ("Remove the star. Call the circle red, not blue. Also mention
  the red circle.");
* turn k = 1 .. ``--turns``: the conversation so far -- caption prompt (with the image), answer 0,
  refinement 0, ..., answer k-1 -- plus a user turn holding the oracle's refinement of answer k-1
  (``--refine-template``, default the refinement text itself); greedy revision, judged again.

A scene whose latest answer has nothing to refine (the oracle says "No change is needed.": no
false claim and, by default, no scene object left unmentioned) is not asked again: its answer
and judgement are carried unchanged to the next turn, and counted.

Condition (DRESS's conditional training, :mod:`mmalign.conditions`): ``--condition TEXT``; by
default the best condition of the scheme saved beside the model (``dress_condition.json``) when
it has one -- for a feedback-conditioned model its good-feedback text ("Feedback: There is no
hallucination in the answer."), for a rating-conditioned one its best level -- else none;
``--no-condition`` turns that off. The condition goes before the text of
the user turn being answered only -- the caption prompt at turn 0 (as at inference and in
``mmalign eval``), the latest refinement at turn k (``with_condition(turn="last")``, the
refinement turn, as DRESS's refinement episodes are trained); earlier turns are plain history.

Metrics, per turn, over the N scenes (each with a 95% percentile bootstrap interval that resamples
scenes; ratios are sums over scenes, ``sum(num) / sum(den)``, as in the evaluation):

* ``false_per_caption`` (and ``false_<type>_per_caption``): mean number of false claims
  (verdict False: ``mmalign.oracle.world_claims`` + ``verify_world_claim``) per caption;
* ``chair_i``: false object claims / object claims (every positive object mention, CHAIR_i on the
  oracle's parse); ``attribute_error_rate`` / ``relation_error_rate``: false / checkable claims;
* ``hallucinated_share``: captions with at least one false claim (CHAIR_s-style, all types);
* ``coverage``: the oracle's helpfulness, share of the scene's objects a correct mention
  identifies (a revision that "fixes" by deleting content shows up here);
* ``mean_words``: mean length in words.

From turn 1 on, against turn 0:

* ``fixed_caption_share``: turn-0 hallucinated captions whose turn-k answer has no false claim;
* ``fixed_claim_share`` (and ``fixed_<type>_share``): turn-0 false claims fixed at turn k;
* ``introduced_per_caption``: false claims at turn k that turn 0 did not make, per caption;
  ``new_hallucination_share``: captions with at least one such new false claim;
* ``refined_share``: scenes asked to revise at turn k (the rest were carried).

Fixed and introduced are multiset differences of *claim keys* (:func:`claim_key`), the
normalised content of a claim from the parser's structured meta, independent of wording
("a star" / "the star" / "A star" are the same claim):

* object: ``object: <shape>``;
* attribute: ``attribute: [<size>] [<color>] <shape> [x<count>]`` (the stated parts);
* relation: ``relation: <subject> | [not ]<relation> | <object>`` (sides as colour + shape).

With F0 the multiset of turn 0's false-claim keys and Fk turn k's, a key ``x`` fixes
``max(0, F0[x] - Fk[x])`` claims, keeps ``min(F0[x], Fk[x])`` and introduces
``max(0, Fk[x] - F0[x])``: a false claim is fixed when the revision no longer makes a false claim
of the same type and key (as many times). So fixed + kept = false claims at turn 0 and kept +
introduced = false claims at turn k. A wrong attribute restated differently ("the small red
circle" -> "the large blue circle") counts as one fixed and one introduced.

Outputs (atomic, with manifest.json; skipped when up to date, ``--force`` redoes):
``metrics.json`` (settings, counts, every metric per turn with its interval, definitions),
``report.md`` (a turn-by-turn table), ``generations.jsonl`` (per scene: every turn's user text as
asked, answer, refinement, critique, false claims and score columns) and ``chart.png`` (metric
vs turn; when matplotlib is installed).

``compare DIR_A DIR_B ...``: the runs side by side per turn, each later run with its paired
difference from the first (same scenes, matched by scene id; a paired bootstrap over scenes),
written to ``compare.md`` / ``compare.json`` / ``compare.png`` (atomically, with ``manifest.json``
holding the compared runs' hashes). ``data_pipelines.report`` reads ``compare.json`` for its
refinement table (default ``<run>/refine/compare``, where ``make eval-dress`` writes it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.conditions import with_condition
from mmalign.eval import summary as S
from mmalign.eval.refine_metrics import (
    ALL_METRICS,
    REVISION_METRICS,
    TURN_METRICS,
    TYPES,
    fmt_metric,
    metric_label,
)
from mmalign.eval.world_bench import CAPTION_PROMPT
from mmalign.feedback import Claim, FeedbackItem
from mmalign.metrics import words

STAGE = "refine-bench"
COMPARE_STAGE = "refine-bench-compare"
#: the oracle's refinement when there is nothing to fix (:func:`mmalign.oracle.critique_and_refinement`)
NO_CHANGE = "No change is needed."
CONDITION_PLACEMENT = "the user turn being answered: the caption prompt at turn 0, the latest refinement after"


# ---------------------------------------------------------------------------------------------
# claims, judgements and per-turn score columns (pure)


def claim_key(claim: Claim | Mapping[str, Any]) -> str:
    """The normalised content of a claim (module docstring), independent of its wording."""
    ctype = claim.type if isinstance(claim, Claim) else claim["type"]
    m = claim.meta if isinstance(claim, Claim) else claim.get("meta", {})
    if ctype == "object":
        return f"object: {m.get('shape') or m.get('category')}"
    if ctype == "attribute":
        parts = [m.get("size"), m.get("color"), m["shape"]]
        count = m.get("count")
        return "attribute: " + " ".join(p for p in parts if p) + (f" x{count}" if count is not None else "")
    if ctype == "relation":
        return f"relation: {m['subject']} | {'not ' if m.get('negated') else ''}{m['relation']} | {m['object']}"
    raise ValueError(f"claim {claim!r}: unknown type {ctype!r}")


def _type_key(c: Claim | Mapping[str, Any]) -> tuple[str, str]:
    if isinstance(c, Claim):
        return c.type, claim_key(c)
    return c["type"], (c["key"] if "key" in c else claim_key(c))


def change_counts(before: Sequence[Claim | Mapping[str, Any]],
                  after: Sequence[Claim | Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Fixed / kept / introduced false claims between two answers, per type and ``"all"``.

    ``before`` and ``after`` are the false claims of the two answers: :class:`Claim` s or dicts
    with ``type`` and ``key`` (as :func:`judge` stores them). Multiset difference of (type, key):
    per key, ``fixed = max(0, n_before - n_after)``, ``kept = min(n_before, n_after)``,
    ``introduced = max(0, n_after - n_before)``.
    """
    b = Counter(_type_key(c) for c in before)
    a = Counter(_type_key(c) for c in after)
    out = {t: {"fixed": 0, "kept": 0, "introduced": 0} for t in (*TYPES, "all")}
    for k in b.keys() | a.keys():
        t = k[0]
        if t not in out:
            raise ValueError(f"claim type {t!r} is not one of {TYPES}")
        for name, n in (("fixed", max(0, b[k] - a[k])), ("kept", min(b[k], a[k])), ("introduced", max(0, a[k] - b[k]))):
            out[t][name] += n
            out["all"][name] += n
    return out


def judge(oracle: Any, scene: Any, image: str, prompt: str, response: str, item_id: str) -> dict[str, Any]:
    """The oracle's judgement of one answer, as JSON: claim counts per type (all / checkable),
    the false claims (type, key, text), faithfulness, coverage, critique, refinement, words."""
    fb = oracle.feedback(FeedbackItem(id=item_id, prompt=prompt, response=response, image=image), scene)
    pairs = [(c, v) for seg in fb.segments or () for c, v in zip(seg.claims, seg.verdicts)]
    return {
        "claims": {t: sum(c.type == t for c, _ in pairs) for t in TYPES},
        "checked": {t: sum(c.type == t and v is not None for c, v in pairs) for t in TYPES},
        "false_claims": [{"type": c.type, "key": claim_key(c), "text": c.text} for c, v in pairs if v is False],
        "faithfulness": fb.scores["faithfulness"],
        "coverage": fb.scores["helpfulness"],
        "words": len(words(response)),
        "critique": fb.critique,
        "refinement": fb.refinement,
    }


def needs_refinement(judgement: Mapping[str, Any]) -> bool:
    return (judgement.get("refinement") or NO_CHANGE).strip() != NO_CHANGE


def turn_row(judgement: Mapping[str, Any], first: Mapping[str, Any] | None = None,
             refined: bool | None = None) -> dict[str, float]:
    """A scene's score columns at one turn (what the metrics sum). ``first``: the scene's turn-0
    judgement, for the columns against turn 0 (turn k >= 1); ``refined``: whether the scene was
    asked to revise at this turn (False: carried)."""
    false = judgement["false_claims"]
    row: dict[str, float] = {}
    for t in TYPES:
        row[f"claims_{t}"] = judgement["claims"][t]
        row[f"checked_{t}"] = judgement["checked"][t]
        row[f"false_{t}"] = sum(c["type"] == t for c in false)
    row["claims_all"] = sum(judgement["claims"].values())
    row["false_all"] = len(false)
    row["hallucinated"] = int(bool(false))
    row["coverage"] = float(judgement["coverage"])
    row["words"] = judgement["words"]
    if first is not None:
        ch = change_counts(first["false_claims"], false)
        row["refined"] = int(bool(refined))
        row["hallucinated_at_0"] = int(bool(first["false_claims"]))
        row["fixed_caption"] = int(bool(first["false_claims"]) and not false)
        row["false_at_0"] = len(first["false_claims"])
        row["fixed_all"] = ch["all"]["fixed"]
        row["introduced_all"] = ch["all"]["introduced"]
        row["any_introduced"] = int(ch["all"]["introduced"] > 0)
        for t in TYPES:
            row[f"false_at_0_{t}"] = sum(c["type"] == t for c in first["false_claims"])
            row[f"fixed_{t}"] = ch[t]["fixed"]
            row[f"introduced_{t}"] = ch[t]["introduced"]
    return row


DEFINITIONS: dict[str, str] = {
    "false_per_caption": "mean number of false claims (oracle verdict False) per caption, all types",
    **{f"false_{t}_per_caption": f"mean number of false {t} claims per caption" for t in TYPES},
    "chair_i": "false object claims / object claims, summed over scenes (CHAIR_i on the oracle's parse)",
    "attribute_error_rate": "false attribute claims / checkable attribute claims (shape present)",
    "relation_error_rate": "false relation claims / checkable relation claims",
    "hallucinated_share": "share of captions with at least one false claim",
    "coverage": "mean share of the scene's objects a correct mention identifies (oracle helpfulness)",
    "mean_words": "mean caption length in words",
    "fixed_caption_share": "turn-0 captions with a false claim whose turn-k answer has none / turn-0 captions "
                           "with a false claim",
    "fixed_claim_share": "turn-0 false claims fixed at turn k / turn-0 false claims; fixed = per claim key, "
                         "max(0, n at turn 0 - n at turn k) (multiset difference of (type, key))",
    **{f"fixed_{t}_share": f"the same, {t} claims only" for t in TYPES},
    "introduced_per_caption": "false claims at turn k beyond turn 0's (per key, max(0, n at turn k - n at turn 0)), "
                              "per caption",
    "new_hallucination_share": "share of captions with at least one false claim that turn 0 did not make",
    "refined_share": "share of scenes asked to revise at turn k (the others had nothing to refine and were carried)",
    "claim key": "object: <shape>; attribute: [size] [color] <shape> [x<count>]; relation: <subject> | "
                 "[not ]<relation> | <object> (from the caption parser's structured meta, wording-independent)",
}


def summarize_turn(rows: Sequence[Mapping[str, Any]], turn: int, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """Every metric of ``turn`` with its 95% bootstrap interval over scenes."""
    return S.summarize(rows, TURN_METRICS + (REVISION_METRICS if turn else ()), n_boot=n_boot, seed=seed)


# ---------------------------------------------------------------------------------------------
# the turn loop


@dataclass
class Episode:
    """One scene's refinement conversation: per turn the user text as asked (None when carried),
    the answer, whether it was asked, and the oracle's judgement."""

    id: str
    scene: Any
    image: Path
    prompt: str
    users: list[str | None] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    refined: list[bool] = field(default_factory=list)
    judgements: list[dict[str, Any]] = field(default_factory=list)


def conversation(prompt: str, answers: Sequence[str], refinements: Sequence[str], condition: str = "",
                 refine_template: str = "{refinement}") -> list[dict]:
    """The messages asked at turn ``k = len(answers)``: the caption prompt with the image, then per
    earlier turn its answer (assistant) and the refinement of it (user, through
    ``refine_template``); ``condition`` before the text of the last user turn only."""
    if len(answers) != len(refinements):
        raise ValueError(f"{len(answers)} answers but {len(refinements)} refinements")
    msgs: list[dict] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    for a, r in zip(answers, refinements):
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        msgs.append({"role": "user", "content": [{"type": "text", "text": refine_template.format(refinement=r)}]})
    return with_condition(msgs, condition, turn="last")


def _last_user_text(msgs: Sequence[dict]) -> str:
    user = [m for m in msgs if m["role"] == "user"][-1]
    return " ".join(p["text"] for p in user["content"] if p.get("type") == "text")


def run_turns(policy: Any, episodes: Sequence[Episode], oracle: Any, turns: int, condition: str = "",
              batch_size: int = 32, max_new_tokens: int = 128, refine_template: str = "{refinement}",
              progress: bool = True) -> dict[str, Any]:
    """Turn 0 and ``turns`` refinement turns for every episode (in place); returns throughput
    per turn. Scenes with nothing to refine are carried (module docstring)."""
    from mmalign.eval import runner as R

    throughput: dict[str, Any] = {}
    for k in range(turns + 1):
        todo = [e for e in episodes if k == 0 or needs_refinement(e.judgements[-1])]
        chats = [conversation(e.prompt, e.answers, [j["refinement"] for j in e.judgements], condition, refine_template)
                 for e in todo]
        answers, secs = R.generate_answers(policy, [(e.image, c) for e, c in zip(todo, chats)], batch_size,
                                           max_new_tokens, f"turn {k}", progress)
        asked = {id(e): (a, c) for e, a, c in zip(todo, answers, chats)}
        for e in episodes:
            if id(e) in asked:
                a, c = asked[id(e)]
                e.users.append(_last_user_text(c))
                e.answers.append(a)
                e.refined.append(True)
                e.judgements.append(judge(oracle, e.scene, str(e.image), e.prompt, a, f"{e.id}/turn{k}"))
            else:  # nothing to refine: carried unchanged
                e.users.append(None)
                e.answers.append(e.answers[-1])
                e.refined.append(False)
                e.judgements.append(e.judgements[-1])
        throughput[f"turn {k}"] = {"prompts": len(todo), "seconds": round(secs, 2),
                                   "per_second": round(len(todo) / secs, 2) if secs else None}
    return throughput


def episode_rows(e: Episode) -> list[dict[str, float]]:
    """The score columns of every turn of an episode."""
    first = e.judgements[0]
    return [turn_row(j, None if k == 0 else first, e.refined[k]) for k, j in enumerate(e.judgements)]


def episode_record(e: Episode, condition: str) -> dict[str, Any]:
    rows = episode_rows(e)
    return {"id": e.id, "scene_id": e.id, "image": str(e.image), "prompt": e.prompt, "condition": condition,
            "turns": [{"turn": k, "refined": e.refined[k], "user": e.users[k], "answer": e.answers[k],
                       "judgement": e.judgements[k], "row": rows[k]} for k in range(len(e.answers))]}


def turn_rows(records: Sequence[Mapping[str, Any]], turn: int) -> list[dict[str, Any]]:
    """Per-scene rows of one turn from ``generations.jsonl`` records, with the scene id as ``id``."""
    return [{"id": r["id"], **r["turns"][turn]["row"]} for r in records]


def summarize_records(records: Sequence[Mapping[str, Any]], turns: int, n_boot: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for k in range(turns + 1):
        rows = turn_rows(records, k)
        refined = sum(r["turns"][k]["refined"] for r in records)
        out.append({"turn": k, "asked": refined, "carried": len(records) - refined,
                    "metrics": summarize_turn(rows, k, n_boot, seed)})
    return out


# ---------------------------------------------------------------------------------------------
# report and chart


def markdown_report(doc: Mapping[str, Any]) -> str:
    st = doc["settings"]
    turns = doc["turns"]
    c = doc["counts"]
    cond = (f"`{st['condition']}` ({st['condition_source']}), before the text of {CONDITION_PLACEMENT}"
            if st.get("condition") else "none" + (f" ({st['condition_source']})" if st.get("condition_source") else ""))
    lines = [
        f"# Refinement benchmark: `{doc['model']}`", "",
        (f"{doc['date']} on {doc['machine']}. {doc['scenes']} held-out scenes ({st['split']} split of "
         f"`{doc['data']}`), {len(turns) - 1} refinement turn(s); greedy decoding, max {st['max_new_tokens']} new "
         f"tokens, batch {st['batch_size']}. Feedback: the scene-graph oracle's refinement"
         f"{' (false claims and unmentioned objects)' if st['mention_missing'] else ' (false claims only)'}. "
         f"Condition: {cond}. Intervals: 95% bootstrap over scenes ({st['n_boot']} resamples)."), "",
        (f"- turn 0: {c['hallucinated_at_0']} of {doc['scenes']} captions have a false claim "
         f"({c['false_claims_at_0']} false claims); {c['nothing_to_refine_at_0']} had nothing to refine and were "
         "carried unchanged"),
    ]
    for t in turns[1:]:
        lines.append(f"- turn {t['turn']}: {t['asked']} scenes asked to revise, {t['carried']} carried")
    lines += ["", "| metric | " + " | ".join(f"turn {t['turn']}" for t in turns) + " |",
              "|---|" + "---|" * len(turns)]
    for key in ALL_METRICS:
        if not any(key in t["metrics"] for t in turns):
            continue
        cells = [fmt_metric(t["metrics"].get(key), key) if key in t["metrics"] else "" for t in turns]
        lines.append(f"| {metric_label(key)} | " + " | ".join(cells) + " |")
    lines += ["", "## Definitions", ""]
    lines += [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    lines.append("")
    return "\n".join(lines)


_CHART_PANELS = (
    ("false claims per caption (lower is better)",
     ("false_per_caption", *(f"false_{t}_per_caption" for t in TYPES)), False),
    ("hallucination rates (lower is better)", ("chair_i", "hallucinated_share", "new_hallucination_share"), True),
    ("fixed at turn k (higher is better)", ("fixed_caption_share", "fixed_claim_share"), True),
)


def plot_turns(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> bool:
    """Metric vs turn with 95% interval bars, one line per (run, metric); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(_CHART_PANELS), figsize=(5.5 * len(_CHART_PANELS), 4.2), squeeze=False)
    for ax, (name, keys, pct) in zip(axes[0], _CHART_PANELS):
        k = 100 if pct else 1
        for run, turns in series.items():
            for key in keys:
                pts = [(t["turn"], t["metrics"][key]) for t in turns if key in t["metrics"]]
                pts = [(x, v) for x, v in pts if v.get("value") is not None and not math.isnan(v["value"])]
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                ys = [v["value"] * k for _, v in pts]
                lo = [max(0.0, y - v["low"] * k) if not math.isnan(v["low"]) else 0.0 for y, (_, v) in zip(ys, pts)]
                hi = [max(0.0, v["high"] * k - y) if not math.isnan(v["high"]) else 0.0 for y, (_, v) in zip(ys, pts)]
                label = f"{run}: {key}" if run else key
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(sorted({t["turn"] for turns in series.values() for t in turns}))
        ax.set_xlabel("turn")
        ax.set_ylabel("%" if pct else "count")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# the stage


def _parser() -> argparse.ArgumentParser:
    from mmalign.conditions import CONDITION_FILE
    from mmalign.eval.runner import DEFAULT_POLICY

    ap = argparse.ArgumentParser(prog="python -m data_pipelines.refine_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", required=True, type=Path, help="checkpoint folder (Hugging Face format)")
    m.add_argument("--policy-class", default=DEFAULT_POLICY, help=f"Policy implementation (default: {DEFAULT_POLICY})")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    m.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    c = m.add_mutually_exclusive_group()
    c.add_argument("--condition", metavar="TEXT",
                   help=f"DRESS condition, before the text of {CONDITION_PLACEMENT} (default: the best condition "
                        f"of the model folder's {CONDITION_FILE} -- its good-feedback text or best rating level -- "
                        "when it has one, else none)")
    c.add_argument("--no-condition", action="store_true", help=f"no condition even when the model has {CONDITION_FILE}")
    b = ap.add_argument_group("benchmark")
    b.add_argument("--data", required=True, type=Path, help="the data stage's folder (uses <data>/<split>/scenes.jsonl)")
    b.add_argument("--split", default="test", help="held-out split (default: test)")
    b.add_argument("--limit", type=int, default=200, help="the first N scenes of the split (0 = all; default 200)")
    b.add_argument("--turns", type=int, default=2, help="refinement turns after the first answer (default 2)")
    b.add_argument("--prompt", default=CAPTION_PROMPT, help=f"turn-0 prompt (default: {CAPTION_PROMPT!r}, as the eval)")
    b.add_argument("--refine-template", default="{refinement}",
                   help="the refinement user turn, with {refinement} (default: the oracle's refinement text itself)")
    b.add_argument("--hallucinations-only", action="store_true",
                   help="the oracle's refinements name false claims only, not unmentioned objects (default: both, as "
                        "DRESS's feedback covers helpfulness too)")
    g = ap.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=32, help="conversations per generate() call")
    g.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap in tokens, every turn")
    o = ap.add_argument_group("output")
    o.add_argument("--out", required=True, type=Path, help="output folder")
    o.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval")
    o.add_argument("--seed", type=int, default=0, help="torch and bootstrap seed")
    o.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def run_main(argv: list[str]) -> int:
    import torch

    from mmalign.components import load_component
    from mmalign.eval import runner as R
    from mmalign.eval.cli import resolve_condition
    from mmalign.oracle import WorldOracle
    from mmalign.records import read_scenes, resolve_image_path
    from mmalign.stage import (
        StageOutput,
        atomic_write_jsonl,
        atomic_write_text,
        is_up_to_date,
    )

    ap = _parser()
    args = ap.parse_args(argv)
    if args.turns < 1 or args.limit < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("need --turns >= 1, --limit >= 0, --batch-size >= 1 and --max-new-tokens >= 1")
    if "{refinement}" not in args.refine_template:
        ap.error("--refine-template must contain {refinement}")
    if not (args.model / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json there (a Hugging Face checkpoint folder?)")
    scenes_file = args.data / args.split / "scenes.jsonl"
    if not scenes_file.exists():
        ap.error(f"{scenes_file}: no such file; is {args.data} the data stage's folder (make data)?")
    try:
        condition, condition_source = resolve_condition(args.model, args.condition, args.no_condition)
    except ValueError as e:
        ap.error(str(e))

    settings = {
        "model": str(args.model), "policy_class": args.policy_class, "dtype": args.dtype, "decoding": "greedy",
        "split": args.split, "limit": args.limit, "turns": args.turns, "prompt": args.prompt,
        "refine_template": args.refine_template, "mention_missing": not args.hallucinations_only,
        "condition": condition, "condition_source": condition_source, "condition_placement": CONDITION_PLACEMENT,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "n_boot": args.n_boot,
        "seed": args.seed,
    }
    inputs = [args.data, args.model / "config.json", *sorted(args.model.glob("*.safetensors"))]
    if not args.force and is_up_to_date(args.out, settings, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    scenes = read_scenes(scenes_file)[: args.limit or None]
    if not scenes:
        ap.error(f"{scenes_file}: no scenes")
    episodes = [Episode(s.scene_id, s, resolve_image_path(img, args.data, f"{scenes_file}: {s.scene_id}"), args.prompt)
                for s, img in scenes]
    oracle = WorldOracle({str(e.image): e.scene for e in episodes}, mention_missing=not args.hallucinations_only)
    torch.manual_seed(args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"{STAGE}: {len(episodes)} scenes x (1 + {args.turns}) turns; condition {condition or 'none'!r}; "
          f"loading {args.model}", file=sys.stderr)
    policy = load_component(args.policy_class, path=str(args.model), dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code).eval().to(device)
    throughput = run_turns(policy, episodes, oracle, args.turns, condition, args.batch_size, args.max_new_tokens,
                           args.refine_template, progress=not args.no_progress)
    records = [episode_record(e, condition) for e in episodes]
    first = [e.judgements[0] for e in episodes]
    counts = {"scenes": len(episodes),
              "hallucinated_at_0": sum(bool(j["false_claims"]) for j in first),
              "false_claims_at_0": sum(len(j["false_claims"]) for j in first),
              "nothing_to_refine_at_0": sum(not needs_refinement(j) for j in first)}
    doc = {
        "stage": STAGE, "model": str(args.model), "data": str(args.data), "scenes": len(episodes),
        "settings": settings, "counts": counts,
        "turns": summarize_records(records, args.turns, args.n_boot, args.seed),
        "definitions": DEFINITIONS, "throughput": throughput, "machine": R.machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with StageOutput(args.out, stage=STAGE, config=settings, inputs=inputs) as st:
        atomic_write_jsonl(st.path / "generations.jsonl", records)
        atomic_write_text(st.path / "metrics.json", json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(st.path / "report.md", markdown_report(doc))
        plot_turns({"": doc["turns"]}, st.path / "chart.png", f"{args.model} (95% intervals)")
        for k, t in enumerate(doc["turns"]):
            st.count(f"turn{k}/asked", t["asked"])
        for key, n in counts.items():
            st.count(key, n)
    print(_summary(doc))
    print(f"-> {args.out}/report.md, metrics.json, generations.jsonl, chart.png")
    return 0


def _summary(doc: Mapping[str, Any]) -> str:
    out = [f"{STAGE}: {doc['model']} on {doc['scenes']} scenes (95% bootstrap intervals):"]
    for t in doc["turns"]:
        m = t["metrics"]
        line = (f"  turn {t['turn']} (asked {t['asked']}): false/caption {fmt_metric(m.get('false_per_caption'), 'false_per_caption')}"
                f"; CHAIR_i {fmt_metric(m.get('chair_i'), 'chair_i')}")
        if t["turn"]:
            line += (f"; fixed captions {fmt_metric(m.get('fixed_caption_share'), 'fixed_caption_share')}"
                     f"; fixed claims {fmt_metric(m.get('fixed_claim_share'), 'fixed_claim_share')}"
                     f"; new/caption {fmt_metric(m.get('introduced_per_caption'), 'introduced_per_caption')}")
        out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# compare


def load_refine_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from mmalign.stage import read_jsonl

    run = Path(run)
    for name in ("metrics.json", "generations.jsonl"):
        if not (run / name).exists():
            raise FileNotFoundError(f"{run / name}: missing; is {run} an output folder of {STAGE}?")
    doc = json.loads((run / "metrics.json").read_text())
    if doc.get("stage") != STAGE:
        raise ValueError(f"{run}/metrics.json: not a {STAGE} output")
    return doc, read_jsonl(run / "generations.jsonl")


#: settings that may differ between compared runs (the point of comparing)
_RUN_SPECIFIC = ("model", "policy_class", "dtype", "condition", "condition_source")


def compare_runs(runs: Sequence[Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each run's per-turn metrics and every later run's paired difference from the first, per
    turn all runs have; the runs must cover the same scenes (a ValueError says how they differ)."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs (the first is the baseline)")
    loaded = [load_refine_run(r) for r in runs]
    turns = min(len(d["turns"]) for d, _ in loaded)
    base_doc, base_recs = loaded[0]
    diffs: dict[str, list[dict[str, Any]]] = {}
    for run, (doc, recs) in zip(runs[1:], loaded[1:]):
        per = []
        for k in range(turns):
            metrics = TURN_METRICS + (REVISION_METRICS if k else ())
            try:
                per.append(S.paired_diff(turn_rows(base_recs, k), turn_rows(recs, k), metrics, n_boot=n_boot,
                                         seed=seed))
            except ValueError as e:
                raise ValueError(f"{runs[0]} and {run}: {e} (compare runs on the same scenes)") from None
        diffs[str(run)] = per
    differ = sorted({k for d, _ in loaded[1:] for k in set(d["settings"]) | set(base_doc["settings"])
                     if k not in _RUN_SPECIFIC and d["settings"].get(k) != base_doc["settings"].get(k)})
    return {"runs": [str(r) for r in runs], "baseline": str(runs[0]), "turns": turns, "scenes": len(base_recs),
            "settings_differ": differ,
            "metrics": {str(r): d for r, (d, _) in zip(runs, loaded)}, "diffs": diffs}


def compare_markdown(cmp: Mapping[str, Any], names: Sequence[str]) -> str:
    runs = cmp["runs"]
    lines = ["# Refinement benchmark: comparison", "",
             (f"Baseline: `{runs[0]}` ({names[0]}). The same {cmp['scenes']} scenes in every run (checked, matched "
              "by scene id). Differences are run minus baseline, in percentage points (plain units for counts), with "
              "a paired 95% bootstrap interval over scenes; `*` marks an interval that excludes 0."), ""]
    for n, r in zip(names, runs):
        st = cmp["metrics"][r]["settings"]
        lines.append(f"- {n}: `{st['model']}`, condition {('`' + st['condition'] + '`') if st.get('condition') else 'none'}")
    if cmp["settings_differ"]:
        lines.append(f"- **settings differ beyond the model**: {', '.join(cmp['settings_differ'])}")
    lines.append("")
    for k in range(cmp["turns"]):
        lines += [f"## turn {k}", "",
                  f"| metric | {names[0]} | " + " | ".join(f"{n} | Δ vs {names[0]}" for n in names[1:]) + " |",
                  "|---|---|" + "---|---|" * (len(runs) - 1)]
        base = cmp["metrics"][runs[0]]["turns"][k]["metrics"]
        for key in ALL_METRICS:
            if key not in base:
                continue
            cells = [fmt_metric(base.get(key), key)]
            for r in runs[1:]:
                cells.append(fmt_metric(cmp["metrics"][r]["turns"][k]["metrics"].get(key), key))
                d = cmp["diffs"][r][k].get(key)
                cells.append(fmt_metric(d, key, signed=True) if d else "")
            lines.append(f"| {metric_label(key)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def compare_main(argv: list[str]) -> int:
    from mmalign.stage import StageOutput, atomic_write_text, is_up_to_date

    ap = argparse.ArgumentParser(prog="python -m data_pipelines.refine_bench compare",
                                 description="Side-by-side turn-by-turn tables of several refine-bench runs; the first "
                                             "is the baseline and every other run gets its paired difference from it "
                                             "(same scenes, 95% paired bootstrap interval over scenes).")
    ap.add_argument("runs", nargs="+", type=Path, help="output folders of refine_bench (baseline first)")
    ap.add_argument("--names", nargs="+", help="short names for the runs (default: folder names)")
    ap.add_argument("--out", type=Path, required=True, help="write compare.md, compare.json and compare.png here")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    args = ap.parse_args(argv)
    names = args.names or [r.name for r in args.runs]
    if len(names) != len(args.runs):
        ap.error(f"{len(names)} names for {len(args.runs)} runs")
    config = {"runs": [str(r) for r in args.runs], "names": names, "n_boot": args.n_boot, "seed": args.seed}
    try:
        if not args.force and is_up_to_date(args.out, config, args.runs):
            print(f"{COMPARE_STAGE}: {args.out} up to date, skipping (--force to redo)")
            return 0
        cmp = compare_runs(args.runs, n_boot=args.n_boot, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"{COMPARE_STAGE}: {e}", file=sys.stderr)
        return 2
    md = compare_markdown(cmp, names)
    print(md)
    with StageOutput(args.out, stage=COMPARE_STAGE, config=config, inputs=args.runs) as st:
        atomic_write_text(st.path / "compare.md", md)
        atomic_write_text(st.path / "compare.json", json.dumps(cmp, indent=2, default=str) + "\n")
        plot_turns({n: cmp["metrics"][r]["turns"] for n, r in zip(names, cmp["runs"])}, st.path / "compare.png",
                   "refinement benchmark (95% intervals)")
        st.count("runs", len(args.runs))
        st.count("scenes", cmp["scenes"])
    print(f"-> {args.out}/compare.md, compare.json, compare.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mmalign.feedback import FeedbackError
    from mmalign.records import RecordError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    try:
        return run_main(argv)
    except (RecordError, FeedbackError, FileNotFoundError) as e:
        print(f"{STAGE}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
