"""Hallucination injection: a minimally different, hallucinated version of a response.

Why: preference methods need a *rejected* answer that differs from the chosen one only in a
hallucination, so the pair teaches faithfulness and nothing else. Re-Align (Xing et al. 2025,
"Re-Align: Aligning Vision Language Models via Retrieval-Augmented Direct Preference
Optimization") builds rejected answers by injecting hallucinations into a correct answer; the
MM-RLHF-style pairs here do the same. In the synthetic world the edit is exact and checked:
:func:`inject` changes one claim of one type and leaves every other claim's verdict as it was.

Kinds (:data:`INJECTION_KINDS`, the FGAIF / AMBER hallucination types):

* ``object`` -- add an object whose *shape* is absent from the scene (object existence is about
  the category, as in CHAIR/POPE). It is inserted into the response's object list ("a red
  circle, a large green star and a blue square"), written in the list's own style (with size
  and colour when the list's first item has them), or, when there is no list, appended as a
  sentence ("There is also a small green star."). A stated total ("There are two objects") is
  left as it was. Its colour/size claim is unverifiable (the shape is absent), so exactly one
  new False claim appears.
* ``attribute`` -- one correct mention that states a colour or size gets a colour that no object
  of that shape has, or the other size ("a small red circle" -> "a large red circle"). Mentions
  that are a side of a relation claim are left alone (renaming them would also make the
  relation unverifiable). An "a"/"an" right before the changed word is fixed with it.
* ``relation`` -- one correct relation claim is flipped: left of <-> right of, above <-> below
  ("over"/"on top of" -> "below", "under"/"beneath" -> "above").

Every candidate edit is re-checked with :mod:`mmalign.oracle` before it is offered: the claims
of the new text must be those of the old (same order) with exactly one verdict turned from
True to False -- or, for ``object``, the old claims plus the new mention's claims, exactly one of
them False and the rest unverifiable. The edit is then drawn with ``rng`` (deterministic for a
given seed). When no candidate exists a :class:`ValueError` says why.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from mmalign import world as W
from mmalign.feedback import HALLUCINATION_TYPES, Claim
from mmalign.oracle import verify_world_claim, world_claims

__all__ = ["INJECTION_KINDS", "Injection", "inject"]

#: one kind of injected hallucination per hallucination type
INJECTION_KINDS: tuple[str, ...] = HALLUCINATION_TYPES


@dataclass(frozen=True)
class Injection:
    """The hallucinated text and the changed span in it: ``text[start:end] == replacement``,
    which replaced ``original`` ("" for an insertion) of the old text."""

    text: str
    kind: str
    start: int
    end: int
    original: str
    replacement: str


@dataclass(frozen=True)
class _Edit:
    start: int  # span in the OLD text
    end: int
    replacement: str
    new_start: int  # offset of the changed span in the NEW text (start, unless something is inserted before it)
    new_end: int
    slot: tuple = ()  # what is changed (mention and attribute); a slot is drawn first, then its value


def _apply(text: str, e: _Edit) -> str:
    return text[:e.start] + e.replacement + text[e.end:]


def _verdicts(claims: list[Claim], scene: W.Scene) -> list[bool | None]:
    return [verify_world_claim(c, scene) for c in claims]


def _key(c: Claim) -> tuple:
    return (c.type, c.question)


def _valid(old: list[Claim], old_v: list[bool | None], new_text: str, scene: W.Scene, kind: str,
           span: tuple[int, int]) -> bool:
    """The edit changed exactly one claim in the intended way (see the module docstring)."""
    new = world_claims(new_text)
    new_v = _verdicts(new, scene)
    if kind == "object":
        inside = [k for k, c in enumerate(new) if c.type != "relation" and span[0] <= c.start and c.end <= span[1]]
        rest = [k for k in range(len(new)) if k not in inside]
        if [new_v[k] for k in rest] != old_v or [new[k].type for k in rest] != [c.type for c in old]:
            return False
        got = sorted((new[k].type, new_v[k]) for k in inside)
        return got == [("attribute", None), ("object", False)] or got == [("object", False)]
    if len(new) != len(old) or [c.type for c in new] != [c.type for c in old]:
        return False
    changed = [k for k in range(len(new)) if new_v[k] != old_v[k]]
    return (len(changed) == 1 and old_v[changed[0]] is True and new_v[changed[0]] is False
            and new[changed[0]].type == kind)


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _word_edit(text: str, ws: int, we: int, new_word: str) -> _Edit:
    """Replace text[ws:we] by new_word, fixing an "a"/"an" directly before it."""
    new_word = _match_case(new_word, text[ws:we])
    m = re.search(r"\b(an?)(\s+)$", text[:ws], flags=re.IGNORECASE)
    if m and m.group(1).lower() != W.article(new_word):
        art = _match_case(W.article(new_word), m.group(1))
        return _Edit(m.start(), we, art + m.group(2) + new_word, m.start(), m.start() + len(art + m.group(2) + new_word))
    return _Edit(ws, we, new_word, ws, ws + len(new_word))


def _attribute_edits(text: str, claims: list[Claim], verdicts: list[bool | None], scene: W.Scene) -> list[_Edit]:
    in_relation = set()
    for r in W.parse_caption(text).relations:
        in_relation.update({(r.subject.start, r.subject.end), (r.object.start, r.object.end)})
    edits = []
    for c, v in zip(claims, verdicts):
        if c.type != "attribute" or v is not True or (c.start, c.end) in in_relation:
            continue
        words = [(m.group(), c.start + m.start(), c.start + m.end()) for m in re.finditer(r"[A-Za-z]+", c.text)]
        for w, ws, we in words:
            lw = w.lower()
            if lw in W.COLOR_WORDS and c.meta.get("color") is not None:
                have = {scene.objects[i].color for i in scene.find(shape=c.meta["shape"])}
                for col in W.COLORS:
                    if col not in have:
                        edits.append(replace(_word_edit(text, ws, we, col), slot=(ws, "color")))
            elif lw in W.SIZE_WORDS and W.SIZE_WORDS[lw] in W.SIZES and c.meta.get("size") is not None:
                other = next(z for z in W.SIZES if z != W.SIZE_WORDS[lw])
                edits.append(replace(_word_edit(text, ws, we, other), slot=(ws, "size")))
    return edits


_FLIP = {"left": "right", "right": "left", "above": "below", "over": "below", "below": "above",
         "under": "above", "underneath": "above", "beneath": "above"}


def _relation_edits(text: str, claims: list[Claim], verdicts: list[bool | None]) -> list[_Edit]:
    edits = []
    for r in W.parse_caption(text).relations:
        match = next(((c, v) for c, v in zip(claims, verdicts)
                      if c.type == "relation" and (c.start, c.end) == (r.start, r.end)
                      and c.meta["relation"] == r.relation), None)
        if match is None or match[1] is not True:
            continue
        between = text[r.subject.end:r.object.start]
        for m in re.finditer(r"\b(on top of|left|right|above|over|below|under|underneath|beneath)\b", between,
                             flags=re.IGNORECASE):
            word = m.group(1)
            new = "below" if word.lower() == "on top of" else _FLIP[word.lower()]
            ws = r.subject.end + m.start(1)
            edits.append(_Edit(ws, ws + len(word), _match_case(new, word), ws, ws + len(new)))
            break
    return edits


def _object_phrase(scene: W.Scene, style: W.Mention | None, shape: str, color: str, size: str) -> str:
    with_size = style is None or style.size is not None
    with_color = style is None or style.color is not None
    words = " ".join(w for w in (size if with_size else None, color if with_color else None, shape) if w)
    return f"{W.article(words)} {words}"


def _list_runs(text: str, mentions: tuple[W.Mention, ...]) -> list[list[W.Mention]]:
    """Runs of positive, singular mentions joined only by ", " / " and " / ", and " (an object list);
    a lone mention right after a colon that ends its sentence ("There is one object: a red star.")
    is a run too."""
    runs: list[list[W.Mention]] = []
    cur: list[W.Mention] = []
    for m in mentions:
        ok = not m.negated and m.count is None and not m.plural and m.text.split()[0].lower() in ("a", "an")
        if cur and ok and re.fullmatch(r",\s*(and\s+)?|\s+and\s+", text[cur[-1].end:m.start]):
            cur.append(m)
            continue
        if cur:
            runs.append(cur)
        cur = [m] if ok else []
    if cur:
        runs.append(cur)
    out = []
    for run in runs:
        if len(run) >= 2:
            out.append(run)
        elif re.search(r":\s*$", text[:run[0].start]) and re.match(r"\s*[.!?;]", text[run[0].end:]):
            out.append(run)
    return out


def _object_edits(text: str, scene: W.Scene, rng: random.Random) -> list[_Edit]:
    present = {o.shape for o in scene.objects}
    absent = [s for s in W.SHAPES if s not in present]
    if not absent:
        return []
    shape = rng.choice(absent)
    color = rng.choice(tuple(W.COLORS))
    size = rng.choice(W.SIZES)
    parsed = W.parse_caption(text)
    edits = []
    for run in _list_runs(text, parsed.mentions):
        phrase = _object_phrase(scene, run[0], shape, color, size)
        if len(run) == 1:  # "... : a red star." -> "... : a red star and a large green cross."
            at = run[0].end
            edits.append(_Edit(at, at, f" and {phrase}", at + 5, at + 5 + len(phrase)))
            continue
        for m in run[:-1]:  # after any item but the last: "A, NEW, B and C", "A, B, NEW and C"
            at = m.end
            edits.append(_Edit(at, at, f", {phrase}", at + 2, at + 2 + len(phrase)))
    if not edits:  # no object list: a sentence of its own at the end
        body = text.rstrip()
        sep = " " if body[-1] in ".!?;" else ". "
        sentence = f"There is also {_object_phrase(scene, None, shape, color, size)}."
        start = len(body) + len(sep)
        edits.append(_Edit(len(body), len(body), sep + sentence, start, start + len(sentence)))
    return edits


def inject(response: str, scene: W.Scene, kind: str, rng: random.Random) -> Injection:
    """A copy of ``response`` with one hallucination of ``kind`` (module docstring).

    Raises ValueError for an unknown kind or when the kind is impossible here: no absent shape
    left (object), no correct colour/size mention outside a relation (attribute), no correct
    relation claim (relation), or an empty response.
    """
    if kind not in INJECTION_KINDS:
        raise ValueError(f"unknown injection kind {kind!r}; expected one of {INJECTION_KINDS}")
    if not response.strip():
        raise ValueError(f"cannot inject a {kind} hallucination into an empty response")
    claims = world_claims(response)
    verdicts = _verdicts(claims, scene)
    if kind == "object":
        edits = _object_edits(response, scene, rng)
        why = f"every shape is already in scene {scene.scene_id!r}, so no absent object can be added"
    elif kind == "attribute":
        edits = _attribute_edits(response, claims, verdicts, scene)
        why = "the response has no correct mention with a colour or size outside a relation claim to change"
    else:
        edits = _relation_edits(response, claims, verdicts)
        why = "the response has no correct relation claim to flip"
    valid = []
    for e in edits:
        new_text = _apply(response, e)
        if _valid(claims, verdicts, new_text, scene, kind, (e.new_start, e.new_end)):
            valid.append((e, new_text))
    if not valid:
        if edits:
            why = f"no {kind} edit of the response changes exactly one claim"
        raise ValueError(f"cannot inject a {kind} hallucination: {why} (response: {response[:80]!r})")
    slots = list(dict.fromkeys(e.slot for e, _t in valid))
    slot = rng.choice(slots)
    e, new_text = rng.choice([(e, t) for e, t in valid if e.slot == slot])
    return Injection(new_text, kind, e.new_start, e.new_end, response[e.start:e.end], new_text[e.new_start:e.new_end])


def try_inject(response: str, scene: W.Scene, kind: str, rng: random.Random, failed) -> Injection | None:
    """:func:`inject`, or None when the kind is impossible here, counting why in ``failed`` (a
    Counter keyed ``"<kind>: <reason>"``, the stages' ``inject_failed`` report)."""
    try:
        return inject(response, scene, kind, rng)
    except ValueError as e:
        failed[f"{kind}: {str(e).split(' (response:')[0].split('hallucination: ', 1)[-1]}"] += 1
        return None
