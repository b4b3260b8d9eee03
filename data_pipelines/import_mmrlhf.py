"""Import the published MM-RLHF preference data into the project's ranked, pair and tie formats.

    python -m data_pipelines.import_mmrlhf --input MM-RLHF/data.jsonl --images MM-RLHF \\
        --out runs/mmrlhf/import [--format auto|data|pairs] [--val-fraction 0.05] \\
        [--weights faithfulness=1,helpfulness=1,ethical=1] [--on-error raise|skip]

MM-RLHF (Zhang et al. 2025, "MM-RLHF: The Next Step Forward in Multimodal LLM Alignment";
data: https://huggingface.co/datasets/yifanzhang114/MM-RLHF; code:
https://github.com/Kwai-YuanQi/MM-RLHF) gives, per (image, question), 3-5 model responses with
human scores on three dimensions, a human ranking, and the annotators' reasons (``data.jsonl``),
and the pairs the authors trained on (``dpo_pairs.jsonl``). Both files are read here
(``--format``; ``auto`` looks at the first record: ``models_output`` means ``data``, ``chosen``
and ``rejected`` mean ``pairs``).

Where each part was confirmed
-----------------------------
In github.com/Kwai-YuanQi/MM-RLHF at commit 7c8af1d:

* ``README.md`` ("Data Preparation"): the unzipped dataset root holds ``long/ mcq/ safety/
  short/`` (and video frames), ``data.jsonl`` ("contains all labeled information") and
  ``dpo_pairs.jsonl`` ("contains pairs of different ranks used for subsequent DPO and reward model
  training").
* ``dpo_pairs.jsonl``'s fields, from the code that reads it: ``scripts/convert_to_swift.py`` opens
  ``MM-RLHF/dpo_pairs.jsonl`` and reads ``prompt``, ``chosen``, ``rejected`` and either ``image``
  (joined onto the dataset root) or ``video`` (a record is a video record when the key
  ``video`` is present, an image record otherwise); ``llava/train/train_dpo.py``
  (``DPODataset._get_item``, ``DPODataCollator``) reads ``prompt`` (it strips ``<image>`` and
  re-adds it in front), ``chosen``, ``rejected``, ``image`` (a path or a list of paths,
  ``Image.open(os.path.join(image_folder, image))``), ``chosen_reason`` / ``rejected_reason``
  (only together: the critique reward model's training targets, the gpt turn of ``make_conv_rm``;
  a pair without them trains the score head only, ``no_critic``), ``is_tie`` (a tied pair,
  trained with the reward trainer's tie loss) and ``ls_factor`` (default 1.0 when absent; nothing
  in the release computes it). ``llava/eval/eval_mm_reward_bench.py`` reads the same
  ``prompt``/``chosen``/``rejected``/``chosen_reason``/``rejected_reason``/``image``/``video``
  from the RewardBench file. That the reasons are the annotators' notes expanded by GPT-4o is the
  paper's account, not something the code shows. NOT confirmed: whether a pair carries an ``id``
  (accepted when present, else ``mmrlhf-pair-<record index>``) and which other fields the
  released file has (every other key is counted in ``report.json`` under ``other_fields`` and
  dropped), and whether the released file contains tied pairs at all ("pairs of different ranks"
  suggests not; the code handles them).
* ``data.jsonl``'s fields (``id, question, answer, image, video, models_output, faithfulness,
  helpfulness, ethical, final_ranking, score_reasons, ranking_reason``; 3-5 outputs per prompt;
  per-output lists; ``final_ranking`` per-output ranks, 1 = best) were read from third-party code
  in the public code index that loads the published file (the index did not name those
  repositories, so they cannot be cited by path); the dataset card's own field table could not be
  retrieved. NOT confirmed: the inner shape of ``score_reasons`` (a string, null, a list of strings
  or a ``{dimension: text}`` object are all accepted and flattened to one critique string), the
  score scale (no range is enforced; ``report.json`` shows the values seen), and whether absent
  values are JSON ``null`` or missing keys (both accepted). Numeric strings (``"3"``) are accepted
  as scores and ranks in case an export stringified them. The parquet copy is not read.

``data.jsonl`` input
--------------------
=================  =========================================================================
``id``             prompt id (string; ``mmrlhf-<record index>`` when absent)
``question``       the user's question (a leading LLaVA ``<image>`` token is dropped: the image
                   becomes its own ``{"type": "image"}`` part)
``image``          image path relative to the dataset root (or a list of paths); null for video
``video``          frame folder of a video record; null for image records
``models_output``  list of the responses (strings)
``faithfulness``   list, one score per response (null = not scored); ``helpfulness`` and
                   ``ethical`` alike (at least one of the three must be present)
``final_ranking``  list, the annotators' rank of each response (1 = best; equal = tied); required
``score_reasons``  list, the annotation text of each response (its critique)
``ranking_reason`` the annotators' reason for the ranking (one string)
``answer``         a reference answer where the task has one (kept as ``reference``)
=================  =========================================================================

Pairs follow the human ranking, as the released pairs do ("pairs of different ranks"):
responses are ordered by ``final_ranking`` (then input order), every two responses of different
rank make a pair (the better-ranked one chosen), and every two of equal rank make a *tie record*
(``is_tie: true``, chosen = the earlier response in input order) for the reward model's tie
loss. The dimension scores do not decide anything: their weighted mean ``overall``
(``--weights``, default equal; a null score drops out of that response's mean) is kept on each
response and pair (``score_chosen`` / ``score_rejected``), and ``report.json`` says how often its
order agrees with the human ranking. (An earlier version of this importer ranked by ``overall``
and dropped score ties; that is not what MM-RLHF trains on.)

``dpo_pairs.jsonl`` input
-------------------------
One pair per line: ``prompt``, ``chosen``, ``rejected`` (strings), ``image`` (a path or a list,
relative to ``--images``) or ``video``, optional ``chosen_reason`` + ``rejected_reason`` (both or
neither; they become ``critique_chosen`` / ``critique_rejected``, what the critique reward model
learns to write), ``is_tie`` (true/false), ``ls_factor`` (a number, kept as is), ``id``. Pairs
of one (image, prompt) share a ``prompt_id`` (a hash of the image paths and the prompt text), so
the train/val split keeps them together.

Video records (``video`` set, no ``image``) are outside an image pipeline: they are never an
error, but each is written to ``rejects.jsonl`` with kind ``unsupported_video`` and counted.

Output
------
Atomic, with ``manifest.json``; image paths stay relative to ``--images``, which the manifest
records, because the images are tens of GB and are not copied:

* ``train/pairs.jsonl`` / ``val/pairs.jsonl``: the strict pairs as
  :class:`mmalign.records.PreferenceRecord` s, for DPO and the reward model. Read them with
  ``read_records(path, "preference", data_root=<--images>)``.
* ``train/ties.jsonl`` / ``val/ties.jsonl``: the tied pairs (``is_tie: true``), apart from the
  pairs so that no DPO run can read a tie as a preference; the reward model takes them as
  ``RewardDataModule(ties_file=...)`` (the tie loss). Always written, empty when there are none.
* From ``data.jsonl``: ``ranked.jsonl``, one record per (image, question): ``id``, ``images``,
  ``prompt`` (one user message: image part(s), then the question), ``responses`` sorted best
  first by ``final_ranking``, each ``{"text", "source": "mmrlhf", "scores": {dimension: float},
  "overall", "critique", "human_rank", "input_index"}``, ``split``, ``ranking_reason``,
  ``reference``. Pair and tie ids are ``<prompt id>-<i>-<j>`` (``i``, ``j`` = ``chosen_rank``,
  ``rejected_rank``: 0-based positions in the prompt's ranked ``responses``); meta ``prompt_id,
  chosen_rank, rejected_rank, scores_*, critique_*, source_*, human_rank_*`` (``*`` = chosen,
  rejected).
* From ``dpo_pairs.jsonl``: meta ``prompt_id, source_*`` and, when given, ``critique_*``,
  ``ls_factor``; no ranked file (there is no ranking in it).
* The split is by prompt: ``val`` when sha256(``<seed>:<prompt id>``) as a fraction of 2^64 is
  below ``--val-fraction``, so a prompt's pairs and ties never straddle the split and the
  assignment does not depend on file order.
* ``report.json`` / ``report.md``: prompts, pairs and ties per split, prompts with ties and
  prompts whose responses are all tied, score distributions and the agreement of ``overall`` with
  the human ranking (``data``), pairs with critiques, ``ls_factor`` and other fields seen
  (``pairs``), rejected records by kind. ``rejects.jsonl``: every record not imported, with where,
  kind and reason.

Errors: every bad record is a :class:`mmalign.records.RecordError` naming the file and the line
(``data.jsonl:17``) or record index (``data.json: record 3``) and the id: malformed JSON, missing
field (``final_ranking`` included), a null rank, list lengths that differ from ``models_output``, a
non-numeric/NaN/inf score or rank, an empty response, one reason without the other, an
``is_tie`` that is not true/false, a duplicate id, an image path escaping ``--images``, a missing
or corrupt image. With ``--on-error raise`` (default) the first one stops the stage and nothing
is written; with ``--on-error skip`` each goes to ``rejects.jsonl`` with its reason and is
counted.
"""

from __future__ import annotations

import argparse
import hashlib
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
SPLITS = ("train", "val")


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



def _text(value: Any, name: str, where: str) -> str:
    """A non-empty response text within the length limit."""
    if not isinstance(value, str):
        raise MMRLHFError(f"{where}: {name} must be a string, got {type(value).__name__}", "malformed")
    if not value.strip():
        raise MMRLHFError(f"{where}: {name} is an empty response", "empty_text")
    if len(value) > MAX_RESPONSE_CHARS:
        raise MMRLHFError(f"{where}: {name} has {len(value)} characters, over the limit of {MAX_RESPONSE_CHARS}",
                          "too_long")
    return value


def _question(obj: dict, key: str, where: str) -> str:
    question = obj.get(key)
    if question is None:
        raise MMRLHFError(f"{where}: missing field '{key}'", "missing_field")
    if not isinstance(question, str):
        raise MMRLHFError(f"{where}: '{key}' must be a string, got {type(question).__name__}", "malformed")
    question = IMAGE_TOKEN.sub("", question).strip()
    if not question:
        raise MMRLHFError(f"{where}: '{key}' is empty", "empty_text")
    return question


def _record_id(obj: dict, default: str, where: str) -> str:
    pid = obj.get("id")
    if pid is None:
        return default
    if not isinstance(pid, (str, int)) or isinstance(pid, bool) or not str(pid).strip():
        raise MMRLHFError(f"{where}: 'id' must be a non-empty string or integer, got {pid!r}", "malformed")
    return str(pid)


def _image_paths(obj: dict, where: str, images_root: Path, check_images: str) -> list[str]:
    """The record's image path(s), checked to lie under ``images_root`` and to exist (or decode);
    a video record raises :class:`UnsupportedRecord`."""
    image, video = obj.get("image"), obj.get("video")
    if not image:
        if video:
            raise UnsupportedRecord(f"{where}: video record (video={video!r}); this importer takes image records")
        raise MMRLHFError(f"{where}: missing field 'image'", "missing_field")
    rels = image if isinstance(image, list) else [image]
    if not rels or not all(isinstance(r, str) and r.strip() for r in rels):
        raise MMRLHFError(f"{where}: 'image' must be a path string or a list of path strings, got {image!r}",
                          "malformed")
    root = images_root.resolve()
    out = []
    for rel in rels:
        full = resolve_image_path(rel, root, where)
        if check_images == "decode":
            load_image(full, where)
        elif not image_exists(full):
            raise MMRLHFError(f"{where}: image {rel!r} not found under {root}", "image")
        out.append(full.relative_to(root).as_posix())
    return out


def _messages(images: list[str], question: str) -> list[dict]:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------------------------
# data.jsonl: ranked responses


@dataclass
class Prompt:
    """One imported (image, question) with its responses sorted best first by the human rank."""

    id: str
    images: list[str]
    question: str
    responses: list[dict]
    ranking_reason: str
    reference: str | None
    where: str

    def messages(self) -> list[dict]:
        return _messages(self.images, self.question)


def parse_record(obj: Any, index: int, where: str, images_root: Path, weights: dict[str, float],
                 check_images: str) -> Prompt:
    """Validate one ``data.jsonl`` record and build its :class:`Prompt`; errors name ``where``."""
    if not isinstance(obj, dict):
        raise MMRLHFError(f"{where}: a record must be a JSON object, got {type(obj).__name__}", "malformed")
    pid = _record_id(obj, f"mmrlhf-{index}", where)
    where = f"{where} id={pid}"
    if not obj.get("image") and obj.get("video"):
        raise UnsupportedRecord(f"{where}: video record (video={obj['video']!r}); this importer takes image records")
    if not obj.get("image"):
        raise MMRLHFError(f"{where}: missing field 'image'", "missing_field")
    question = _question(obj, "question", where)

    outputs = obj.get("models_output")
    if outputs is None:
        raise MMRLHFError(f"{where}: missing field 'models_output'", "missing_field")
    if not isinstance(outputs, list) or not outputs:
        raise MMRLHFError(f"{where}: 'models_output' must be a non-empty list of responses", "malformed")
    n = len(outputs)
    for k, text in enumerate(outputs):
        _text(text, f"models_output[{k}]", where)

    columns = {d: _per_response(obj, d, n, where) for d in DIMENSIONS}
    if all(c is None for c in columns.values()):
        raise MMRLHFError(f"{where}: missing score fields: none of {', '.join(DIMENSIONS)} is present",
                          "missing_field")
    ranks = _per_response(obj, "final_ranking", n, where)
    if ranks is None:
        raise MMRLHFError(f"{where}: missing field 'final_ranking' (the pairs follow the annotators' ranking)",
                          "missing_field")
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
        rank = _human_rank(ranks[k], f"final_ranking[{k}]", where)
        if rank is None:
            raise MMRLHFError(f"{where}: final_ranking[{k}] is null; every response needs the annotators' rank",
                              "missing_rank")
        responses.append({
            "text": text, "source": SOURCE, "scores": scores, "overall": overall,
            "critique": _critique(reasons[k], f"score_reasons[{k}]", where) if reasons is not None else "",
            "human_rank": int(rank) if rank.is_integer() else rank,
            "input_index": k,
        })
    # Best first by the annotators' rank; equal ranks (ties) keep the input order.
    responses.sort(key=lambda r: (r["human_rank"], r["input_index"]))
    images = _image_paths(obj, where, images_root, check_images)
    return Prompt(id=pid, images=images, question=question, responses=responses,
                  ranking_reason=(ranking_reason or "").strip(), reference=reference, where=where)


def prompt_pairs(p: Prompt) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """``(pairs, ties)`` of one prompt: a pair for every two responses of different human rank
    (the better-ranked chosen), a tie record (``is_tie: true``) for every two of equal rank.
    Positions ``i < j`` index the ranked ``responses``; ids are ``<prompt id>-<i>-<j>``."""
    pairs, ties = [], []
    rs = p.responses
    for i in range(len(rs)):
        for j in range(i + 1, len(rs)):
            c, r = rs[i], rs[j]
            meta: dict[str, Any] = {"prompt_id": p.id, "chosen_rank": i, "rejected_rank": j}
            for f in (*ranking.PAIR_FIELDS, "human_rank"):
                meta[f"{f}_chosen"], meta[f"{f}_rejected"] = c[f], r[f]
            tie = c["human_rank"] == r["human_rank"]
            if tie:
                meta["is_tie"] = True
            rec = PreferenceRecord(id=f"{p.id}-{i}-{j}", images=list(p.images), prompt=p.messages(),
                                   chosen=ranking.assistant_message(c["text"]),
                                   rejected=ranking.assistant_message(r["text"]),
                                   score_chosen=c["overall"], score_rejected=r["overall"], meta=meta)
            # Round-trip through the schema reader so an output line can never fail to load later.
            PreferenceRecord.from_json(rec.to_json(), p.where, max_chars=None)
            (ties if tie else pairs).append(rec)
    return pairs, ties


# --------------------------------------------------------------------------------------------
# dpo_pairs.jsonl: the authors' pairs


def parse_pair(obj: Any, index: int, where: str, images_root: Path, check_images: str) -> PreferenceRecord:
    """Validate one ``dpo_pairs.jsonl`` record and build its :class:`PreferenceRecord`."""
    if not isinstance(obj, dict):
        raise MMRLHFError(f"{where}: a record must be a JSON object, got {type(obj).__name__}", "malformed")
    rid = _record_id(obj, f"mmrlhf-pair-{index}", where)
    where = f"{where} id={rid}"
    if "video" in obj and not obj.get("image"):   # the release's test: the key 'video' is present
        raise UnsupportedRecord(f"{where}: video record (video={obj['video']!r}); this importer takes image records")
    question = _question(obj, "prompt", where)
    texts = {}
    for key in ("chosen", "rejected"):
        if obj.get(key) is None:
            raise MMRLHFError(f"{where}: missing field '{key}'", "missing_field")
        texts[key] = _text(obj[key], f"'{key}'", where)
    reasons = {k: obj.get(f"{k}_reason") for k in ("chosen", "rejected")}
    given = [k for k, v in reasons.items() if v is not None]
    if len(given) == 1:
        other = "rejected" if given[0] == "chosen" else "chosen"
        raise MMRLHFError(f"{where}: '{given[0]}_reason' without '{other}_reason' (the critique reward model "
                          "needs both critiques of a pair, or neither)", "malformed")
    for k, v in reasons.items():
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise MMRLHFError(f"{where}: '{k}_reason' must be a non-empty string, got {v!r}", "malformed")
    tie = obj.get("is_tie", False)
    if not isinstance(tie, bool):
        raise MMRLHFError(f"{where}: 'is_tie' must be true or false, got {tie!r}", "malformed")
    ls_factor = obj.get("ls_factor")
    if ls_factor is not None:
        ls_factor = _score(ls_factor, "'ls_factor'", where)
    images = _image_paths(obj, where, images_root, check_images)
    # Pairs of one (image, prompt) share this id, which keeps them in one split.
    key = json.dumps([images, question], ensure_ascii=False)
    meta: dict[str, Any] = {"prompt_id": "mmrlhf-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16],
                            "source_chosen": SOURCE, "source_rejected": SOURCE}
    if given:
        meta["critique_chosen"], meta["critique_rejected"] = reasons["chosen"].strip(), reasons["rejected"].strip()
    if tie:
        meta["is_tie"] = True
    if ls_factor is not None:
        meta["ls_factor"] = ls_factor
    rec = PreferenceRecord(id=rid, images=images, prompt=_messages(images, question),
                           chosen=ranking.assistant_message(texts["chosen"]),
                           rejected=ranking.assistant_message(texts["rejected"]), meta=meta)
    PreferenceRecord.from_json(rec.to_json(), where, max_chars=None)
    return rec


#: the dpo_pairs.jsonl fields read (anything else is counted in the report and dropped)
PAIR_KEYS = {"id", "prompt", "chosen", "rejected", "image", "video", "chosen_reason", "rejected_reason",
             "is_tie", "ls_factor"}


def detect_format(path: Path) -> str:
    """``"data"`` or ``"pairs"`` from the first JSON object of ``path`` (``models_output`` ->
    data; ``chosen`` and ``rejected`` -> pairs)."""
    for _, where, obj, _, _ in iter_input(path):
        if not isinstance(obj, dict):
            continue
        if "models_output" in obj:
            return "data"
        if "chosen" in obj and "rejected" in obj:
            return "pairs"
        raise MMRLHFError(f"{where}: cannot tell the layout: neither 'models_output' (data.jsonl) nor "
                          "'chosen' and 'rejected' (dpo_pairs.jsonl); pass --format", "malformed")
    raise MMRLHFError(f"{path}: no JSON object to tell the layout from; pass --format", "empty")


# --------------------------------------------------------------------------------------------
# split and report


def split_of(prompt_id: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` or ``"train"`` from a hash of ``"<seed>:<prompt id>"`` (:func:`mmalign.ranking.split_of`),
    so every pair of a prompt lands in the same split whatever the file order, and re-runs agree."""
    return ranking.split_of(prompt_id, val_fraction, seed)


def distribution(values: list[float], missing: int = 0) -> dict[str, Any]:
    """Count, missing, min/quartiles/max, mean and (for few distinct values) a histogram."""
    return {"n": len(values), "missing": missing} | ranking.distribution(values, histogram_max=MAX_HISTOGRAM_VALUES)


def _counts(recs: dict[str, list[PreferenceRecord]]) -> dict[str, int]:
    return {s: len(recs[s]) for s in SPLITS} | {"total": sum(len(v) for v in recs.values())}


def _rejected(rejects: list[dict]) -> dict[str, Any]:
    kinds = Counter(r["kind"] for r in rejects)
    return {"rejected": {"total": sum(k != "unsupported_video" for k in kinds.elements()),
                         "by_kind": {k: kinds[k] for k in sorted(kinds) if k != "unsupported_video"}},
            "skipped_video": kinds["unsupported_video"]}


def _tie_stats(pairs: dict[str, list[PreferenceRecord]], ties: dict[str, list[PreferenceRecord]]) -> dict[str, int]:
    with_pairs = {r.meta["prompt_id"] for v in pairs.values() for r in v}
    with_ties = {r.meta["prompt_id"] for v in ties.values() for r in v}
    return {"prompts_with_ties": len(with_ties), "prompts_without_pairs": len(with_ties - with_pairs)}


def build_report(prompts: list[Prompt], splits: dict[str, str], pairs: dict[str, list[PreferenceRecord]],
                 ties: dict[str, list[PreferenceRecord]], rejects: list[dict], config: dict) -> dict[str, Any]:
    """The report of a ``data.jsonl`` import."""
    per_split = {s: [p for p in prompts if splits[p.id] == s] for s in SPLITS}
    dims: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
    missing = Counter()
    overall = []
    for p in prompts:
        for r in p.responses:
            overall.append(r["overall"])
            for d in DIMENSIONS:
                if d in r["scores"]:
                    dims[d].append(r["scores"][d])
                else:
                    missing[d] += 1
    agree = Counter()
    for recs in pairs.values():
        for rec in recs:
            c, r = rec.score_chosen, rec.score_rejected
            agree["agree" if c > r else "score_tie" if c == r else "disagree"] += 1
    return {
        "format": "data", "input": config["input"], "images": config["images"], "weights": config["weights"],
        "val_fraction": config["val_fraction"],
        "prompts": {s: len(ps) for s, ps in per_split.items()} | {"total": len(prompts)},
        "responses": {s: sum(len(p.responses) for p in ps) for s, ps in per_split.items()}
        | {"total": sum(len(p.responses) for p in prompts)},
        "pairs": _counts(pairs), "ties": _counts(ties), **_tie_stats(pairs, ties),
        "scores": {d: distribution(dims[d], missing[d]) for d in DIMENSIONS},
        "overall": distribution(overall),
        "score_order_agreement": {k: agree[k] for k in ("agree", "disagree", "score_tie")},
        **_rejected(rejects),
    }


def build_pairs_report(recs: list[PreferenceRecord], splits: dict[str, str],
                       pairs: dict[str, list[PreferenceRecord]], ties: dict[str, list[PreferenceRecord]],
                       other_fields: Counter, rejects: list[dict], config: dict) -> dict[str, Any]:
    """The report of a ``dpo_pairs.jsonl`` import."""
    prompts = {s: {r.meta["prompt_id"] for r in pairs[s] + ties[s]} for s in SPLITS}
    return {
        "format": "pairs", "input": config["input"], "images": config["images"],
        "val_fraction": config["val_fraction"],
        "prompts": {s: len(prompts[s]) for s in SPLITS} | {"total": len(prompts["train"] | prompts["val"])},
        "pairs": _counts(pairs), "ties": _counts(ties), **_tie_stats(pairs, ties),
        "with_critiques": sum("critique_chosen" in r.meta for r in recs),
        "with_ls_factor": sum("ls_factor" in r.meta for r in recs),
        "other_fields": dict(sorted(other_fields.items())),
        **_rejected(rejects),
    }


def report_md(rep: dict) -> str:
    layout = "data.jsonl" if rep["format"] == "data" else "dpo_pairs.jsonl"
    lines = [f"# MM-RLHF import of `{rep['input']}` ({layout} layout)", ""]
    if rep["format"] == "data":
        w = ", ".join(f"{d}={v:g}" for d, v in rep["weights"].items())
        lines += [("Pairs follow the annotators' final_ranking: every two responses of different rank make a pair, "
                   "every two of equal rank a tie record (ties.jsonl, for the reward model's tie loss)."),
                  f"overall (kept, decides nothing) = weighted mean of the available dimension scores ({w}).", ""]
    lines += ["| split | prompts | pairs | ties |", "|---|---|---|---|"]
    for s in (*SPLITS, "total"):
        lines.append(f"| {s} | {rep['prompts'][s]} | {rep['pairs'][s]} | {rep['ties'][s]} |")
    lines += ["", (f"Prompts with tied responses: {rep['prompts_with_ties']}; prompts whose responses are all tied "
                   f"(ties only, no pair): {rep['prompts_without_pairs']}.")]
    if rep["format"] == "data":
        a = rep["score_order_agreement"]
        lines += [(f"Pairs whose overall score order agrees with the human ranking: {a['agree']} (disagree "
                   f"{a['disagree']}, equal scores {a['score_tie']})."), "",
                  "| score | n | missing | min | median | mean | max |", "|---|---|---|---|---|---|---|"]
        for name, d in list(rep["scores"].items()) + [("overall", rep["overall"])]:
            if d["n"]:
                lines.append(f"| {name} | {d['n']} | {d['missing']} | {d['min']:g} | {d['median']:g} | "
                             f"{d['mean']:.3f} | {d['max']:g} |")
            else:
                lines.append(f"| {name} | 0 | {d['missing']} | | | | |")
    else:
        other = ", ".join(f"{k} ({v})" for k, v in rep["other_fields"].items()) or "none"
        lines += [(f"Pairs and ties with both critiques (chosen_reason / rejected_reason): {rep['with_critiques']}; "
                   f"with ls_factor: {rep['with_ls_factor']}; other fields seen and dropped: {other}.")]
    rj = rep["rejected"]
    kinds = ", ".join(f"{k} {v}" for k, v in rj["by_kind"].items()) or "none"
    lines += ["", f"Rejected records: {rj['total']} ({kinds}); video records skipped: {rep['skipped_video']}.",
              "Both are listed with their reason in `rejects.jsonl`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# stage


def run(input_path: Path, images: Path, out: Path, val_fraction: float = 0.05,
        weights: dict[str, float] | None = None, on_error: str = "raise", check_images: str = "decode",
        seed: int = 0, force: bool = False, fmt: str = "auto") -> dict[str, Any] | None:
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
    if fmt not in ("auto", "data", "pairs"):
        raise ValueError(f"--format must be auto, data or pairs, not {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(input_path)
    config = {"input": str(input_path), "images": str(images.resolve()), "format": fmt,
              "weights": weights if fmt == "data" else None,
              "val_fraction": val_fraction, "on_error": on_error, "check_images": check_images, "seed": seed}
    if not force and is_up_to_date(out, config, [input_path]):
        print(f"{STAGE}: {out} up to date, skipping (--force to redo)")
        return None

    prompts: list[Prompt] = []
    recs: list[PreferenceRecord] = []
    other_fields: Counter = Counter()
    rejects: list[dict] = []
    seen: dict[str, str] = {}
    for index, where, obj, err, raw in iter_input(input_path):
        try:
            if err:
                raise MMRLHFError(f"{where}: {err}", "malformed")
            if fmt == "data":
                item = parse_record(obj, index, where, images, weights, check_images)
                item_where = item.where
            else:
                item = parse_pair(obj, index, where, images, check_images)
                item_where = f"{where} id={item.id}"
            if item.id in seen:
                raise MMRLHFError(f"{item_where}: duplicate id (first at {seen[item.id]})", "duplicate_id")
            seen[item.id] = where
            if fmt == "data":
                prompts.append(item)
            else:
                recs.append(item)
                other_fields.update(k for k in obj if k not in PAIR_KEYS)
        except UnsupportedRecord as e:
            rejects.append({"where": where, "index": index, "kind": "unsupported_video", "error": str(e),
                            "record": obj})
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"where": where, "index": index, "kind": getattr(e, "kind", "image"),
                            "error": str(e), "record": obj if raw is None else raw})
    if not prompts and not recs:
        first = "; ".join(r["error"] for r in rejects[:3])
        raise MMRLHFError(f"{input_path}: no record could be imported ({len(rejects)} rejected"
                          + (f"; first: {first}" if first else "") + ")", "empty")

    pairs: dict[str, list[PreferenceRecord]] = {s: [] for s in SPLITS}
    ties: dict[str, list[PreferenceRecord]] = {s: [] for s in SPLITS}
    if fmt == "data":
        splits = {p.id: split_of(p.id, val_fraction, seed) for p in prompts}
        for p in prompts:
            ps, ts = prompt_pairs(p)
            pairs[splits[p.id]].extend(ps)
            ties[splits[p.id]].extend(ts)
        rep = build_report(prompts, splits, pairs, ties, rejects, config)
    else:
        splits = {r.meta["prompt_id"]: split_of(r.meta["prompt_id"], val_fraction, seed) for r in recs}
        for r in recs:
            (ties if r.meta.get("is_tie") else pairs)[splits[r.meta["prompt_id"]]].append(r)
        rep = build_pairs_report(recs, splits, pairs, ties, other_fields, rejects, config)
    with StageOutput(out, stage=STAGE, config=config, inputs=[input_path]) as st:
        if fmt == "data":
            atomic_write_jsonl(st.path / "ranked.jsonl", (
                {"id": p.id, "images": p.images, "prompt": p.messages(), "responses": p.responses,
                 "split": splits[p.id], "ranking_reason": p.ranking_reason, "reference": p.reference}
                for p in prompts))
            st.count("responses", rep["responses"]["total"])
        for s in SPLITS:
            atomic_write_jsonl(st.path / s / "pairs.jsonl", (r.to_json() for r in pairs[s]))
            atomic_write_jsonl(st.path / s / "ties.jsonl", (r.to_json() for r in ties[s]))
            st.count(f"{s}/pairs", len(pairs[s]))
            st.count(f"{s}/ties", len(ties[s]))
            st.count(f"{s}/prompts", rep["prompts"][s])
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(st.path / "report.md", report_md(rep))
        st.count("rejected", rep["rejected"]["total"])
        st.count("skipped_video", rep["skipped_video"])
        st.info["image_root"] = config["images"]
        st.info["format"] = fmt
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.import_mmrlhf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path,
                    help="the published data.jsonl or dpo_pairs.jsonl (or a .json list of the same records)")
    ap.add_argument("--images", required=True, type=Path,
                    help="the unzipped dataset root that the records' 'image' paths are relative to "
                         "(it holds short/ long/ mcq/ safety/)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    ap.add_argument("--format", choices=("auto", "data", "pairs"), default="auto",
                    help="data: data.jsonl (ranked responses); pairs: dpo_pairs.jsonl; auto (default): from the "
                         "first record")
    ap.add_argument("--val-fraction", type=float, default=0.05,
                    help="fraction of prompts (not pairs) put in val, by a hash of the prompt id (default 0.05)")
    ap.add_argument("--weights", default="faithfulness=1,helpfulness=1,ethical=1",
                    help="data.jsonl: weights of the dimension scores in 'overall' (kept on each pair; the pairs "
                         "follow final_ranking), e.g. faithfulness=2,helpfulness=1,ethics=1; unnamed dimensions "
                         "get 0 (default: all 1)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="raise: stop at the first bad record, write nothing; skip: write it to rejects.jsonl "
                         "with the reason and go on (default raise)")
    ap.add_argument("--check-images", choices=("decode", "exists"), default="decode",
                    help="decode every image (finds corrupt files; default) or only check it exists (faster)")
    ap.add_argument("--seed", type=int, default=0, help="salt of the train/val hash (default 0)")
    args, weights = ranking.parse_stage_args(ap, argv, dimensions=DIMENSIONS, aliases=ALIASES)
    try:
        rep = run(args.input, args.images, args.out, val_fraction=args.val_fraction, weights=weights,
                  on_error=args.on_error, check_images=args.check_images, seed=args.seed, force=args.force,
                  fmt=args.format)
    except (RecordError, FileNotFoundError, ValueError) as e:
        print(f"{STAGE}: error: {e}", file=sys.stderr)
        return 1
    if rep is not None:
        print(report_md(rep))
        print(f"-> {args.out}/{{train,val}}/{{pairs,ties}}.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
