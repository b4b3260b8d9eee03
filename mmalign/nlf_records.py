"""DRESS's natural-language-feedback data as conditioned SFT records, and their summary.

Two stages write these records, in one format, so the DRESS trainer (``configs/dress``) reads
either: ``data_pipelines.nlf`` (made from the feedback stage's critiques and refinements of the
policy's own samples) and ``data_pipelines.import_dress`` (DRESS's released LVLM_NLF data). Both
build them here:

* :func:`critique_record`: a critique example, its condition before the question: the critique
  text itself (``feedback`` a :class:`~mmalign.conditions.FeedbackCondition`), the level of its
  score (``feedback`` None, :class:`~mmalign.conditions.ConditionScheme`), or nothing
  (``feedback`` a :class:`~mmalign.conditions.NoCondition`: the unconditioned ablation, the
  same record with no condition text and ``condition: null``);
* :func:`refinement_record`: a refinement episode, the revision's condition in the last user
  turn, before the refinement feedback (hindsight relabelling): the oracle's critique of the
  revision, or the level of the revision's score (or, likewise, nothing);
* :func:`add_scheme_arguments` / :func:`scheme_from`: the rating scheme's command line;
  :func:`add_feedback_arguments`: the condition mode and the feedback condition's;
* :func:`summarize` / :func:`summary_md`: the part of the report both stages share (records per
  kind, split and condition level; the revisions' success and fix rates with 95% bootstrap
  intervals over revisions).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from mmalign.conditions import (
    CONDITION_MODES,
    ConditionScheme,
    FeedbackCondition,
    NoCondition,
    derive_good_feedback,
    with_condition,
)
from mmalign.records import SFTRecord
from mmalign.tables import num_ci, pct_ci

KINDS = ("critique", "refinement")
N_BOOT = 2000


# ---------------------------------------------------------------------------------------------
# records


def text_turn(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def scheme_from(thresholds: Sequence[float], names: Sequence[str], template: str) -> ConditionScheme:
    """The :class:`ConditionScheme` of the command line (a ValueError says what is wrong)."""
    return ConditionScheme(tuple(float(t) for t in thresholds), tuple(names), template)


def add_scheme_arguments(ap: argparse.ArgumentParser) -> None:
    """``--thresholds``, ``--names``, ``--template``: the condition scheme's command line (this stage
    and the DRESS importer), defaults from :class:`ConditionScheme`."""
    d = ConditionScheme()
    ap.add_argument("--thresholds", nargs="+", type=float, default=list(d.thresholds),
                    help=f"ascending score cut points in [0, 1] between condition levels (default {list(d.thresholds)})")
    ap.add_argument("--names", nargs="+", default=list(d.names),
                    help=f"one level name per interval, worst first; the last is asked at inference "
                         f"(default {' '.join(d.names)})")
    ap.add_argument("--template", default=d.template,
                    help=f"the condition text, with {{name}} (default {d.template!r})")


def add_feedback_arguments(ap: argparse.ArgumentParser) -> None:
    """``--condition feedback|rating|none`` (default feedback), ``--feedback-template``,
    ``--good-feedback``: which condition the records carry (:mod:`mmalign.conditions`)."""
    d = FeedbackCondition()
    ap.add_argument("--condition", choices=CONDITION_MODES, default="feedback",
                    help="what conditions a response: its critique text (feedback, DRESS's 'conditioned on the NLF'; "
                         "default), its rating level (rating: --thresholds / --names / --template), or nothing "
                         "(none: the unconditioned ablation, the same records with no condition text)")
    ap.add_argument("--feedback-template", default=d.template,
                    help=f"--condition feedback: the condition text, with {{feedback}} (default {d.template!r})")
    ap.add_argument("--good-feedback", metavar="TEXT",
                    help="--condition feedback: the feedback text inference asks with (default: derived from the "
                         "train split's top-rated critiques, mmalign.conditions.derive_good_feedback)")


def condition_from(args: argparse.Namespace) -> FeedbackCondition | NoCondition | None:
    """The condition :func:`add_feedback_arguments`' options name: a :class:`FeedbackCondition`
    (``--condition feedback``), :class:`NoCondition` (``none``), or None for ``rating`` (the rating
    scheme of :func:`scheme_from`). A bad template is a ValueError."""
    if args.condition == "feedback":
        return FeedbackCondition(args.feedback_template, args.good_feedback)
    return NoCondition() if args.condition == "none" else None


#: the reports' line for records made with ``--condition none`` (both stages write it)
NO_CONDITION_LINE = ("Condition: none (--condition none, the unconditioned ablation): no condition text in any "
                     "message. Rating levels below are for the report only.")


def resolve_good_feedback(cond: FeedbackCondition, splits: dict[str, list[dict]]
                          ) -> tuple[FeedbackCondition, dict[str, Any]]:
    """``cond`` with its good-feedback text, and how it was found (for the stage's report).

    A text given on the command line is kept. Otherwise it is derived
    (:func:`mmalign.conditions.derive_good_feedback`) from the train split's critique examples,
    the records the trainer derives its own text from; a train split without any (a tiny input)
    falls back to every split's."""
    if cond.good_feedback is not None:
        return cond, {"rule": None, "given": True}
    src = "train" if any(r["kind"] == "critique" for r in splits.get("train", [])) else "all"
    good, how = derive_good_feedback((r["score"], r["critique"]) for k, v in splits.items() for r in v
                                     if r["kind"] == "critique" and (src == "all" or k == "train"))
    how["from"] = src
    return FeedbackCondition(cond.template, good), how


def condition_text(feedback: FeedbackCondition | NoCondition | None, scheme: ConditionScheme, critique: str | None,
                   score: float) -> str | None:
    """The condition of a response: ``feedback.text(critique)`` for a feedback condition (a missing
    critique is a ValueError), None for :class:`NoCondition`, else the rating level of ``score``."""
    if isinstance(feedback, NoCondition):
        return None
    return feedback.text(critique) if feedback is not None else scheme.for_score(score)


def critique_record(rid: str, images: list[str], prompt: list[dict], response: str, score: float,
                    scheme: ConditionScheme, meta: dict[str, Any],
                    feedback: FeedbackCondition | NoCondition | None = None) -> dict[str, Any]:
    """A critique example: its condition before the first user turn's text, then the response as
    the (loss-bearing) assistant turn. The condition is ``feedback.text(meta["critique"])`` when
    ``feedback`` is a feedback condition (a missing critique is a ValueError), none at all (the
    prompt unchanged, ``condition: None``) when it is :class:`NoCondition`, else the level of
    ``score``; ``level`` is the rating level of ``score`` in every mode (the reports count it)."""
    cond = condition_text(feedback, scheme, meta.get("critique"), score)
    row = {"id": rid, "images": list(images), "messages": with_condition(prompt, cond or "", "first") + [
        text_turn("assistant", response)], "kind": "critique", "score": score, "level": scheme.name(score),
        "condition": cond, **meta}
    return checked(row)


def refinement_record(rid: str, images: list[str], conversation: list[dict], revision: str, score_before: float,
                      score_after: float, rnd: int, scheme: ConditionScheme, meta: dict[str, Any],
                      feedback: FeedbackCondition | NoCondition | None = None) -> dict[str, Any]:
    """A refinement episode: ``conversation`` (ending with the user turn holding the refinement
    feedback) with the revision's condition before that last user turn's text, then the
    revision. The condition is ``feedback.text(meta["critique"])`` (the critique *of the
    revision*) for a feedback condition, none (``conversation`` unchanged) for
    :class:`NoCondition`, else the level of ``score_after``."""
    cond = condition_text(feedback, scheme, meta.get("critique"), score_after)
    row = {"id": rid, "images": list(images), "messages": with_condition(conversation, cond or "", "last") + [
        text_turn("assistant", revision)], "kind": "refinement", "round": rnd, "score_before": score_before,
        "score_after": score_after, "success": score_after > score_before, "level": scheme.name(score_after),
        "condition": cond, **meta}
    return checked(row)


def checked(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` after a round trip through the SFT schema, so an output line can never fail to load."""
    SFTRecord.from_json(row, f"record {row['id']}", max_chars=None)
    return row


# ---------------------------------------------------------------------------------------------
# report


def _ci(values: Sequence[float]) -> dict[str, float] | None:
    from mmalign.metrics import bootstrap_ci

    if not values:
        return None
    v, lo, hi = bootstrap_ci([float(x) for x in values], n_boot=N_BOOT, seed=0)
    return {"value": round(v, 4), "low": round(lo, 4), "high": round(hi, 4)}


def revision_stats(rows: list[dict]) -> dict[str, Any]:
    """Success / fix rates (95% bootstrap intervals over revisions) and mean scores of refinement rows."""
    fixed = [r["fixed"] for r in rows if r.get("fixed") is not None]
    return {"n": len(rows), "success_rate": _ci([r["success"] for r in rows]),
            "fix_rate": _ci(fixed), "fix_known": len(fixed),
            "score_before": _ci([r["score_before"] for r in rows]),
            "score_after": _ci([r["score_after"] for r in rows]),
            "score_delta": _ci([r["score_after"] - r["score_before"] for r in rows])}


def summarize(splits: dict[str, list[dict]], scheme: ConditionScheme) -> dict[str, Any]:
    """The part of the report both DRESS stages share: records per kind / split / level, revisions."""
    rows = [r for v in splits.values() for r in v]
    refin = [r for r in rows if r["kind"] == "refinement"]
    rounds = sorted({r["round"] for r in refin})
    return {
        "records": {k: {**{s: sum(r["kind"] == k for r in v) for s, v in splits.items()},
                        "total": sum(r["kind"] == k for r in rows)} for k in KINDS}
        | {"total": {**{s: len(v) for s, v in splits.items()}, "total": len(rows)}},
        "levels": {k: {n: sum(r["kind"] == k and r["level"] == n for r in rows) for n in scheme.names} for k in KINDS},
        "critique_score": _ci([r["score"] for r in rows if r["kind"] == "critique"]),
        "revisions": {"all": revision_stats(refin),
                      **{f"round {k}": revision_stats([r for r in refin if r["round"] == k]) for k in rounds}},
    }


def summary_md(rep: dict[str, Any], scheme: ConditionScheme) -> list[str]:
    splits = [s for s in rep["records"]["total"] if s != "total"]
    lines = [f"| kind | {' | '.join(splits)} | total |", "|---" * (len(splits) + 2) + "|"]
    for k in (*KINDS, "total"):
        c = rep["records"][k]
        lines.append(f"| {k} | {' | '.join(str(c[s]) for s in splits)} | {c['total']} |")
    lines += ["", f"Condition levels (template {scheme.template!r}, thresholds {list(scheme.thresholds)}):", "",
              f"| kind | {' | '.join(scheme.names)} |", "|---" * (len(scheme.names) + 1) + "|"]
    lines += [f"| {k} | {' | '.join(str(rep['levels'][k][n]) for n in scheme.names)} |" for k in KINDS]
    lines += ["", f"Mean critique-example score: {num_ci(rep['critique_score'])}.", "",
              ("Revisions (95% bootstrap intervals over revisions; success = score after > before, "
               "fixed = fewer hallucinated claims after than before):"), "",
              "| round | revisions | success | fixed | score before | score after |", "|---|---|---|---|---|---|"]
    if not rep["revisions"]["all"]["n"]:
        lines.append("| (none) | 0 | | | | |")
    for name, s in rep["revisions"].items():
        if s["n"]:
            lines.append(f"| {name} | {s['n']} | {pct_ci(s['success_rate'])} | {pct_ci(s['fix_rate'])} | "
                         f"{num_ci(s['score_before'])} | {num_ci(s['score_after'])} |")
    return lines
