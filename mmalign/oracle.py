"""Rule-based fine-grained feedback: claims, exact verdicts, per-segment labels and critiques.

Why: the later methods learn from feedback on the policy's own responses. FGAIF (Jing & Du 2024,
"FGAIF: Aligning Large Vision-Language Models with Fine-grained AI Feedback") labels every
sub-sentence of a response for object-existence, attribute and relation hallucination, by
extracting atomic facts and asking a VQA model about each; DRESS (Chen et al. 2023, "DRESS:
Instructing Large Vision-Language Models to Align and Interact with Humans via Natural Language
Feedback") trains on two kinds of natural-language feedback, a *critique* (what is right and
what is wrong) and a *refinement* (how to fix it). In the synthetic world every fact is known,
so this module produces the same signals exactly: :class:`WorldOracle` is the ground-truth
feedback source the model-based sources are measured against. :class:`CocoOracle` does the
object part for real images from their COCO annotations.

Claims (:func:`world_claims`) come from the world's own caption parser
(:func:`mmalign.world.parse_caption`):

* every positive mention gives an **object** claim about its category (the shape, as in CHAIR
  and POPE: "Is there a star in the image?");
* a mention that states a colour, size or number also gives one **attribute** claim; like the
  benchmark (:mod:`mmalign.eval.world_bench`) an attribute claim is checked only when its shape
  is in the scene -- for an absent shape the object claim carries the error and the attribute
  claim is unverifiable (None), so one wrong phrase is one hallucination, not two;
* every relation claim gives a **relation** claim, verifiable when both sides name exactly one
  object (:func:`mmalign.world.check_relation`).

Negated mentions ("no star") are not positive claims and give none, as in
:func:`mmalign.world.check_caption`; a stated total ("There are three objects") is not one of the
three types and gives none either. Verdicts reuse :func:`mmalign.world.check_mention` and
:func:`mmalign.world.check_relation`, so the oracle and the benchmark never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from mmalign import world as W
from mmalign.eval.vocab import ObjectVocabulary
from mmalign.feedback import (
    HALLUCINATION_TYPES,
    Claim,
    Feedback,
    FeedbackError,
    FeedbackItem,
    SegmentFeedback,
)
from mmalign.rewards import RewardForm, SegmentItem, rewards_from_labels
from mmalign.segments import DEFAULT_SEGMENTATION, check_segmentation, split_segments

__all__ = [
    "EVIDENCE_PROMPT",
    "CocoOracle",
    "OracleSegmentRewards",
    "WorldOracle",
    "caption_verdict",
    "coco_claims",
    "critique_and_refinement",
    "explain_world_claim",
    "load_world_scenes",
    "lookup_questions",
    "lookup_verdict",
    "segment_feedback",
    "verify_world_claim",
    "world_claims",
]

_TYPE_ORDER = {t: k for k, t in enumerate(HALLUCINATION_TYPES)}


# ---------------------------------------------------------------------------------------------
# claims


def _mention_meta(m: W.Mention) -> dict[str, Any]:
    return {"shape": m.shape, "color": m.color, "size": m.size, "count": m.count, "negated": m.negated}


def _name(meta: Mapping[str, Any], with_size: bool = False, plural: bool = False) -> str:
    """'red circle', 'large red circle', 'red circles' from structured meta (unstated parts left out)."""
    shape = meta.get("shape") or meta.get("category") or "object"
    words = [meta.get("size") if with_size else None, meta.get("color"), W._plural(shape) if plural else shape]
    return " ".join(w for w in words if w)


def _mention_from_meta(meta: Mapping[str, Any], claim: Claim) -> W.Mention:
    count = meta.get("count")
    return W.Mention(meta["shape"], meta.get("color"), meta.get("size"), count, count is not None,
                     bool(meta.get("negated", False)), claim.start, claim.end, claim.text)


def _attribute_question(meta: Mapping[str, Any]) -> str:
    shape, color, size, count = meta["shape"], meta["color"], meta["size"], meta["count"]
    if count is not None:
        what = _name(meta, with_size=True, plural=True)
        return f"Are there {W.NUMBER_WORDS[count] if count < len(W.NUMBER_WORDS) else count} {what} in the image?"
    if color is not None and size is not None:
        return f"Is the {color} {shape} {size}?"
    what = _name(meta, with_size=True)
    return f"Is there {W.article(what)} {what} in the image?"


def world_claims(response: str) -> list[Claim]:
    """Every checkable claim of ``response`` (module docstring), ordered by start offset.

    Offsets are the parser's: a mention's span covers its determiner/number and adjectives
    ("a large red star"); a relation claim spans from its subject to its object ("The red circle
    is left of the blue square"). ``meta`` of attribute claims always has ``shape``, ``color``,
    ``size``, ``count`` (None when unstated); relation claims have ``subject``/``object`` names
    ("red circle"), ``relation``, ``negated`` and the two sides in full (``subject_mention``,
    ``object_mention``) so :func:`verify_world_claim` needs nothing but the claim.
    """
    parsed = W.parse_caption(response)
    out: list[Claim] = []
    for m in parsed.mentions:
        if m.negated:
            continue
        out.append(Claim("object", m.text, m.start, m.end, f"Is there {W.article(m.shape)} {m.shape} in the image?",
                         {"shape": m.shape}))
        if m.color is not None or m.size is not None or m.count is not None:
            meta = {"shape": m.shape, "color": m.color, "size": m.size, "count": m.count}
            out.append(Claim("attribute", m.text, m.start, m.end, _attribute_question(meta), meta))
    for r in parsed.relations:
        s, o = _name(_mention_meta(r.subject)), _name(_mention_meta(r.object))
        q = f"Is the {s} {'not ' if r.negated else ''}{r.relation} the {o}?"
        out.append(Claim("relation", response[r.start:r.end], r.start, r.end, q,
                         {"subject": s, "relation": r.relation, "object": o, "negated": r.negated,
                          "subject_mention": _mention_meta(r.subject), "object_mention": _mention_meta(r.object)}))
    out.sort(key=lambda c: (c.start, _TYPE_ORDER[c.type], c.end))
    return out


def _check(claim: Claim, scene: W.Scene) -> W.MentionCheck | W.RelationCheck | None:
    meta = claim.meta
    if claim.type == "attribute":
        return W.check_mention(scene, _mention_from_meta(meta, claim))
    if claim.type == "relation":
        subj = _mention_from_meta(meta["subject_mention"], claim)
        obj = _mention_from_meta(meta["object_mention"], claim)
        rc = W.RelationClaim(subj, meta["relation"], obj, bool(meta.get("negated", False)), claim.start, claim.end)
        return W.check_relation(scene, rc)
    return None


def verify_world_claim(claim: Claim, scene: W.Scene) -> bool | None:
    """The exact truth of a :func:`world_claims` claim in ``scene``.

    object: its shape is in the scene. attribute: None when the shape is absent (the object
    claim carries that error), else :func:`mmalign.world.check_mention` says CORRECT (a wrong
    colour -- no object of that shape has it -- wrong size or wrong number is False). relation:
    :func:`mmalign.world.check_relation`; None when a side does not name exactly one object or
    the offset is in the ambiguous band.
    """
    if claim.type == "object":
        return bool(scene.find(shape=claim.meta["shape"]))
    if claim.type == "attribute":
        if not scene.find(shape=claim.meta["shape"]):
            return None
        return _check(claim, scene).label == W.MentionLabel.CORRECT  # type: ignore[union-attr]
    if claim.type == "relation":
        label = _check(claim, scene).label  # type: ignore[union-attr]
        return None if label == W.RelationLabel.UNVERIFIABLE else label == W.RelationLabel.CORRECT
    raise ValueError(f"claim {claim.text!r}: unknown type {claim.type!r}")


def lookup_questions(claim: Claim) -> dict[str, str]:
    """The content questions a TIFA-style judge asks to verify a :func:`world_claims` claim,
    keyed by what each answer is read for: ``colors`` (colours of the claim's shape; "There is
    no star." = absent), ``size`` (of the named object), ``relations`` (from subject to object)
    and ``subject_colors`` / ``object_colors`` (whether the relation's two sides exist).

    Why content questions: the tiny VLMs answer "What color is the star?" from the image at 90%+
    where they answer "Is there a star?" at chance (docs/TESTBED.md), and comparing the answer
    with the claim is exact in code -- as TIFA asks a VQA model and compares the answers.
    """
    meta = claim.meta
    if claim.type in ("object", "attribute"):
        qs = {"colors": W.LOOKUP_COLOR_TEMPLATE.format(s=meta["shape"])}
        if claim.type == "attribute" and meta.get("size") is not None and meta.get("color") is not None:
            qs["size"] = W.LOOKUP_SIZE_TEMPLATE.format(n=f"{meta['color']} {meta['shape']}")
        return qs
    if claim.type == "relation":
        s, o = meta["subject_mention"], meta["object_mention"]
        return {"subject_colors": W.LOOKUP_COLOR_TEMPLATE.format(s=s["shape"]),
                "object_colors": W.LOOKUP_COLOR_TEMPLATE.format(s=o["shape"]),
                "relations": W.LOOKUP_RELATION_TEMPLATE.format(a=meta["subject"], b=meta["object"])}
    raise ValueError(f"claim {claim.text!r}: unknown type {claim.type!r}")


def _named_exists(mention: Mapping[str, Any], colors: list[str] | None) -> bool | None:
    if colors is None:
        return None
    return bool(colors) if mention.get("color") is None else mention["color"] in colors


def lookup_verdict(claim: Claim, answers: Mapping[str, str]) -> bool | None:
    """The claim's verdict from the answers to :func:`lookup_questions` (same keys), by the
    rules of :func:`verify_world_claim`: object = its shape has a colour; attribute = None when
    the shape is absent, False when the stated colour is not among the shape's colours or the
    stated size differs, else True (a stated number is not checked: None); relation = None
    unless both sides exist, else whether the relation is among those answered (negated: not).
    An answer that cannot be parsed gives None.
    """
    meta = claim.meta
    if claim.type == "object":
        colors = W.parse_lookup_colors(answers["colors"])
        return None if colors is None else bool(colors)
    if claim.type == "attribute":
        colors = W.parse_lookup_colors(answers["colors"])
        if not colors:
            return None  # shape absent (the object claim carries it) or unparseable
        if meta.get("color") is not None and meta["color"] not in colors:
            return False
        if "size" in answers:
            size = W.parse_lookup_size(answers["size"])
            if size is None:
                return None
            if size != meta["size"]:
                return False
        if meta.get("count") is not None:
            return None
        return True
    if claim.type == "relation":
        if not (_named_exists(meta["subject_mention"], W.parse_lookup_colors(answers["subject_colors"]))
                and _named_exists(meta["object_mention"], W.parse_lookup_colors(answers["object_colors"]))):
            return None
        rels = W.parse_lookup_relations(answers["relations"])
        if rels is None:
            return None
        holds = meta["relation"] in rels
        return (not holds) if meta.get("negated") else holds
    raise ValueError(f"claim {claim.text!r}: unknown type {claim.type!r}")


#: What the judge is asked in ``caption`` mode: its own description is the evidence.
EVIDENCE_PROMPT = "Describe the image in detail."


def caption_verdict(claim: Claim, evidence: W.ParsedCaption) -> bool | None:
    """The claim's verdict against a description of the image (the judge's own caption, parsed
    by :func:`mmalign.world.parse_caption`), by the rules of :func:`verify_world_claim`:

    * object: True when the description names the shape, else False;
    * attribute: None when the description does not name the shape (the object claim carries it);
      False when no described object of that shape has the stated colour, or the one with that
      colour has another size; True when they agree; None for a stated number or an undescribed
      size;
    * relation: True when the description states it (or its converse: "B is right of A" for "A is
      left of B"), False when it states the opposite, else None (the description says nothing
      about this pair on that axis); negated claims flip.

    A description that omits an object the claim names makes the object claim False: the judge
    is only as good as its description, which is why it is trained longer than the policy and
    its agreement with the oracle is reported beside every result.
    """
    seen = [m for m in evidence.mentions if not m.negated]
    meta = claim.meta
    if claim.type == "object":
        return any(m.shape == meta["shape"] for m in seen)
    if claim.type == "attribute":
        same_shape = [m for m in seen if m.shape == meta["shape"]]
        if not same_shape:
            return None
        if meta.get("color") is not None:
            same = [m for m in same_shape if m.color == meta["color"]]
            if not same:
                return False
            if meta.get("size") is not None:
                sizes = {m.size for m in same if m.size is not None}
                if not sizes:
                    return None
                if meta["size"] not in sizes:
                    return False
        elif meta.get("size") is not None and meta["size"] not in {m.size for m in same_shape}:
            return False
        return None if meta.get("count") is not None else True
    if claim.type == "relation":
        def key(m: Mapping[str, Any] | W.Mention) -> tuple[str | None, str]:
            return (m["color"], m["shape"]) if isinstance(m, Mapping) else (m.color, m.shape)

        stated: set[tuple[tuple, str, tuple]] = set()
        for r in evidence.relations:
            if r.negated:
                continue
            a, b = key(r.subject), key(r.object)
            stated.add((a, r.relation, b))
            stated.add((b, W.OPPOSITE[r.relation], a))
        a, b = key(meta["subject_mention"]), key(meta["object_mention"])
        rel = meta["relation"]
        if (a, rel, b) in stated:
            holds = True
        elif (a, W.OPPOSITE[rel], b) in stated:
            holds = False
        else:
            return None
        return (not holds) if meta.get("negated") else holds
    raise ValueError(f"claim {claim.text!r}: unknown type {claim.type!r}")


def explain_world_claim(claim: Claim, scene: W.Scene) -> dict[str, Any]:
    """Hints for a refinement when ``claim`` is false: which part is wrong and what is true.

    attribute: ``{"wrong": "color", "actual": [colours of that shape in the scene]}``,
    ``{"wrong": "size", "actual": "small"}`` or ``{"wrong": "count", "actual": 1}``;
    relation: ``{"actual": "right of"}`` (the opposite holds) or ``{"actual": "level"}`` (aligned
    on that axis) -- for a negated claim ``actual`` is the relation itself. ``{}`` when the claim
    holds or cannot be checked.
    """
    if verify_world_claim(claim, scene) is not False:
        return {}
    meta = claim.meta
    if claim.type == "attribute":
        mc = _check(claim, scene)
        wrong = mc.wrong_attributes[0] if mc.wrong_attributes else "color"  # type: ignore[union-attr]
        if wrong == "color":
            return {"wrong": "color", "actual": sorted({scene.objects[i].color for i in scene.find(shape=meta["shape"])})}
        if wrong == "size":
            sizes = sorted({scene.objects[i].size for i in mc.matched})  # type: ignore[union-attr]
            return {"wrong": "size", "actual": sizes[0] if len(sizes) == 1 else sizes}
        matched = [i for i in scene.find(color=meta["color"], shape=meta["shape"])
                   if meta["size"] is None or scene.objects[i].size == meta["size"]]
        return {"wrong": "count", "actual": len(matched)}
    if claim.type == "relation":
        if meta.get("negated"):
            return {"actual": meta["relation"]}
        rc = _check(claim, scene)
        opp = W.OPPOSITE[meta["relation"]]
        holds = scene.relation_truth(rc.subject_index, opp, rc.object_index)  # type: ignore[union-attr,arg-type]
        return {"actual": opp if holds else "level"}
    return {}


def coco_claims(response: str, vocab: ObjectVocabulary) -> list[Claim]:
    """One object claim per object mention found by ``vocab`` (CHAIR's parser on COCO):
    "Is there a dog in the image?". ``meta`` holds the canonical ``category`` and, for code that
    reads world claims, the same name under ``shape``."""
    out = []
    for m in vocab.extract(response):
        out.append(Claim("object", m.surface, m.start, m.end, f"Is there {W.article(m.category)} {m.category} in the image?",
                         {"category": m.category, "shape": m.category}))
    return out


# ---------------------------------------------------------------------------------------------
# segments


def segment_feedback(response: str, claims: Sequence[Claim], verdicts: Sequence[bool | None],
                     segmentation: str = DEFAULT_SEGMENTATION) -> list[SegmentFeedback]:
    """Per-segment labels (FGAIF): each claim goes to the segment holding its end offset.

    Per type, a segment is "hallucinated" when one of its claims of that type is False, else
    "correct" when one is True, else "n/a" (no claim of that type, or only unverifiable ones).
    Segments come from :func:`mmalign.segments.split_segments` with ``segmentation`` (the
    released splitter by default, ``"fine"`` for one segment per object phrase).
    """
    if len(claims) != len(verdicts):
        raise ValueError(f"{len(claims)} claims but {len(verdicts)} verdicts")
    segs = split_segments(response, segmentation)
    out = [SegmentFeedback(s.index, s.start, s.end, s.text, {}) for s in segs]
    for c, v in zip(claims, verdicts):
        home = next((sf for sf in out if sf.start < c.end <= sf.end), None)
        if home is None:
            raise ValueError(f"claim {c.text!r} ends at character {c.end}, which is in no segment of the response "
                             f"({len(response)} characters)")
        home.claims.append(c)
        home.verdicts.append(v)
    for sf in out:
        for t in HALLUCINATION_TYPES:
            vs = [v for c, v in zip(sf.claims, sf.verdicts) if c.type == t]
            sf.labels[t] = "hallucinated" if False in vs else "correct" if True in vs else "n/a"
    return out


# ---------------------------------------------------------------------------------------------
# DRESS-style natural-language feedback


def _join_names(names: Sequence[str]) -> str:
    items = [f"the {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _mention_sentences(obj: tuple[Claim, bool | None] | None,
                       attr: tuple[Claim, bool | None] | None) -> tuple[str | None, str | None]:
    """(critique, refinement) for one mention's object and attribute claims."""
    meta = dict((attr or obj)[0].meta)  # type: ignore[index]
    plural = meta.get("count") is not None
    ident = _name(meta, plural=plural)  # identity: colour + shape, as in the world
    if obj is not None and obj[1] is False:
        shape = meta.get("category") or meta["shape"]
        return f"There is no {shape} in the image.", f"Remove the {ident}."
    if attr is not None and attr[1] is False:
        a = attr[0].meta
        wrong, actual = a.get("wrong"), a.get("actual")
        shape, color, size, count = a["shape"], a.get("color"), a.get("size"), a.get("count")
        if wrong == "color":
            crit = f"There is no {color} {shape} in the image."
            if isinstance(actual, list) and len(actual) == 1:
                return crit + f" The {shape} is {actual[0]}.", f"Call the {shape} {actual[0]}, not {color}."
            return crit, f"Correct the colour of the {color} {shape}."
        if wrong == "size":
            crit = f"The {_name(a)} is not {size}."
            if isinstance(actual, str):
                return crit + f" It is {actual}.", f"Describe the {_name(a)} as {actual}, not {size}."
            return crit, f"Correct the size of the {_name(a)}."
        if wrong == "count" and count is not None:
            many = _name(a, with_size=True, plural=True)
            crit = f"There are not {_number(count)} {many} in the image."
            if isinstance(actual, int):
                n = _number(actual)
                verb = "is" if actual == 1 else "are"
                return crit, f"Say there {verb} {n} {_name(a, with_size=True, plural=actual != 1)}, not {_number(count)}."
            return crit, f"Correct the number of {many}."
        return f"The description of the {ident} is wrong.", f"Correct the {ident}."
    verdicts = [x[1] for x in (obj, attr) if x is not None]
    if True in verdicts:
        if plural:
            return f"The {_number(meta['count'])} {_name(meta, with_size=True, plural=True)} are correct.", None
        return f"The {_name(meta, with_size=True)} is correct.", None
    return None, None


def _number(n: int) -> str:
    return W.number_word(n) if 0 <= n < len(W.NUMBER_WORDS) else str(n)


def _relation_sentences(claim: Claim, verdict: bool | None) -> tuple[str | None, str | None]:
    m = claim.meta
    s, rel, o = m["subject"], m["relation"], m["object"]
    if verdict is None:
        return None, None
    if verdict:
        return f"The {s} is {'not ' if m.get('negated') else ''}{rel} the {o}: correct.", None
    if m.get("negated"):
        return f"The {s} is in fact {rel} the {o}.", f"Say that the {s} is {rel} the {o}."
    actual = m.get("actual")
    if actual == "level":
        axis = "column" if W.RELATION_AXIS[rel] == "x" else "row"
        return (f"The {s} is not {rel} the {o}: they are in the same {axis}.",
                f"Remove the claim that the {s} is {rel} the {o}.")
    if actual in W.RELATIONS:
        return f"The {s} is {actual} the {o}, not {rel} it.", f"Say that the {s} is {actual} the {o}."
    return f"The {s} is not {rel} the {o}.", f"Correct the position of the {s} relative to the {o}."


def critique_and_refinement(segments: Sequence[SegmentFeedback], missing: Sequence[str] = ()) -> tuple[str, str]:
    """DRESS's two kinds of feedback, written from the labelled claims by fixed templates.

    The critique walks the claims in text order: a correct mention -> "The small green square
    is correct."; an absent object -> "There is no star in the image."; a wrong colour -> "There
    is no blue circle in the image. The circle is red." (the second sentence only when the claim's
    meta has the oracle's ``actual`` hint); a wrong size -> "The red circle is not small. It is
    large."; a wrong relation -> "The green square is left of the red circle, not right of it.";
    a correct relation -> "The red circle is left of the blue square: correct." (its correct
    sides are not repeated); unverifiable claims are passed over. ``missing`` object names add
    "The answer does not mention the red circle." Then "There is no hallucination in the answer." when nothing is
    wrong. The refinement lists one fix per error ("Remove the star.", "Call the circle red, not
    blue.", "Say that the green square is left of the red circle.", "Also mention the red
    circle."), or "No change is needed.". Repeated sentences are said once. An empty response
    (no segments) -> ("The answer is empty.", "Describe the objects in the image.").
    Deterministic: the same segments always give the same text.
    """
    crit: list[str] = []
    fixes: list[str] = []
    n_checked = n_wrong = 0
    for seg in segments:
        groups: dict[tuple[int, int], dict[str, tuple[Claim, bool | None]]] = {}
        items: list[tuple[str, Any]] = []
        rel_claims = [(c, v) for c, v in zip(seg.claims, seg.verdicts) if c.type == "relation"]
        for c, v in zip(seg.claims, seg.verdicts):
            if v is not None:
                n_checked += 1
                n_wrong += v is False
            if c.type == "relation":
                items.append(("relation", (c, v)))
            else:
                key = (c.start, c.end)
                if key not in groups:
                    groups[key] = {}
                    items.append(("mention", key))
                groups[key][c.type] = (c, v)
        for kind, x in items:
            if kind == "relation":
                cs, fs = _relation_sentences(*x)
            else:
                g = groups[x]
                cs, fs = _mention_sentences(g.get("object"), g.get("attribute"))
                if fs is None and any(r.start <= x[0] and x[1] <= r.end for r, _v in rel_claims):
                    cs = None  # a correct side of a relation: the relation's sentence speaks for it
            if cs:
                crit.append(cs)
            if fs:
                fixes.append(fs)
    if not segments:
        crit.append("The answer is empty.")
    elif n_checked == 0:
        crit.append("The answer makes no claim that can be checked against the image.")
    if missing:
        crit.append(f"The answer does not mention {_join_names(missing)}.")
        fixes.append(f"Also mention {_join_names(missing)}.")
    if segments and n_checked and not n_wrong:
        crit.append("There is no hallucination in the answer.")
    if not segments and not fixes:
        fixes.append("Describe the objects in the image.")
    critique = " ".join(dict.fromkeys(_cap(s) for s in crit))
    refinement = " ".join(dict.fromkeys(_cap(s) for s in fixes)) or "No change is needed."
    return critique, refinement


# ---------------------------------------------------------------------------------------------
# feedback sources


def _label_counts(segments: Sequence[SegmentFeedback]) -> dict[str, int]:
    return {t: sum(1 for s in segments for c, v in zip(s.claims, s.verdicts) if c.type == t and v is False)
            for t in HALLUCINATION_TYPES}


class WorldOracle:
    """The ground-truth feedback source for the synthetic world (a :class:`FeedbackSource`).

    Args:
        scenes: scene graphs keyed by image path (``FeedbackItem.image``); an item whose image is
            not a key is looked up by ``item.meta["scene_id"]`` (as a key, or as a scene's
            ``scene_id``), then by the normalised path.
        mention_missing: name the uncovered scene objects in the critique/refinement (DRESS's
            helpfulness side); turn off for answers that are not meant to describe the scene.
        segmentation: how responses are cut into labelled segments (:mod:`mmalign.segments`:
            "released", the default, or "fine").

    Per item: ``segments`` with FGAIF labels; ``scores["faithfulness"]`` = share of verifiable
    claims that hold (1.0 when there are none); ``scores["helpfulness"]`` = share of the scene's
    objects a correct mention identifies (:attr:`mmalign.world.CaptionCheck.coverage`);
    ``critique`` / ``refinement`` from :func:`critique_and_refinement`; ``meta`` with the
    scene id and per-type counts of false claims (``hallucinated``) and of unverifiable claims.
    """

    name = "oracle"

    def __init__(self, scenes: Mapping[str, W.Scene], mention_missing: bool = True,
                 segmentation: str = DEFAULT_SEGMENTATION) -> None:
        self.segmentation = check_segmentation(segmentation)
        self.scenes = dict(scenes)
        for k, s in self.scenes.items():
            if not isinstance(s, W.Scene):
                raise TypeError(f"oracle: scene for {k!r} is a {type(s).__name__}, not a world.Scene")
        self._by_id = {s.scene_id: s for s in self.scenes.values() if s.scene_id}
        self._by_norm = {os.path.normpath(k): s for k, s in self.scenes.items()}
        self.mention_missing = mention_missing

    def scene_for(self, item: FeedbackItem) -> W.Scene:
        """The scene of ``item``; a :class:`FeedbackError` naming the item when there is none."""
        if item.image is not None:
            if item.image in self.scenes:
                return self.scenes[item.image]
        sid = item.meta.get("scene_id") if isinstance(item.meta, Mapping) else None
        if sid is not None:
            if sid in self.scenes:
                return self.scenes[sid]
            if sid in self._by_id:
                return self._by_id[sid]
        if item.image is not None and os.path.normpath(item.image) in self._by_norm:
            return self._by_norm[os.path.normpath(item.image)]
        raise FeedbackError(
            f"oracle: item {item.id!r}: no scene for image {item.image!r}"
            + (f" or scene_id {sid!r}" if sid is not None else "")
            + f" (the oracle knows {len(self.scenes)} scenes)")

    def feedback(self, item: FeedbackItem, scene: W.Scene) -> Feedback:
        """Feedback on one item against a given scene."""
        claims = world_claims(item.response)
        verdicts = [verify_world_claim(c, scene) for c in claims]
        # hints for the refinement ("the circle is red"), kept in the claims' meta
        claims = [Claim(c.type, c.text, c.start, c.end, c.question, {**c.meta, **explain_world_claim(c, scene)})
                  if v is False else c for c, v in zip(claims, verdicts)]
        segments = segment_feedback(item.response, claims, verdicts, self.segmentation)
        checked = [v for v in verdicts if v is not None]
        check = W.check_caption(W.parse_caption(item.response), scene)
        # named in the critique: objects no positive mention refers to at all (a mention with a
        # wrong size still refers to its object; its error is reported on its own)
        referred = {i for mc in check.mentions if mc.label != W.MentionLabel.NEGATED for i in mc.matched}
        missing = [scene.objects[i].name() for i in scene.reading_order() if i not in referred]
        critique, refinement = critique_and_refinement(segments, missing if self.mention_missing else ())
        return Feedback(
            id=item.id,
            scores={"faithfulness": sum(checked) / len(checked) if checked else 1.0, "helpfulness": check.coverage},
            critique=critique, refinement=refinement,
            meta={"scene_id": scene.scene_id, "hallucinated": _label_counts(segments),
                  "unverifiable": sum(v is None for v in verdicts), "claims": len(claims)},
            segments=segments)

    def annotate(self, items: Sequence[FeedbackItem]) -> list[Feedback]:
        return [self.feedback(it, self.scene_for(it)) for it in items]


class CocoOracle:
    """Object-level feedback for real images from their annotated objects (a :class:`FeedbackSource`).

    Args:
        objects_per_image: image path -> the object categories annotated in it (COCO
            ``instances_*.json`` names; synonyms are normalised through ``vocab``).
        vocab: the parser of object mentions; CHAIR's COCO table by default.
        segmentation: how responses are cut into labelled segments (:mod:`mmalign.segments`).

    Only object claims can be checked (COCO has no attribute or relation ground truth), so
    attribute and relation labels are "n/a". ``scores["faithfulness"]`` = share of mentioned
    objects that are annotated (1 - CHAIR-i per response; 1.0 with no mention).
    """

    name = "coco_oracle"

    def __init__(self, objects_per_image: Mapping[str, Collection[str]], vocab: ObjectVocabulary | None = None,
                 segmentation: str = DEFAULT_SEGMENTATION) -> None:
        self.segmentation = check_segmentation(segmentation)
        self.vocab = vocab if vocab is not None else ObjectVocabulary.coco()
        self.objects: dict[str, frozenset[str]] = {}
        for img, names in objects_per_image.items():
            if isinstance(names, (str, bytes)):
                raise TypeError(f"coco oracle: image {img!r}: objects must be a list of names, not one string")
            self.objects[img] = frozenset(self.vocab.normalize(n) or n for n in names)

    def annotate(self, items: Sequence[FeedbackItem]) -> list[Feedback]:
        out = []
        for it in items:
            if it.image not in self.objects:
                raise FeedbackError(f"coco oracle: item {it.id!r}: no annotated objects for image {it.image!r} "
                                    f"(the oracle knows {len(self.objects)} images)")
            present = self.objects[it.image]
            claims = coco_claims(it.response, self.vocab)
            verdicts: list[bool | None] = [c.meta["category"] in present for c in claims]
            segments = segment_feedback(it.response, claims, verdicts, self.segmentation)
            critique, refinement = critique_and_refinement(segments)
            out.append(Feedback(
                id=it.id, scores={"faithfulness": sum(map(bool, verdicts)) / len(verdicts) if verdicts else 1.0},
                critique=critique, refinement=refinement,
                meta={"hallucinated": _label_counts(segments), "claims": len(claims)}, segments=segments))
        return out


def load_world_scenes(data: str | os.PathLike) -> dict[str, W.Scene]:
    """Absolute image path -> scene graph, over every split of a data stage folder."""
    from pathlib import Path

    from mmalign.records import read_scenes

    data = Path(data)
    files = sorted(data.glob("*/scenes.jsonl"))
    if not files:
        raise FileNotFoundError(f"{data}: no <split>/scenes.jsonl (is this the data stage's folder?)")
    return {str((data / image).resolve()): scene for f in files for scene, image in read_scenes(f)}


class OracleSegmentRewards:
    """The scene-graph oracle's per-segment labels as fine-grained rewards: -1 hallucinated,
    +1 correct, 0 n/a, for the segments of :func:`split_segments` with ``segmentation`` -- a drop-in for a trained
    fine-grained reward model (it implements :class:`mmalign.rewards.SegmentRewardModel`), so PPO can be run
    with *perfect* rewards as a control: what FGAIF's machinery does when the reward models are
    right. ``items`` carry the image path (``images[0]``) the oracle looks the scene up by."""

    types = HALLUCINATION_TYPES

    def __init__(self, scenes: Mapping[str, W.Scene], segmentation: str = DEFAULT_SEGMENTATION) -> None:
        self.oracle = WorldOracle(scenes, mention_missing=False, segmentation=segmentation)
        self.segmentation = self.oracle.segmentation

    def segment_rewards(self, items: Sequence[SegmentItem], mode: RewardForm = "label", batch_size: int = 16,
                        types: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per item and type the oracle's ``(S_i,)`` segment rewards (``mode`` and ``batch_size``
        do not apply: the labels are exact, and there is no model to batch)."""
        import torch

        types = list(types or self.types)
        out = []
        for it in items:
            image = it.images[0] if it.images else None
            item = FeedbackItem(id=str(it.id), prompt="", response=it.response,
                                image=str(image) if image is not None else None)
            if not it.response.strip():
                out.append({t: torch.zeros(0) for t in types})
                continue
            fb = self.oracle.feedback(item, self.oracle.scene_for(item))
            out.append(rewards_from_labels(fb.segments, types))
        return out

    def to(self, device: Any) -> OracleSegmentRewards:
        return self
