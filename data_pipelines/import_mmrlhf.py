"""Import the published MM-RLHF preference data into the project's ranked and pair formats.

    python -m data_pipelines.import_mmrlhf --input MM-RLHF/data.jsonl --images MM-RLHF \\
        --out runs/mmrlhf/import [--val-fraction 0.05] \\
        [--weights faithfulness=1,helpfulness=1,ethical=1] [--on-error raise|skip]

MM-RLHF (Zhang et al. 2025, "MM-RLHF: The Next Step Forward in Multimodal LLM Alignment";
data: https://huggingface.co/datasets/yifanzhang114/MM-RLHF; code:
https://github.com/Kwai-YuanQi/MM-RLHF) gives, per (image, question), 3-5 model responses with
human scores on three dimensions, a human ranking, and the annotators' reasons.

Input: the published layout
---------------------------
``data.jsonl`` ("contains all labeled information"; ``dpo_pairs.jsonl`` beside it holds the
pairs the authors derived from it) sits in the unzipped dataset root next to the image folders
``long/ mcq/ safety/ short/`` (and ``video/``). One JSON object per line (a ``.json`` file
holding a list of such objects is read too):

=================  =========================================================================
``id``             prompt id (string; ``mmrlhf-<record index>`` when absent)
``question``       the user's question (a leading LLaVA ``<image>`` token is dropped: the image
                   becomes its own ``{"type": "image"}`` part)
``image``          image path relative to the dataset root, e.g. ``short/....jpg`` (a list of
                   paths is accepted too); null for video records
``video``          frame folder of a video record; null for image records
``models_output``  list of the responses (strings)
``faithfulness``   list, one score per response (null = not scored)
``helpfulness``    list, one score per response
``ethical``        list, one score per response
``final_ranking``  list, the annotators' rank of each response (1 = best)
``score_reasons``  list, the annotation text of each response (its critique)
``ranking_reason`` the annotators' reason for the ranking (one string)
``answer``         a reference answer where the task has one (kept as ``reference``)
=================  =========================================================================

Where each part was confirmed (and what was not):

* File names, folder layout and "data.jsonl contains all labeled information": the MM-RLHF
  README ("Data Preparation"), read in github.com/julyanghar/MM-RLHF (a fork of
  Kwai-YuanQi/MM-RLHF), ``README.md`` at commit 2e5d6822. The dataset's HF file listing
  (https://huggingface.co/datasets/yifanzhang114/MM-RLHF/tree/main) shows ``data.jsonl``,
  ``dpo_pairs.jsonl``, ``long.zip``, ``mcq.zip``, ``safety.zip``, ``short.zip``, ``video.zip`` and a
  parquet copy ``data/train-00000-of-00001.parquet``.
* Image paths relative to the dataset root, and images opened as
  ``Image.open(os.path.join(image_folder, image)).convert("RGB")``, a path or a list of paths:
  the authors' ``llava/train/train_dpo.py`` (``DPODataset.process_image`` / ``_get_item``) and
  ``scripts/convert_to_swift.py`` (which joins ``image`` onto the ``MM-RLHF/`` root), same fork.
  The same ``train_dpo.py`` strips ``<image>`` from the prompt and re-adds it, which is why the
  importer drops that token from the question text.
* The field names above: the dataset's published schema as read by third-party code in the
  public code index (the index did not name those repositories, so they cannot be cited by
  path): a data-preparation package's raw-source inspection report (fields ``id, question,
  answer, image, video, models_output, faithfulness, helpfulness, ethical, final_ranking,
  score_reasons, ranking_reason``; 16,342 rows; image paths prefixed ``short/ long/ mcq/
  safety/``; 3, 4 or 5 outputs per prompt) with its adapter, which reads
  ``row["models_output"][i]`` and the three score fields as per-output lists (``row[field][i]``,
  possibly null); and an unrelated alignment library's adapter, which reads ``final_ranking``
  as per-output ranks (>= 1, lower is better) and passes ``score_reasons`` / ``ranking_reason``
  through. The two agree on every field they share.
* NOT confirmed from a primary source: the inner shape of ``score_reasons`` (taken to be one
  entry per response; a string, null, a list of strings or a ``{dimension: text}`` object are
  all accepted and flattened to one critique string) and of ``ranking_reason`` (a string), the
  meaning of ``answer``, the score scale (no range is enforced; ``report.json`` shows the values
  seen), and whether absent values are JSON ``null`` or missing keys (both are accepted). The
  dataset card's own field table could not be retrieved. Numeric strings (``"3"``) are accepted
  as scores in case an export stringified them; anything else that is not a finite number is an
  error. The parquet copy is not read here (that ``data.jsonl`` holds the same rows is
  assumed, not checked).

How MM-RLHF ranks: the annotators score each response on the three dimensions and give a
``final_ranking`` with a ``ranking_reason``; the README says the released ``dpo_pairs.jsonl``
holds "pairs of different ranks" derived from those rankings. The authors' ``DPODataset`` also
passes an ``is_tie`` flag through when a pair carries one, which suggests tied pairs may be kept
and flagged there (not checked against ``dpo_pairs.jsonl``). No formula from the dimension
scores to the rank was found. This importer orders responses by ``overall``, the
weighted mean of the dimension scores a response has (``--weights``, default equal; a null score
drops out of that response's mean), breaking ties by the human ``final_ranking`` and then by
input order. Pairs come only from a strict ``overall`` difference
(:func:`mmalign.losses.dpo.all_pairs`), so ties make no pair; ``report.json`` says how often the
score order agrees with the human ranking, and each response keeps its ``human_rank``.

Video records (``video`` set, no ``image``) are outside an image pipeline: they are never an
error, but each is written to ``rejects.jsonl`` with kind ``unsupported_video`` and counted.

Output (atomic, with ``manifest.json``; image paths stay relative to ``--images``, which the
manifest records, because the images are tens of GB and are not copied):

* ``ranked.jsonl``: one record per (image, question): ``id``, ``images``, ``prompt`` (one user
  message: image part(s), then the question), ``responses`` sorted by ``overall`` descending,
  each ``{"text", "source": "mmrlhf", "scores": {dimension: float}, "overall", "critique",
  "human_rank", "input_index"}``, ``split`` (``train``/``val``), ``ranking_reason``,
  ``reference``.
* ``train/pairs.jsonl`` / ``val/pairs.jsonl``: every strict-preference pair of a prompt as a
  :class:`mmalign.records.PreferenceRecord` with id ``<prompt id>-<i>-<j>`` (``i``, ``j`` =
  ``chosen_rank``, ``rejected_rank``: 0-based positions in the prompt's ranked ``responses``),
  ``score_chosen`` / ``score_rejected`` = ``overall`` and meta ``prompt_id, chosen_rank,
  rejected_rank, scores_chosen, scores_rejected, critique_chosen, critique_rejected,
  source_chosen, source_rejected, human_rank_chosen, human_rank_rejected``. Read them with
  ``read_records(path, "preference", data_root=<--images>)``.
* The split is by prompt: ``val`` when sha256(``<seed>:<prompt id>``) as a fraction of 2^64 is
  below ``--val-fraction``, so a prompt's pairs never straddle the split and the assignment does
  not depend on file order.
* ``report.json`` / ``report.md``: prompts, responses and pairs per split, tied pairs, score
  distributions per dimension and of ``overall``, agreement with the human ranking, rejected
  records by kind. ``rejects.jsonl``: every record not imported, with where, kind and reason.

Errors: every bad record is a :class:`mmalign.records.RecordError` naming the file and the line
(``data.jsonl:17``) or record index (``data.json: record 3``) and the id: malformed JSON, missing
field, list lengths that differ from ``models_output``, a non-numeric/NaN/inf score, an empty
response, a duplicate id, an image path escaping ``--images``, a missing or corrupt image. With
``--on-error raise`` (default) the first one stops the stage and nothing is written; with
``--on-error skip`` each goes to ``rejects.jsonl`` with its reason and is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign import ranking
from mmalign.records import (
    MAX_RESPONSE_CHARS,
    PreferenceRecord,
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

STAGE = "import_mmrlhf"
SOURCE = "mmrlhf"
#: The published score fields, in the order reports list them.
DIMENSIONS = ("faithfulness", "helpfulness", "ethical")
#: Other names accepted in --weights (the paper calls the third dimension "ethics").
ALIASES = {"ethics": "ethical", "faithful": "faithfulness", "helpful": "helpfulness"}
IMAGE_TOKEN = re.compile(r"<image>\s*")
#: A histogram of distinct values is useful for the small integer scales annotators use; past
#: this many distinct values the report gives quantiles only.
MAX_HISTOGRAM_VALUES = 25


class MMRLHFError(RecordError):
    """A record that cannot be imported; ``kind`` groups rejects in the report."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class UnsupportedRecord(Exception):
    """A well-formed record this importer does not take (video); never a hard error."""


# --------------------------------------------------------------------------------------------
# reading


def iter_input(path: Path) -> Iterator[tuple[int, str, Any, str | None, str | None]]:
    """Yield ``(record index, where, parsed or None, parse error or None, raw line or None)``.

    ``.jsonl`` (the published ``data.jsonl``) is read line by line so a malformed line names its
    line number; any other suffix is read as one JSON list (as the authors' ``load_data`` does).
    """
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            index = 0
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:  # decoded per line, so a non-UTF-8 line is a reject at its line, not a crash
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield index, where, None, f"not valid UTF-8 ({e.reason} at byte {e.start})", repr(raw[:200])
                    index += 1
                    continue
                if not line.strip():
                    continue
                try:
                    yield index, where, json.loads(line), None, None
                except json.JSONDecodeError as e:
                    yield index, where, None, f"malformed JSON ({e.msg} at column {e.colno})", line.rstrip("\n")
                index += 1
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        # One unreadable file is not a record to skip: nothing in it can be trusted.
        raise MMRLHFError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          "a .json input must be one list of records (use .jsonl for one per line)",
                          "malformed") from None
    if not isinstance(data, list):
        raise MMRLHFError(f"{path}: a .json input must hold a list of records, got {type(data).__name__}",
                          "malformed")
    for index, obj in enumerate(data):
        yield index, f"{path}: record {index}", obj, None, None


def parse_weights(text: str) -> dict[str, float]:
    """``"faithfulness=2,helpfulness=1,ethics=1"`` -> weights for all of :data:`DIMENSIONS`
    (a dimension not named gets weight 0). Raises ValueError on unknown names or bad values."""
    return ranking.parse_weights(text, DIMENSIONS, ALIASES)


def _score(value: Any, name: str, where: str) -> float | None:
    """One dimension score: a finite number (or a numeric string), or None when not scored."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MMRLHFError(f"{where}: {name} is {value!r}; a score must be a number", "bad_score")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise MMRLHFError(f"{where}: {name} is {value!r}; a score must be a number", "bad_score") from None
    if not isinstance(value, (int, float)):
        raise MMRLHFError(f"{where}: {name} is a {type(value).__name__}; a score must be a number", "bad_score")
    if not math.isfinite(value):
        raise MMRLHFError(f"{where}: {name} is {value}; NaN/inf scores are not allowed", "bad_score")
    return float(value)


def _per_response(obj: dict, key: str, n: int, where: str) -> list | None:
    """A field holding one entry per response; None when the field is absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise MMRLHFError(f"{where}: '{key}' must be a list with one entry per response, got "
                          f"{type(value).__name__}", "malformed")
    if len(value) != n:
        raise MMRLHFError(f"{where}: '{key}' has {len(value)} entries but 'models_output' has {n} responses",
                          "length_mismatch")
    return value


def _critique(value: Any, name: str, where: str) -> str:
    """Flatten one response's annotation text (shape not confirmed; see the module docstring)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(v.strip() for v in value if v.strip())
    if isinstance(value, dict) and all(isinstance(v, (str, type(None))) for v in value.values()):
        return "\n".join(f"{k}: {v.strip()}" for k, v in value.items() if v and v.strip())
    raise MMRLHFError(f"{where}: {name} must be text (a string, a list of strings or a "
                      f"{{dimension: text}} object), got {type(value).__name__}", "malformed")


def _human_rank(value: Any, name: str, where: str) -> float | None:
    rank = _score(value, name, where)
    if rank is not None and rank < 1:
        raise MMRLHFError(f"{where}: {name} is {value}; ranks start at 1 (best)", "bad_score")
    return rank


@dataclass
class Prompt:
    """One imported (image, question) with its responses sorted best first."""

    id: str
    images: list[str]
    question: str
    responses: list[dict]
    ranking_reason: str
    reference: str | None
    where: str

    def messages(self) -> list[dict]:
        content = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.question}]
        return [{"role": "user", "content": content}]


def parse_record(obj: Any, index: int, where: str, images_root: Path, weights: dict[str, float],
                 check_images: str) -> Prompt:
    """Validate one published record and build its :class:`Prompt`; errors name ``where``."""
    if not isinstance(obj, dict):
        raise MMRLHFError(f"{where}: a record must be a JSON object, got {type(obj).__name__}", "malformed")
    pid = obj.get("id")
    if pid is None:
        pid = f"mmrlhf-{index}"
    elif not isinstance(pid, (str, int)) or isinstance(pid, bool) or not str(pid).strip():
        raise MMRLHFError(f"{where}: 'id' must be a non-empty string or integer, got {pid!r}", "malformed")
    pid = str(pid)
    where = f"{where} id={pid}"

    image, video = obj.get("image"), obj.get("video")
    if not image:
        if video:
            raise UnsupportedRecord(f"{where}: video record (video={video!r}); this importer takes image records")
        raise MMRLHFError(f"{where}: missing field 'image'", "missing_field")
    rels = image if isinstance(image, list) else [image]
    if not rels or not all(isinstance(r, str) and r.strip() for r in rels):
        raise MMRLHFError(f"{where}: 'image' must be a path string or a list of path strings, got {image!r}",
                          "malformed")

    question = obj.get("question")
    if question is None:
        raise MMRLHFError(f"{where}: missing field 'question'", "missing_field")
    if not isinstance(question, str):
        raise MMRLHFError(f"{where}: 'question' must be a string, got {type(question).__name__}", "malformed")
    question = IMAGE_TOKEN.sub("", question).strip()
    if not question:
        raise MMRLHFError(f"{where}: 'question' is empty", "empty_text")

    outputs = obj.get("models_output")
    if outputs is None:
        raise MMRLHFError(f"{where}: missing field 'models_output'", "missing_field")
    if not isinstance(outputs, list) or not outputs:
        raise MMRLHFError(f"{where}: 'models_output' must be a non-empty list of responses", "malformed")
    n = len(outputs)
    for k, text in enumerate(outputs):
        if not isinstance(text, str):
            raise MMRLHFError(f"{where}: models_output[{k}] must be a string, got {type(text).__name__}",
                              "malformed")
        if not text.strip():
            raise MMRLHFError(f"{where}: models_output[{k}] is an empty response", "empty_text")
        if len(text) > MAX_RESPONSE_CHARS:
            raise MMRLHFError(f"{where}: models_output[{k}] has {len(text)} characters, over the limit of "
                              f"{MAX_RESPONSE_CHARS}", "too_long")

    columns = {d: _per_response(obj, d, n, where) for d in DIMENSIONS}
    if all(c is None for c in columns.values()):
        raise MMRLHFError(f"{where}: missing score fields: none of {', '.join(DIMENSIONS)} is present",
                          "missing_field")
    ranks = _per_response(obj, "final_ranking", n, where)
    reasons = _per_response(obj, "score_reasons", n, where)
    ranking_reason = obj.get("ranking_reason")
    if ranking_reason is not None and not isinstance(ranking_reason, str):
        raise MMRLHFError(f"{where}: 'ranking_reason' must be a string, got {type(ranking_reason).__name__}",
                          "malformed")
    reference = obj.get("answer")
    if reference is not None:
        reference = str(reference).strip() or None

    responses = []
    for k, text in enumerate(outputs):
        scores = {}
        for d, col in columns.items():
            if col is not None:
                s = _score(col[k], f"{d}[{k}]", where)
                if s is not None:
                    scores[d] = s
        try:
            overall = ranking.overall(scores, weights)
        except ValueError as e:
            raise MMRLHFError(f"{where}: response {k} has {e}", "bad_score") from None
        rank = _human_rank(ranks[k], f"final_ranking[{k}]", where) if ranks is not None else None
        responses.append({
            "text": text, "source": SOURCE, "scores": scores, "overall": overall,
            "critique": _critique(reasons[k], f"score_reasons[{k}]", where) if reasons is not None else "",
            "human_rank": int(rank) if rank is not None and rank.is_integer() else rank,
            "input_index": k,
        })
    # Best first; equal overall scores keep the annotators' order, then the input order.
    responses = ranking.rank(responses, tie_break=lambda r: math.inf if r["human_rank"] is None else r["human_rank"])

    root = images_root.resolve()
    images = []
    for rel in rels:
        full = resolve_image_path(rel, root, where)
        if check_images == "decode":
            load_image(full, where)
        elif not image_exists(full):
            raise MMRLHFError(f"{where}: image {rel!r} not found under {root}", "image")
        images.append(full.relative_to(root).as_posix())
    return Prompt(id=pid, images=images, question=question, responses=responses,
                  ranking_reason=(ranking_reason or "").strip(), reference=reference, where=where)


# --------------------------------------------------------------------------------------------
# pairs and split


def split_of(prompt_id: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` or ``"train"`` from a hash of ``"<seed>:<prompt id>"`` (:func:`mmalign.ranking.split_of`),
    so every pair of a prompt lands in the same split whatever the file order, and re-runs agree."""
    return ranking.split_of(prompt_id, val_fraction, seed)


def prompt_pairs(p: Prompt) -> list[PreferenceRecord]:
    """Every strict-preference pair of one prompt's ranked responses (ties make none)."""
    out = ranking.ranked_pairs(p.id, p.images, p.messages(), p.responses, response_meta=("human_rank",))
    for rec in out:
        # Round-trip through the schema reader so an output line can never fail to load later.
        PreferenceRecord.from_json(rec.to_json(), p.where, max_chars=None)
    return out


# --------------------------------------------------------------------------------------------
# report


def distribution(values: list[float], missing: int = 0) -> dict[str, Any]:
    """Count, missing, min/quartiles/max, mean and (for few distinct values) a histogram."""
    return {"n": len(values), "missing": missing} | ranking.distribution(values, histogram_max=MAX_HISTOGRAM_VALUES)


def build_report(prompts: list[Prompt], splits: dict[str, str], pairs: dict[str, list[PreferenceRecord]],
                 rejects: list[dict], config: dict) -> dict[str, Any]:
    per_split = {s: [p for p in prompts if splits[p.id] == s] for s in ("train", "val")}
    dims: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
    missing = Counter()
    overall, tied_pairs, prompts_with_ties, no_pairs = [], 0, 0, 0
    agree = Counter()
    for p in prompts:
        scores = [r["overall"] for r in p.responses]
        overall += scores
        for r in p.responses:
            for d in DIMENSIONS:
                if d in r["scores"]:
                    dims[d].append(r["scores"][d])
                else:
                    missing[d] += 1
        n = len(scores)
        ties = sum(scores[i] == scores[j] for i in range(n) for j in range(i + 1, n))
        tied_pairs += ties
        prompts_with_ties += ties > 0
        no_pairs += ties == n * (n - 1) // 2
    for recs in pairs.values():
        for rec in recs:
            hc, hr = rec.meta["human_rank_chosen"], rec.meta["human_rank_rejected"]
            if hc is None or hr is None:
                agree["no_human_rank"] += 1
            else:
                agree["agree" if hc < hr else "human_tie" if hc == hr else "disagree"] += 1
    kinds = Counter(r["kind"] for r in rejects)
    return {
        "input": config["input"], "images": config["images"], "weights": config["weights"],
        "val_fraction": config["val_fraction"],
        "prompts": {s: len(ps) for s, ps in per_split.items()} | {"total": len(prompts)},
        "responses": {s: sum(len(p.responses) for p in ps) for s, ps in per_split.items()}
        | {"total": sum(len(p.responses) for p in prompts)},
        "pairs": {s: len(pairs[s]) for s in ("train", "val")} | {"total": sum(len(v) for v in pairs.values())},
        "tied_response_pairs": tied_pairs, "prompts_with_ties": prompts_with_ties,
        "prompts_without_pairs": no_pairs,
        "scores": {d: distribution(dims[d], missing[d]) for d in DIMENSIONS},
        "overall": distribution(overall),
        "human_ranking_agreement": {k: agree[k] for k in ("agree", "disagree", "human_tie", "no_human_rank")},
        "rejected": {"total": sum(k != "unsupported_video" for k in kinds.elements()),
                     "by_kind": {k: kinds[k] for k in sorted(kinds) if k != "unsupported_video"}},
        "skipped_video": kinds["unsupported_video"],
    }


def report_md(rep: dict) -> str:
    w = ", ".join(f"{d}={v:g}" for d, v in rep["weights"].items())
    lines = [f"# MM-RLHF import of `{rep['input']}`", "",
             f"overall = weighted mean of the available dimension scores ({w}).", "",
             "| split | prompts | responses | pairs |", "|---|---|---|---|"]
    for s in ("train", "val", "total"):
        lines.append(f"| {s} | {rep['prompts'][s]} | {rep['responses'][s]} | {rep['pairs'][s]} |")
    a = rep["human_ranking_agreement"]
    lines += ["", (f"Tied response pairs (no pair made): {rep['tied_response_pairs']} in "
                   f"{rep['prompts_with_ties']} prompts; prompts with no pair at all: "
                   f"{rep['prompts_without_pairs']}."),
              (f"Pairs whose order agrees with the annotators' final_ranking: {a['agree']} "
               f"(disagree {a['disagree']}, human tie {a['human_tie']}, no rank {a['no_human_rank']})."), "",
              "| score | n | missing | min | median | mean | max |", "|---|---|---|---|---|---|---|"]
    for name, d in list(rep["scores"].items()) + [("overall", rep["overall"])]:
        if d["n"]:
            lines.append(f"| {name} | {d['n']} | {d['missing']} | {d['min']:g} | {d['median']:g} | "
                         f"{d['mean']:.3f} | {d['max']:g} |")
        else:
            lines.append(f"| {name} | 0 | {d['missing']} | | | | |")
    rj = rep["rejected"]
    kinds = ", ".join(f"{k} {v}" for k, v in rj["by_kind"].items()) or "none"
    lines += ["", f"Rejected records: {rj['total']} ({kinds}); video records skipped: {rep['skipped_video']}.",
              "Both are listed with their reason in `rejects.jsonl`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# stage


def run(input_path: Path, images: Path, out: Path, val_fraction: float = 0.05,
        weights: dict[str, float] | None = None, on_error: str = "raise", check_images: str = "decode",
        seed: int = 0, force: bool = False) -> dict[str, Any] | None:
    """Import ``input_path`` into ``out``; returns the report, or None when ``out`` was up to date.

    Raises :class:`RecordError` (``on_error="raise"``) at the first bad record, and whenever no
    record at all could be imported; ``out`` is then left as it was.
    """
    weights = weights or dict.fromkeys(DIMENSIONS, 1.0)
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such input file")
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: the image root is not a folder")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1], got {val_fraction}")
    config = {"input": str(input_path), "images": str(images.resolve()), "weights": weights,
              "val_fraction": val_fraction, "on_error": on_error, "check_images": check_images, "seed": seed}
    if not force and is_up_to_date(out, config, [input_path]):
        print(f"{STAGE}: {out} up to date, skipping (--force to redo)")
        return None

    prompts: list[Prompt] = []
    rejects: list[dict] = []
    seen: dict[str, str] = {}
    for index, where, obj, err, raw in iter_input(input_path):
        try:
            if err:
                raise MMRLHFError(f"{where}: {err}", "malformed")
            p = parse_record(obj, index, where, images, weights, check_images)
            if p.id in seen:
                raise MMRLHFError(f"{p.where}: duplicate id (first at {seen[p.id]})", "duplicate_id")
            seen[p.id] = where
            prompts.append(p)
        except UnsupportedRecord as e:
            rejects.append({"where": where, "index": index, "kind": "unsupported_video", "error": str(e),
                            "record": obj})
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"where": where, "index": index, "kind": getattr(e, "kind", "image"),
                            "error": str(e), "record": obj if raw is None else raw})
    if not prompts:
        first = "; ".join(r["error"] for r in rejects[:3])
        raise MMRLHFError(f"{input_path}: no record could be imported ({len(rejects)} rejected"
                          + (f"; first: {first}" if first else "") + ")", "empty")

    splits = {p.id: split_of(p.id, val_fraction, seed) for p in prompts}
    pairs: dict[str, list[PreferenceRecord]] = {"train": [], "val": []}
    for p in prompts:
        pairs[splits[p.id]].extend(prompt_pairs(p))
    rep = build_report(prompts, splits, pairs, rejects, config)
    with StageOutput(out, stage=STAGE, config=config, inputs=[input_path]) as st:
        atomic_write_jsonl(st.path / "ranked.jsonl", (
            {"id": p.id, "images": p.images, "prompt": p.messages(), "responses": p.responses,
             "split": splits[p.id], "ranking_reason": p.ranking_reason, "reference": p.reference}
            for p in prompts))
        for s, recs in pairs.items():
            atomic_write_jsonl(st.path / s / "pairs.jsonl", (r.to_json() for r in recs))
            st.count(f"{s}/pairs", len(recs))
            st.count(f"{s}/prompts", rep["prompts"][s])
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(st.path / "report.md", report_md(rep))
        st.count("responses", rep["responses"]["total"])
        st.count("rejected", rep["rejected"]["total"])
        st.count("skipped_video", rep["skipped_video"])
        st.info["image_root"] = config["images"]
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.import_mmrlhf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path,
                    help="the published data.jsonl (or a .json list of the same records)")
    ap.add_argument("--images", required=True, type=Path,
                    help="the unzipped dataset root that the records' 'image' paths are relative to "
                         "(it holds short/ long/ mcq/ safety/)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="fraction of prompts (not pairs) put in val, by a hash of the prompt id (default 0.05)")
    ap.add_argument("--weights", default="faithfulness=1,helpfulness=1,ethical=1",
                    help="weights of the dimension scores in 'overall', e.g. faithfulness=2,helpfulness=1,ethics=1; "
                         "unnamed dimensions get 0 (default: all 1)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="raise: stop at the first bad record, write nothing; skip: write it to rejects.jsonl "
                         "with the reason and go on (default raise)")
    ap.add_argument("--check-images", choices=("decode", "exists"), default="decode",
                    help="decode every image (finds corrupt files; default) or only check it exists (faster)")
    ap.add_argument("--seed", type=int, default=0, help="salt of the train/val hash (default 0)")
    args, weights = ranking.parse_stage_args(ap, argv, dimensions=DIMENSIONS, aliases=ALIASES)
    try:
        rep = run(args.input, args.images, args.out, val_fraction=args.val_fraction, weights=weights,
                  on_error=args.on_error, check_images=args.check_images, seed=args.seed, force=args.force)
    except (RecordError, FileNotFoundError, ValueError) as e:
        print(f"{STAGE}: error: {e}", file=sys.stderr)
        return 1
    if rep is not None:
        print(report_md(rep))
        print(f"-> {args.out / 'ranked.jsonl'}, {args.out / 'train' / 'pairs.jsonl'}, "
              f"{args.out / 'val' / 'pairs.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
