"""Import DRESS's released natural-language-feedback data as conditioned SFT records.

    python -m data_pipelines.import_dress --input DRESS/LVLM_NLF --images coco/train2017 \\
        --out runs/dress/import [--max-rating 5] [--val-fraction 0.05] [--condition feedback|rating|none] \\
        [--feedback-template "Feedback: {feedback}"] [--good-feedback TEXT] [--thresholds 0.75] \\
        [--names bad good] [--template "Answer quality: {name}."] [--on-error raise|skip]

DRESS (Chen et al. CVPR 2024, "DRESS: Instructing Large Vision-Language Models to Align and
Interact with Humans via Natural Language Feedback") released its NLF data as
https://huggingface.co/datasets/YangyiYY/LVLM_NLF. This importer writes it in the same record
formats as :mod:`data_pipelines.nlf`, so the DRESS trainer (``configs/dress``) reads either.

Input: the published layout
---------------------------
``LVLM_NLF/{helpfulness_nlf,hallucination_nlf,harmlessness_nlf}.jsonl`` (the dataset repository
also holds ``VLSafe/``, which is not NLF data and is not read). ``--input`` takes such files or
folders: a folder contributes its ``*_nlf.jsonl`` files, or those of its ``LVLM_NLF/`` subfolder
(so the dataset root and the ``LVLM_NLF`` folder both work). One JSON object per line:

===============  ===========================================================================
``image_id``     the COCO train2017 file name, e.g. ``"000000051977.jpg"``, relative to
                 ``--images`` (an integer id is taken as ``f"{id:012d}.jpg"``)
``caption``      the COCO caption(s): a string or a list of strings (kept in ``meta``)
``interaction``  the turns, in order, each ``{"user", "model", "rating", "critique NLF"}``:
                 turn 0's ``user`` is the question about the image, a later turn's ``user`` is
                 the refinement feedback on the previous answer and its ``model`` the revised
                 answer; ``rating`` rates that turn's ``model`` answer (a number or a numeric
                 string such as ``"4"``); ``critique NLF`` critiques it
===============  ===========================================================================

Where this was confirmed, and what was not: the file names, the ``VLSafe/`` folder and the dataset
size come from the dataset's file listing on Hugging Face; the field names and shapes (the
critique key with a space, the rating as a string, a harmlessness example of two turns) from a
third-party loader's docstring in the public code index (a safety-evaluation package's
``jsonl_reader``), which agrees with DRESS's paper (critique NLF with a rating per answer,
refinement NLF as the next user turn). Some third-party code spells the critique key
``critique_NLF``: both spellings are accepted (``report.json`` counts which one each turn used),
and a turn without a critique is accepted and counted. NOT confirmed: the rating scale (the
paper's prompts and the card do not state it in anything we could read): ``--max-rating`` (and
``--min-rating``, default 0) map a rating to ``(rating - min) / (max - min)`` in [0, 1]; without
``--max-rating`` the largest rating in the input is used, printed with a warning (and per file in
``report.json``). Whether ``caption`` is a string or a list varies between descriptions: both are
accepted. A ``<image>`` token in a user text is dropped (the image is its own part).

Condition (``--condition``, as in :mod:`data_pipelines.nlf`): ``feedback`` (default) puts the
turn's own critique NLF before the question (turn 0) or before the refinement feedback (turn k),
``--feedback-template`` with ``{feedback}``; a turn without a critique then has nothing to be
conditioned on and makes no record (counted in ``report.json``: ``skipped_without_critique``; the
conversation it belongs to still goes on, so later turns keep it as history). The good-feedback
text inference asks with is derived from the train split's critique examples
(:func:`mmalign.conditions.derive_good_feedback`: the sentences more than half of the top-rated
critiques share, else the most frequent top-rated critique) unless ``--good-feedback`` gives it;
with free-form human critiques this is rarely a useful text, so look at ``report.md`` and give
one. ``rating`` puts the level of the turn's rating instead (``--thresholds`` / ``--names`` /
``--template``). ``none`` puts nothing (the unconditioned ablation: every message as published,
``condition: null``; like ``rating`` it keeps the turns without a critique).

Output (atomic, with ``manifest.json``; image paths stay relative to ``--images``, which the
manifest records; read with ``read_records(path, "sft", data_root=<--images>)``):

* ``train/sft.jsonl``, ``val/sft.jsonl``: turn 0 of every line -> a **critique example**
  ``[user: image + "<condition of turn 0> <question>", assistant: answer 0]`` (meta ``kind:
  "critique"``, ``score``, ``rating``, ``level``, ``condition``, ``critique``); every later turn
  k -> a **refinement episode** of the conversation up to k, the condition of turn k (its
  critique, or the level of its rating) in the last user turn (before the refinement feedback), answer k the assistant turn that carries
  the loss (meta ``kind: "refinement"``, ``round`` = k, ``score_before`` / ``score_after`` =
  turns k-1 / k, ``rating_before`` / ``rating_after``, ``success`` = score after > before,
  ``fixed`` = null (the release has no hallucination counts), ``level``, ``condition``,
  ``refinement`` = user text k, ``critique`` = critique of answer k). Both carry ``source_id``
  (``<file>:<line>``), ``scene_id`` (the image id), ``dimension`` (``hallucination`` ...),
  ``caption``, ``turn``. Ids: ``dress-<dimension>-<line>-critique`` / ``...-refine<k>``.
  Split by image: ``val`` when sha256 of the image id, as a fraction of 2^64, is below
  ``--val-fraction``, so every record of an image (over all files) is in one split.
* ``condition.json``: the condition scheme used (with the good-feedback text in feedback mode;
  ``{"mode": "none"}`` with ``--condition none``);
  ``report.json`` / ``report.md``: records per
  kind, split and condition level, rating distributions per file, the rating scale, how often a
  revision is rated higher than the answer it revises (95% bootstrap interval), rejects by kind.
* ``rejects.jsonl``: every line not imported, with ``where``, ``kind`` and ``error``.

Errors: malformed JSON, a missing field, a non-numeric or out-of-scale rating, an empty user or
model text, a missing, unreadable or escaping (``../``) image: a
:class:`mmalign.records.RecordError` naming ``file:line``; with ``--on-error raise`` (default)
the first one stops the import and nothing is written, with ``--on-error skip`` the line goes to
``rejects.jsonl`` and is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.conditions import ConditionScheme, FeedbackCondition, NoCondition
from mmalign.nlf_records import (
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
from mmalign.ranking import distribution, split_of
from mmalign.records import (
    MAX_RESPONSE_CHARS,
    RecordError,
    image_exists,
    load_image,
    resolve_image_path,
)
from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
)

STAGE = "import_dress"
#: the published files (their stems minus "_nlf" name the ``dimension``)
FILES = ("helpfulness_nlf.jsonl", "hallucination_nlf.jsonl", "harmlessness_nlf.jsonl")
#: the critique key as published, then the spelling some third-party code uses
CRITIQUE_KEYS = ("critique NLF", "critique_NLF")
IMAGE_TOKEN = re.compile(r"<image>\s*")


class DressError(RecordError):
    """A line that cannot be imported; ``kind`` groups rejects in the report."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Turn:
    user: str
    model: str
    rating: float
    critique: str | None
    critique_key: str | None


@dataclass
class Interaction:
    """One published line, checked."""

    where: str  # file:line
    source_id: str  # <file name>:<line>
    dimension: str
    line: int
    image_id: str
    caption: list[str]
    turns: list[Turn] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# reading


def input_files(paths: list[Path]) -> list[Path]:
    """The ``.jsonl`` files of ``--input``: files as given; a folder's ``*_nlf.jsonl`` (or its
    ``LVLM_NLF/`` subfolder's). Distinct file names are required (they make the record ids)."""
    out: list[Path] = []
    for p in paths:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            d = p / "LVLM_NLF" if (p / "LVLM_NLF").is_dir() else p
            found = sorted(d.glob("*_nlf.jsonl"))
            if not found:
                raise FileNotFoundError(f"{p}: no *_nlf.jsonl files there or in its LVLM_NLF/ folder "
                                        f"(the release has {', '.join(FILES)})")
            out += found
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    names = Counter(p.name for p in out)
    twice = [n for n, c in names.items() if c > 1]
    if twice:
        raise ValueError(f"--input: file name(s) {twice} given more than once (ids are made from file names)")
    return out


def dimension_of(path: Path) -> str:
    stem = path.stem
    return stem.removesuffix("_nlf")


def _text(turn: dict, key: str, where: str) -> str:
    if key not in turn or turn[key] is None:
        raise DressError(f"{where}: missing field '{key}'", "missing_field")
    v = turn[key]
    if not isinstance(v, str):
        raise DressError(f"{where}: '{key}' must be a string, got {type(v).__name__}", "malformed")
    v = IMAGE_TOKEN.sub("", v).strip()
    if not v:
        raise DressError(f"{where}: '{key}' is empty", "empty_text")
    if len(v) > MAX_RESPONSE_CHARS:
        raise DressError(f"{where}: '{key}' has {len(v)} characters, over the limit of {MAX_RESPONSE_CHARS}",
                         "too_long")
    return v


def _rating(value: Any, where: str) -> float:
    """A finite number or a numeric string."""
    if value is None:
        raise DressError(f"{where}: missing field 'rating'", "missing_field")
    x: Any = value
    if isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise DressError(f"{where}: rating {value!r} is not a number", "bad_rating") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise DressError(f"{where}: rating must be a number, got {type(value).__name__} {value!r}", "bad_rating")
    if not math.isfinite(x):
        raise DressError(f"{where}: rating is {value!r}; NaN/inf ratings are not allowed", "bad_rating")
    return float(x)


def _critique(turn: dict, where: str) -> tuple[str | None, str | None]:
    for key in CRITIQUE_KEYS:
        v = turn.get(key)
        if v is None:
            continue
        if not isinstance(v, str):
            raise DressError(f"{where}: '{key}' must be a string, got {type(v).__name__}", "malformed")
        return (v.strip() or None), key
    return None, None


def parse_line(obj: Any, where: str, source_id: str, dimension: str, line: int, images: Path,
               check_images: str) -> Interaction:
    """Check one published line (module docstring); errors name ``where`` (``file:line``)."""
    if not isinstance(obj, dict):
        raise DressError(f"{where}: a line must be a JSON object, got {type(obj).__name__}", "malformed")
    image_id = obj.get("image_id")
    if image_id is None:
        raise DressError(f"{where}: missing field 'image_id'", "missing_field")
    if isinstance(image_id, int) and not isinstance(image_id, bool) and image_id >= 0:
        image_id = f"{image_id:012d}.jpg"  # a bare COCO id
    if not isinstance(image_id, str) or not image_id.strip():
        raise DressError(f"{where}: 'image_id' must be an image file name, got {image_id!r}", "malformed")
    image_id = image_id.strip()
    full = resolve_image_path(image_id, images, where)  # RecordError when it escapes --images
    if not image_exists(full):
        raise DressError(f"{where}: image {image_id!r} not found under {images.resolve()}", "image")
    if check_images == "decode":
        load_image(full, where)
    caption = obj.get("caption")
    if caption is None:
        caption = []
    elif isinstance(caption, str):
        caption = [caption]
    elif not (isinstance(caption, list) and all(isinstance(c, str) for c in caption)):
        raise DressError(f"{where}: 'caption' must be a string or a list of strings, got {type(caption).__name__}",
                         "malformed")
    inter = obj.get("interaction")
    if inter is None:
        raise DressError(f"{where}: missing field 'interaction'", "missing_field")
    if not isinstance(inter, list) or not inter:
        raise DressError(f"{where}: 'interaction' must be a non-empty list of turns", "malformed")
    it = Interaction(where=where, source_id=source_id, dimension=dimension, line=line,
                     image_id=full.relative_to(images.resolve()).as_posix(), caption=[c.strip() for c in caption])
    for k, turn in enumerate(inter):
        w = f"{where}: interaction[{k}]"
        if not isinstance(turn, dict):
            raise DressError(f"{w}: a turn must be an object, got {type(turn).__name__}", "malformed")
        user, model = _text(turn, "user", w), _text(turn, "model", w)
        critique, key = _critique(turn, w)
        it.turns.append(Turn(user, model, _rating(turn.get("rating"), w), critique, key))
    return it


def read_input(path: Path, images: Path, check_images: str, on_error: str, rejects: list[dict]) -> tuple[
        list[Interaction], int]:
    """The checked interactions of one file and its count of non-blank lines."""
    out, n = [], 0
    dimension = dimension_of(path)
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:  # decoded per line, so a non-UTF-8 line is a reject at its line, not a crash
                raw = raw_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raw = None
                err = f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})"
            if raw is not None and not raw.strip():
                continue
            n += 1
            obj = None
            try:
                if raw is None:
                    raise DressError(err, "malformed")
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DressError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "malformed") from None
                out.append(parse_line(obj, where, f"{path.name}:{lineno}", dimension, lineno, images, check_images))
            except RecordError as e:
                if on_error == "raise":
                    raise
                rejects.append({"where": where, "kind": getattr(e, "kind", "image"), "error": str(e),
                                "record": obj if obj is not None else (raw or repr(raw_bytes[:200])).rstrip("\n")})
    return out, n


# --------------------------------------------------------------------------------------------
# records


def records_of(it: Interaction, lo: float, hi: float, scheme: ConditionScheme,
               feedback: FeedbackCondition | NoCondition | None = None) -> list[dict]:
    """Turn 0 -> a critique example; turn k > 0 -> a refinement episode up to k (module docstring).
    With a feedback condition, each is conditioned on its turn's critique, and a turn without one
    makes no record; with :class:`NoCondition` none is conditioned."""
    scores = []
    for k, t in enumerate(it.turns):
        if not lo <= t.rating <= hi:
            raise DressError(f"{it.where}: interaction[{k}]: rating {t.rating:g} is outside the scale "
                             f"[{lo:g}, {hi:g}] (--min-rating / --max-rating)", "bad_rating")
        scores.append(round((t.rating - lo) / (hi - lo), 10))
    base = f"dress-{it.dimension}-{it.line}"
    common = {"source_id": it.source_id, "scene_id": it.image_id, "dimension": it.dimension, "caption": it.caption}
    images = [it.image_id]
    t0 = it.turns[0]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t0.user}]}]
    def usable(t: Turn) -> bool:
        return not isinstance(feedback, FeedbackCondition) or bool((t.critique or "").strip())

    out = []
    if usable(t0):
        out.append(critique_record(f"{base}-critique", images, prompt, t0.model, scores[0], scheme,
                                   {"rating": t0.rating, "critique": t0.critique, "turn": 0, **common}, feedback))
    conv = prompt + [text_turn("assistant", t0.model)]
    for k in range(1, len(it.turns)):
        t = it.turns[k]
        conv = conv + [text_turn("user", t.user)]
        if usable(t):
            out.append(refinement_record(
                f"{base}-refine{k}", images, conv, t.model, scores[k - 1], scores[k], k, scheme,
                {"rating_before": it.turns[k - 1].rating, "rating_after": t.rating, "fixed": None,
                 "refinement": t.user, "critique": t.critique, "turn": k, **common}, feedback))
        conv = conv + [text_turn("assistant", t.model)]
    return out


# --------------------------------------------------------------------------------------------
# report


def report_md(rep: dict, scheme: ConditionScheme) -> str:
    sc = rep["rating_scale"]
    lines = ["# DRESS NLF import", "",
             (f"{rep['lines']['imported']} of {rep['lines']['total']} lines imported from "
              f"{', '.join(rep['files'])}; rating scale [{sc['min']:g}, {sc['max']:g}] "
              f"(max {'from --max-rating' if sc['max_from'] == 'flag' else 'taken from the data: NOT documented'}), "
              "score = (rating - min) / (max - min)."), "",
             "| file | lines | imported | turns | max rating | rating histogram |", "|---|---|---|---|---|---|"]
    for name, f in rep["files"].items():
        hist = ", ".join(f"{k}: {v}" for k, v in f["ratings"].get("histogram", {}).items())
        mx = f["ratings"].get("max")
        lines.append(f"| {name} | {f['lines']} | {f['imported']} | {f['turns']} | "
                     f"{'' if mx is None else f'{mx:g}'} | {hist} |")
    cond = rep["condition"]
    if cond.get("mode") == "feedback":
        g = rep["good_feedback"]
        how = (f"derived: {g['rule']} of the {g['top_examples']} top-rated (score {g['top_score']:g}) critiques"
               if g.get("rule") else "given with --good-feedback")
        lines += ["", (f"Condition: the turn's critique ({cond['template']!r}); {rep['skipped_without_critique']} "
                       f"turn(s) without a critique made no record. Inference asks with the good feedback "
                       f"{cond['good_feedback']!r} ({how}). Rating levels below are for the report only.")]
    elif cond.get("mode") == "none":
        lines += ["", NO_CONDITION_LINE]
    lines += ["", *summary_md(rep, scheme), ""]
    keys = ", ".join(f"{k!r}: {v}" for k, v in rep["critique_keys"].items()) or "none"
    lines += [f"Critique key spellings: {keys}; turns without a critique: {rep['turns_without_critique']}.",
              (f"Rejected lines: {rep['rejected']['total']} "
               f"({', '.join(f'{k} {v}' for k, v in rep['rejected']['by_kind'].items()) or 'none'}; rejects.jsonl).")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# stage


def run(inputs: list[Path], images: Path, out: Path, scheme: ConditionScheme | None = None,
        max_rating: float | None = None, min_rating: float = 0.0, val_fraction: float = 0.05,
        on_error: str = "raise", check_images: str = "decode", force: bool = False,
        feedback: FeedbackCondition | NoCondition | None = None) -> dict[str, Any] | None:
    """Import ``inputs`` into ``out``; the report, or None when ``out`` was up to date.

    ``feedback`` conditions on the critiques (module docstring), :class:`NoCondition` on
    nothing; None (the default of this function; the command line's default is ``--condition
    feedback``) on the rating levels of ``scheme``.

    Raises :class:`RecordError` at the first bad line (``on_error="raise"``) and whenever no line
    at all could be imported; ``out`` is then left as it was.
    """
    scheme = scheme or ConditionScheme()
    files = input_files(inputs)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: the image folder (COCO train2017) is not a folder")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_rating is not None and not (math.isfinite(max_rating) and max_rating > min_rating):
        raise ValueError(f"--max-rating must be a number above --min-rating ({min_rating:g}), got {max_rating}")
    config = {"inputs": [str(p) for p in files], "images": str(images.resolve()), "scheme": scheme.to_dict(),
              "max_rating": max_rating, "min_rating": min_rating, "val_fraction": val_fraction,
              "on_error": on_error, "check_images": check_images}
    if feedback is not None:  # rating imports keep the config (and so the up-to-date check) they had
        config["condition"] = feedback.to_dict()
    if not force and is_up_to_date(out, config, files):
        print(f"{STAGE}: {out} up to date, skipping (--force to redo)")
        return None

    rejects: list[dict] = []
    per_file: dict[str, dict[str, Any]] = {}
    interactions: list[Interaction] = []
    for path in files:
        got, n = read_input(path, images, check_images, on_error, rejects)
        interactions += got
        per_file[path.name] = {"lines": n, "turns": sum(len(i.turns) for i in got),
                               "ratings": distribution([t.rating for i in got for t in i.turns], histogram_max=25)}
    ratings = [t.rating for i in interactions for t in i.turns]
    max_from = "flag"
    if max_rating is None and ratings:
        max_rating, max_from = max(ratings), "data"
        maxima = {n: f["ratings"]["max"] for n, f in per_file.items() if f["ratings"]["n"]}
        print(f"{STAGE}: warning: the rating scale is not documented and --max-rating was not given; using the "
              f"largest rating in the input, {max_rating:g} (per file: {maxima}), with --min-rating {min_rating:g}. "
              "Pass --max-rating to fix the scale.", file=sys.stderr)
        if max_rating <= min_rating:
            raise ValueError(f"the largest rating in the input, {max_rating:g}, is not above --min-rating "
                             f"{min_rating:g}; pass --max-rating")

    splits: dict[str, list[dict]] = {"train": [], "val": []}
    imported = Counter()
    skipped = 0  # turns without a critique under a feedback condition: no record
    for it in interactions:
        try:
            rows = records_of(it, min_rating, max_rating, scheme, feedback)
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"where": it.where, "kind": getattr(e, "kind", "malformed"), "error": str(e),
                            "record": None})
            continue
        splits[split_of(it.image_id, val_fraction)] += rows
        skipped += len(it.turns) - len(rows)
        imported[it.source_id.rsplit(":", 1)[0]] += 1
    n_ok = sum(imported.values())
    if not n_ok:
        first = "; ".join(r["error"] for r in rejects[:3])
        raise DressError(f"no line could be imported ({len(rejects)} rejected" + (f"; first: {first}" if first else "")
                         + ")", "empty")
    for name, f in per_file.items():
        f["imported"] = imported[name]
    keys = Counter(t.critique_key or "(none)" for i in interactions for t in i.turns)
    kinds = Counter(r["kind"] for r in rejects)
    condition: dict[str, Any] = {"mode": "rating", **scheme.to_dict()}
    extra: dict[str, Any] = {}
    if isinstance(feedback, FeedbackCondition):
        feedback, how = resolve_good_feedback(feedback, splits)
        condition = feedback.to_dict()
        extra = {"good_feedback": how, "skipped_without_critique": skipped}
    elif feedback is not None:  # none
        condition = feedback.to_dict()
    rep = {"inputs": config["inputs"], "images": config["images"], "scheme": scheme.to_dict(),
           "condition": condition, **extra,
           "val_fraction": val_fraction, "files": per_file,
           "rating_scale": {"min": min_rating, "max": max_rating, "max_from": max_from},
           "lines": {"total": sum(f["lines"] for f in per_file.values()), "imported": n_ok},
           **summarize(splits, scheme),
           "critique_keys": {k: v for k, v in keys.items() if k != "(none)"},
           "turns_without_critique": keys["(none)"],
           "rejected": {"total": len(rejects), "by_kind": dict(sorted(kinds.items()))}}
    with StageOutput(out, stage=STAGE, config=config, inputs=files) as st:
        for s, rows in splits.items():
            atomic_write_jsonl(st.path / s / "sft.jsonl", rows)
            for k in ("critique", "refinement"):
                st.count(f"{s}/{k}", sum(r["kind"] == k for r in rows))
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        file = condition if feedback is not None else scheme.to_dict()
        atomic_write_text(st.path / "condition.json", json.dumps(file, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(st.path / "report.md", report_md(rep, scheme))
        st.count("lines", rep["lines"]["total"])
        st.count("rejected", len(rejects))
        st.info.update(image_root=config["images"], rating_scale=rep["rating_scale"], scheme=scheme.to_dict(),
                       condition=condition)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.import_dress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, nargs="+", type=Path,
                    help="published *_nlf.jsonl file(s), or folder(s) holding them (the dataset root or its LVLM_NLF/)")
    ap.add_argument("--images", required=True, type=Path,
                    help="the folder the image_id file names are in (COCO train2017)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    ap.add_argument("--max-rating", type=float,
                    help="the top of the rating scale (not documented by the release; default: the largest rating "
                         "in the input, with a warning)")
    ap.add_argument("--min-rating", type=float, default=0.0,
                    help="the bottom of the rating scale: score = (rating - min) / (max - min) (default 0)")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of images (by a hash of the image id) whose records go to val (default 0.05)")
    add_feedback_arguments(ap)
    add_scheme_arguments(ap)
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="raise: stop at the first bad line, write nothing; skip: put it in rejects.jsonl with its "
                         "reason and go on (default raise)")
    ap.add_argument("--check-images", choices=("decode", "exists"), default="decode",
                    help="decode every image (finds corrupt files; default) or only check it exists (faster)")
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    args = ap.parse_args(argv)
    try:
        scheme = scheme_from(args.thresholds, args.names, args.template)
        feedback = condition_from(args)
    except ValueError as e:
        ap.error(str(e))
    try:
        rep = run(args.input, args.images, args.out, scheme=scheme, max_rating=args.max_rating,
                  min_rating=args.min_rating, val_fraction=args.val_fraction, on_error=args.on_error,
                  check_images=args.check_images, force=args.force, feedback=feedback)
    except (RecordError, FileNotFoundError, ValueError) as e:
        print(f"{STAGE}: error: {e}", file=sys.stderr)
        return 1
    if rep is not None:
        print(report_md(rep, scheme))
        print(f"-> {args.out / 'train' / 'sft.jsonl'}, {args.out / 'val' / 'sft.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
