"""The feedback stage's output read back: annotated responses grouped by prompt, with weighted scores.

Both consumers of the feedback stage's ``feedback.jsonl`` read it through :func:`read_feedback`:
``data_pipelines.prefs`` (MM-RLHF rankings) and ``data_pipelines.nlf`` (DRESS records). Each line is
an :class:`mmalign.records.AnnotatedResponse` whose ``annotations`` a feedback source filled; the
responses to one (images, prompt) become one :class:`Prompt` holding its samples as
:class:`Response` s, each with ``overall`` = :func:`weighted_scores` of its feedback scores.

A NaN or infinite score is always an error (:class:`ScoreError`), never a skipped line: it means
the feedback source is broken, and dropping such lines would bias the data towards the responses
it could score.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.feedback import FeedbackError, FeedbackItem, feedback_from_json, prompt_text
from mmalign.ranking import overall
from mmalign.records import (
    AnnotatedResponse,
    RecordError,
    image_exists,
    iter_jsonl,
    resolve_image_path,
)
from mmalign.world import Scene


class ScoreError(ValueError):
    """A NaN/inf score: never skipped (see the module docstring)."""


@dataclass
class Response:
    """One ranked response; ``parent`` is the sample an injected copy was made from."""

    text: str
    source: str
    scores: dict[str, float]
    overall: float
    critique: str | None
    refinement: str | None
    scored_by: str
    sample_id: str | None = None
    injection: dict[str, Any] | None = None
    parent: Response | None = None

    def to_json(self, ranked: list[Response]) -> dict[str, Any]:
        d: dict[str, Any] = {"text": self.text, "source": self.source, "scores": self.scores,
                             "overall": self.overall, "critique": self.critique, "refinement": self.refinement,
                             "scored_by": self.scored_by}
        if self.sample_id is not None:
            d["sample_id"] = self.sample_id
        if self.injection is not None:
            d["injection"] = {**self.injection, "parent_rank": next(k for k, r in enumerate(ranked) if r is self.parent)}
        return d


@dataclass
class Prompt:
    """The annotated samples of one (images, prompt), in file order."""

    id: str
    images: list[str]  # relative to the data root, as written
    image: str | None  # absolute path of the first image (what the oracle looks up)
    prompt: list[dict]
    scene: Scene | None
    scene_id: str | None
    task: str | None
    reference: str | None
    where: str  # file:line of the first sample
    samples: list[Response] = field(default_factory=list)

    def feedback_item(self, text: str, rid: str) -> FeedbackItem:
        """Another answer ``text`` to this prompt as an item for a feedback source (id ``rid``)."""
        return FeedbackItem(id=rid, prompt=prompt_text(self.prompt), response=text, image=self.image,
                            meta={"scene_id": self.scene_id})


# ---------------------------------------------------------------------------------------------
# scores


def weighted_scores(scores: dict[str, Any], weights: dict[str, float], where: str) -> tuple[dict[str, float], float]:
    """The weighted dimensions of ``scores`` and their weighted mean (the overall score).

    A missing dimension is a :class:`RecordError`; a non-number or NaN/inf a :class:`ScoreError`.
    """
    missing = [d for d in weights if d not in scores]
    if missing:
        raise RecordError(f"{where}: feedback has no {', '.join(map(repr, missing))} score (it has "
                          f"{sorted(scores) or 'none'}); pass --weights with the dimensions the source gives, "
                          "e.g. --weights faithfulness=1")
    out = {}
    for d in weights:
        v = scores[d]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ScoreError(f"{where}: score {d!r} is {v!r}; scores must be finite numbers (is the feedback "
                             "source broken?)")
        out[d] = float(v)
    # rounded, so two weightings of equal scores never differ by float noise and make a pair
    return out, overall(out, weights, ndigits=10)


# ---------------------------------------------------------------------------------------------
# reading


def read_feedback(path: Path, data: Path, weights: dict[str, float], scenes: dict[str, Scene] | None,
                  on_error: str, rejects: list[dict], max_chars: int = 20_000) -> list[Prompt]:
    """The feedback stage's annotated responses, grouped by prompt (first-seen order).

    The prompt id is the sample stage's ``source_id`` (else a hash of images + prompt). With
    ``scenes`` given, each prompt needs a scene graph for its image (or ``scene_id``). Unusable
    lines raise :class:`RecordError` (``file:line: ...``), or with ``on_error="skip"`` are
    appended to ``rejects`` as ``{"line", "reason", "error", "record"}``.
    """
    root = data.resolve()
    by_id = {s.scene_id: s for s in (scenes or {}).values() if s.scene_id}
    prompts: dict[str, Prompt] = {}
    seen: dict[str, int] = {}
    for lineno, obj, err in iter_jsonl(path):
        where = f"{path}:{lineno}"
        reason = "malformed record"  # what is being checked when an error is raised
        try:
            if err:
                raise RecordError(f"{where}: {err}")
            if not isinstance(obj, dict):
                raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
            rec = AnnotatedResponse.from_json(obj, where, max_chars=max_chars)
            reason = "duplicate id"
            if rec.id in seen:
                raise RecordError(f"{where}: duplicate id {rec.id!r} (first at line {seen[rec.id]})")
            reason = "image"
            images = [resolve_image_path(rel, root, where) for rel in rec.images]
            for rel, full in zip(rec.images, images):
                if not image_exists(full):
                    raise RecordError(f"{where}: image {rel!r} not found under {root}")
            reason = "no feedback"
            if not rec.annotations:
                raise RecordError(f"{where}: no feedback (empty 'annotations'; run the feedback stage on the "
                                  "sample stage's output first)")
            try:
                fb = feedback_from_json(rec.annotations)
            except FeedbackError as e:
                raise RecordError(f"{where}: unusable feedback: {e}") from None
            if not isinstance(fb.scores, dict):
                raise RecordError(f"{where}: feedback scores must be an object, got {type(fb.scores).__name__}")
            reason = "missing score"
            scores, overall = weighted_scores(fb.scores, weights, where)
            pid = rec.meta.get("source_id")
            if not isinstance(pid, str) or not pid:
                blob = json.dumps([rec.images, rec.prompt], sort_keys=True)
                pid = "p-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
            reason = "prompt mismatch"
            rel_images = [str(p.relative_to(root)) for p in images]
            p = prompts.get(pid)
            if p is not None and (p.images != rel_images or p.prompt != rec.prompt):
                raise RecordError(f"{where}: prompt {pid!r} has other images or messages than at {p.where}")
            if p is None:
                sid = rec.meta.get("scene_id")
                scene = None
                if scenes is not None:
                    reason = "no scene"
                    scene = (scenes.get(str(images[0])) if images else None) or by_id.get(sid)
                    if scene is None:
                        raise RecordError(f"{where}: no scene graph for image {rec.images[:1]} (scene_id {sid!r}) "
                                          f"in {data}/*/scenes.jsonl; injection and reference scoring need one")
                ref = rec.meta.get("reference")
                p = Prompt(id=pid, images=rel_images, image=str(images[0]) if images else None, prompt=rec.prompt,
                           scene=scene, scene_id=sid if sid is not None else (scene.scene_id if scene else None),
                           task=rec.meta.get("task"), reference=ref if isinstance(ref, str) and ref.strip() else None,
                           where=where)
            p.samples.append(Response(text=rec.response, source="sample", scores=scores, overall=overall,
                                      critique=fb.critique, refinement=fb.refinement,
                                      scored_by=str(rec.annotations.get("source", "unknown")), sample_id=rec.id))
            prompts[pid] = p
            seen[rec.id] = lineno
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"line": lineno, "reason": reason, "error": str(e), "record": obj})
    return list(prompts.values())


# ---------------------------------------------------------------------------------------------
# a model judge as a consumer stage's feedback source (prefs' injected copies, nlf's revisions)

#: the feedback source class a stage's ``--judge`` folder is loaded with by default
DEFAULT_JUDGE_CLASS = "models.feedback_sources.VLMJudgeSource"


def add_judge_arguments(ap, judge_help: str) -> None:
    """``--judge``, ``--judge-questions``, ``--judge-class`` and ``--trust-remote-code``, the same
    in every stage that can have a model judge score texts."""
    ap.add_argument("--judge", type=Path, help=judge_help)
    ap.add_argument("--judge-questions", choices=("caption", "lookup", "yesno"), default="caption",
                    help="how the judge verifies a claim (as in the feedback stage); only 'caption' (the default) "
                         "also gives helpfulness")
    ap.add_argument("--judge-class", default=DEFAULT_JUDGE_CLASS,
                    help=f"feedback source class to load --judge with (default {DEFAULT_JUDGE_CLASS})")
    ap.add_argument("--trust-remote-code", action="store_true", help="run custom model code from the --judge checkpoint")


def judge_stage_config(ap, args, judge: Path | None) -> tuple[dict | None, list[Path]]:
    """The stage-config entry and the input files of judge checkpoint ``judge`` (None: none, so a
    stage without a judge keeps the config it always had); ``ap.error`` when it is no checkpoint."""
    if judge is None:
        return None, []
    if not (judge / "config.json").exists():
        ap.error(f"--judge {judge}: no config.json there (a Hugging Face checkpoint folder?)")
    return ({"path": str(judge), "class": args.judge_class, "questions": args.judge_questions,
             "trust_remote_code": args.trust_remote_code},
            [judge / "config.json", *sorted(judge.glob("*.safetensors"))])


def weigh_feedback(fbs: list, wheres: list[str], weights: dict[str, float], who: str,
                   option: str) -> list[tuple[Any, dict[str, float], float]]:
    """``(feedback, weighted scores, overall)`` of each feedback (:func:`weighted_scores`), after
    checking that ``who`` (the source, for the message) gave every dimension ``weights`` names:
    a missing one is a :class:`RecordError` at ``where`` naming it and the ``option`` that set it."""
    out = []
    for fb, where in zip(fbs, wheres):
        missing = [d for d in weights if d not in fb.scores]
        if missing:
            hint = (" (a VLM judge gives helpfulness with --judge-questions caption only)"
                    if "helpfulness" in missing else "")
            raise RecordError(f"{where}: {who} gives no {', '.join(map(repr, missing))} score (it gives "
                              f"{sorted(fb.scores)}); {option} may name only those{hint}")
        out.append((fb, *weighted_scores(fb.scores, weights, where)))
    return out


def load_judge(args, judge: Path, **kwargs: Any):
    """The ``--judge`` checkpoint as a feedback source (``--judge-class``, ``--judge-questions``)."""
    from mmalign.components import load_component

    return load_component(args.judge_class, path=str(judge), questions=args.judge_questions,
                          trust_remote_code=args.trust_remote_code, **kwargs)
