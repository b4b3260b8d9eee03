"""Validating readers for the published hallucination-benchmark files, in their exact layouts.

Every reader takes the file as published, checks every entry, and raises :class:`FormatError`
(a :class:`mmalign.records.RecordError`) on the first bad one. JSON-lines errors start with
``file:line:``; JSON-array errors name the file and the entry (``instances.json: annotations[12]:
unknown category_id 99``, ``query_all.json: [7] id=1012: ...``). Fields a reader does not model
are kept in ``meta``: nothing is dropped silently. With ``image_root`` given, every image an entry
names must exist under it (and may not escape it, see :func:`mmalign.records.resolve_image_path`).

POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP;
github.com/RUCAIBox/POPE; layout checked on the copy at github.com/AoiDragon/POPE):
    ``output/coco/coco_pope_{random,popular,adversarial}.json`` are JSON *lines* despite the
    ``.json`` suffix, one question per line::

        {"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882,
         "text": "Is there a dining table in the image?", "label": "yes"}

    ``question_id`` counts from 0 in the published COCO files; ``image`` is a COCO val2014 file
    name; ``label`` is "yes"/"no". ``image_id`` (in that copy; converted copies often drop it)
    is not a modelled field and lands in ``meta``.

COCO ``annotations/instances_{train,val}2014.json`` (what CHAIR reads for ground truth):
    ``{"info", "licenses", "images": [{"id", "file_name", "height", "width", ...}],
    "annotations": [{"id", "image_id", "category_id", "bbox", "segmentation", "area",
    "iscrowd"}], "categories": [{"id", "name", "supercategory"}]}``. An image's objects are the
    names of the categories of all its annotations, crowd ones included (as CHAIR does). CHAIR
    also adds objects found in the five reference captions (``captions_*2014.json``); that belongs
    to the metric, not to this reader.

AMBER (Wang et al. 2023, "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation", arXiv:2311.07397; github.com/junyangwang0410/AMBER, ``data/``):
    * ``query/query_all.json`` (and ``query_generative.json``, ``query_discriminative.json``,
      ``query_discriminative-{existence,attribute,relation}.json``, subsets of it): a JSON list
      of ``{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}``. Ids 1-1004 are
      the generative task (one per image), 1005-15220 yes/no questions.
    * ``annotations.json``: a JSON list, entry ``id - 1`` describing query ``id``. Generative:
      ``{"id", "type": "generative", "truth": [object words in the image], "hallu": [object words
      a model is likely to hallucinate]}`` (words may repeat and a word may sit in both lists, as
      published). Discriminative: ``{"id", "type", "truth": "yes"|"no"}`` with type
      ``discriminative-hallucination`` (the existence dimension),
      ``discriminative-attribute-{state,number,action}`` or ``discriminative-relation``; in the
      published file the relation questions answered "no" carry type ``relation`` instead.
      The official ``inference.py`` counts every type other than generative, attribute-* and
      hallucination as relation, so both relation spellings are the relation dimension here.
    * ``relation.json``: object word -> associated words (``"car": ["window", "door", "tire",
      ...]``). Not a synonym table (it is not symmetric and would be ambiguous as one). The
      official evaluation considers only generated nouns that occur in this file (as a key or an
      associated word); of those it accepts a noun that is a truth word or associated with one
      and counts a hallucination hit for a hallu word or one associated with it. Read by
      :func:`read_amber_relation`.
    * ``safe_words.txt``: one word per line (orange, snack, line, camera, light, ...) that the
      generative evaluation never counts as hallucinated. Read by :func:`read_amber_safe_words`.

    Used by the official AMBER evaluation and not read here: ``metrics.txt`` (only the counters'
    start values; every denominator starts at 0.001 so empty splits do not divide by zero, which
    biases small splits slightly), NLTK part-of-speech tagging (generated nouns = ``NN*`` tags,
    lemmatised with WordNet) and spaCy ``en_core_web_lg`` word-vector similarity > 0.8 as a
    near-synonym test, and the response file layout ``[{"id": ..., "response": ...}]`` in which a
    yes/no answer counts only when it is exactly "Yes" or "No".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.records import RecordError, image_exists, iter_jsonl, resolve_image_path

__all__ = [
    "AMBER_TYPES",
    "AmberAnnotation",
    "AmberQuery",
    "CocoImage",
    "CocoInstances",
    "FormatError",
    "PopeQuestion",
    "read_amber_annotations",
    "read_amber_queries",
    "read_amber_relation",
    "read_amber_safe_words",
    "read_coco_instances",
    "read_pope_questions",
]


class FormatError(RecordError):
    """A benchmark file is malformed; the message names the file and the line or entry."""


# --------------------------------------------------------------------------------------------
# shared checks


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _need_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise FormatError(f"{where}: missing field '{key}'")
    v = obj[key]
    if not isinstance(v, str):
        raise FormatError(f"{where}: '{key}' must be a string, got {_type_name(v)}")
    if not v.strip():
        raise FormatError(f"{where}: '{key}' is empty")
    return v


def _need_int(obj: Mapping[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise FormatError(f"{where}: missing field '{key}'")
    v = obj[key]
    if not _is_int(v):
        raise FormatError(f"{where}: '{key}' must be an integer, got {_type_name(v)} {v!r}")
    return v


def _yes_no(v: Any, key: str, where: str) -> bool:
    if not isinstance(v, str) or v.strip().lower() not in ("yes", "no"):
        raise FormatError(f"{where}: '{key}' must be \"yes\" or \"no\", got {v!r}")
    return v.strip().lower() == "yes"


def _check_image(image: str, root: Path | None, where: str) -> None:
    if root is None:
        return
    try:
        full = resolve_image_path(image, root, where)
    except RecordError as e:  # a path escaping the root: same message, this module's error type
        raise FormatError(str(e)) from None
    if not image_exists(full):  # a name the file system refuses (too long) is "not found", not an OSError
        raise FormatError(f"{where}: image {image!r} not found under {root}")


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _need_list(obj: Any, where: str, what: str) -> list:
    if not isinstance(obj, list):
        raise FormatError(f"{where}: {what} must be a JSON list, got {_type_name(obj)}")
    return obj


# --------------------------------------------------------------------------------------------
# POPE


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question. ``question_id`` as written (an int in the published files);
    ``label`` True for "yes"; ``meta`` holds every other field (e.g. ``image_id``)."""

    question_id: int | str
    image: str
    text: str
    label: bool
    meta: Mapping[str, Any] = field(default_factory=dict)


_POPE_FIELDS = ("question_id", "image", "text", "label")


def read_pope_questions(path: str | os.PathLike, image_root: str | os.PathLike | None = None
                        ) -> list[PopeQuestion]:
    """Read a POPE question file (JSON lines; blank lines skipped), in file order.

    Errors (``file:line: ...``): malformed JSON, a line that is not an object, a missing or
    mistyped field, a label other than yes/no (any case), a repeated ``question_id``, a missing
    image (when ``image_root`` is given); a file with no questions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such POPE question file")
    root = Path(image_root) if image_root is not None else None
    out: list[PopeQuestion] = []
    seen: dict[int | str, int] = {}
    for lineno, obj, err in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if err:
            raise FormatError(f"{where}: {err}")
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: a question must be a JSON object, got {_type_name(obj)}")
        if "question_id" not in obj:
            raise FormatError(f"{where}: missing field 'question_id'")
        qid = obj["question_id"]
        if not (_is_int(qid) or (isinstance(qid, str) and qid.strip())):
            raise FormatError(f"{where}: 'question_id' must be an integer or a non-empty string, "
                              f"got {_type_name(qid)} {qid!r}")
        if qid in seen:
            raise FormatError(f"{where}: duplicate question_id {qid!r} (first at line {seen[qid]})")
        seen[qid] = lineno
        image = _need_str(obj, "image", where)
        text = _need_str(obj, "text", where)
        if "label" not in obj:
            raise FormatError(f"{where}: missing field 'label'")
        label = _yes_no(obj["label"], "label", where)
        _check_image(image, root, where)
        meta = {k: v for k, v in obj.items() if k not in _POPE_FIELDS}
        out.append(PopeQuestion(qid, image, text, label, meta))
    if not out:
        raise FormatError(f"{path}: no questions in the file")
    return out


# --------------------------------------------------------------------------------------------
# COCO instances


@dataclass(frozen=True)
class CocoImage:
    """One COCO image and the names of the categories annotated in it (empty if none)."""

    image_id: int
    file_name: str
    categories: frozenset[str]


@dataclass(frozen=True)
class CocoInstances:
    """A COCO instances file: images by id, category names by id."""

    images: dict[int, CocoImage]
    categories: dict[int, str]
    _by_file: dict[str, CocoImage] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_file", {im.file_name: im for im in self.images.values()})

    def by_file_name(self, file_name: str) -> CocoImage | None:
        """The image stored as ``file_name`` (POPE questions name images this way), or None."""
        return self._by_file.get(file_name)


def read_coco_instances(path: str | os.PathLike, image_root: str | os.PathLike | None = None
                        ) -> CocoInstances:
    """Read a COCO ``instances_*.json`` into each image's set of category names.

    Errors name the file and the entry: a missing top-level key, a mistyped or repeated id, a
    repeated category name or image file name, an annotation whose ``image_id`` or
    ``category_id`` is unknown, a missing image (when ``image_root`` is given).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    obj = _load_json(path, "COCO instances")
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: the top level must be an object, got {_type_name(obj)}")
    for key in ("images", "annotations", "categories"):
        if key not in obj:
            raise FormatError(f"{path}: missing top-level key '{key}' (a COCO instances file has "
                              f"images, annotations and categories)")
        _need_list(obj[key], f"{path}: '{key}'", "it")

    categories = _id_table(obj["categories"], path, "categories", "name", "category")
    files = _id_table(obj["images"], path, "images", "file_name", "image")
    for i, (iid, fname) in enumerate(files.items()):
        _check_image(fname, root, f"{path}: images[{i}] id={iid}")

    present: dict[int, set[str]] = {iid: set() for iid in files}
    for i, ann in enumerate(obj["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise FormatError(f"{where}: must be an object, got {_type_name(ann)}")
        iid = _need_int(ann, "image_id", where)
        cid = _need_int(ann, "category_id", where)
        if iid not in present:
            raise FormatError(f"{where}: unknown image_id {iid}")
        if cid not in categories:
            raise FormatError(f"{where}: unknown category_id {cid}")
        present[iid].add(categories[cid])

    if not files:
        raise FormatError(f"{path}: no images in the file")
    images = {iid: CocoImage(iid, files[iid], frozenset(present[iid])) for iid in files}
    return CocoInstances(images=images, categories=categories)


def _id_table(entries: list, path: Path, section: str, field: str, what: str) -> dict[int, str]:
    """``{id: entry[field]}`` for COCO's ``images`` / ``categories``; ids and values must be unique."""
    by_id: dict[int, str] = {}
    by_value: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: {section}[{i}]"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: must be an object, got {_type_name(entry)}")
        eid = _need_int(entry, "id", where)
        value = _need_str(entry, field, where)
        if eid in by_id:
            raise FormatError(f"{where}: duplicate {what} id {eid}")
        if value in by_value:
            raise FormatError(f"{where}: duplicate {what} {field} {value!r} (also {what} id {by_value[value]})")
        by_id[eid] = value
        by_value[value] = eid
    return by_id


# --------------------------------------------------------------------------------------------
# AMBER


@dataclass(frozen=True)
class AmberQuery:
    """One AMBER query: the prompt for ``image``; ``meta`` holds any further fields."""

    id: int
    image: str
    query: str
    meta: Mapping[str, Any] = field(default_factory=dict)


#: AMBER annotation type -> (dimension, subtype). Dimension None is the generative task.
AMBER_TYPES: dict[str, tuple[str | None, str | None]] = {
    "generative": (None, None),
    "discriminative-hallucination": ("existence", None),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation", None),
    "relation": ("relation", None),  # the published spelling for relation questions answered "no"
}


@dataclass(frozen=True)
class AmberAnnotation:
    """The ground truth of one AMBER query.

    ``type`` as written; ``dimension`` "existence" / "attribute" / "relation" for yes/no
    questions, None for the generative task; ``subtype`` "state" / "number" / "action" for
    attribute questions. Generative: ``truth_objects`` / ``hallu_objects`` as published (order
    and repeats kept), ``label`` None. Yes/no: ``label`` True for "yes", both object lists
    empty. ``meta`` holds any further fields.
    """

    id: int
    type: str
    dimension: str | None
    subtype: str | None
    truth_objects: tuple[str, ...]
    hallu_objects: tuple[str, ...]
    label: bool | None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def generative(self) -> bool:
        return self.dimension is None


def _amber_entries(path: Path, what: str) -> list:
    obj = _load_json(path, what)
    entries = _need_list(obj, str(path), "the top level")
    if not entries:
        raise FormatError(f"{path}: no entries in the file")
    return entries


def _amber_id(entry: Any, i: int, path: Path, seen: dict[int, int]) -> tuple[int, str]:
    where = f"{path}: [{i}]"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: an entry must be an object, got {_type_name(entry)}")
    qid = _need_int(entry, "id", where)
    if qid in seen:
        raise FormatError(f"{where}: duplicate id {qid} (first at [{seen[qid]}])")
    seen[qid] = i
    return qid, f"{where} id={qid}"


def read_amber_queries(path: str | os.PathLike, image_root: str | os.PathLike | None = None
                       ) -> list[AmberQuery]:
    """Read an AMBER query file (``query_all.json`` or one of its subsets), in file order.

    Errors name the file and the entry (``[i] id=...``): not a list, an entry that is not an
    object, a missing or mistyped ``id``/``image``/``query``, a repeated id, a missing image
    (when ``image_root`` is given); an empty list.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    out: list[AmberQuery] = []
    seen: dict[int, int] = {}
    for i, entry in enumerate(_amber_entries(path, "AMBER query")):
        qid, where = _amber_id(entry, i, path, seen)
        image = _need_str(entry, "image", where)
        query = _need_str(entry, "query", where)
        _check_image(image, root, where)
        meta = {k: v for k, v in entry.items() if k not in ("id", "image", "query")}
        out.append(AmberQuery(qid, image, query, meta))
    return out


def _word_list(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    if key not in entry:
        raise FormatError(f"{where}: missing field '{key}'")
    v = entry[key]
    if not isinstance(v, list):
        raise FormatError(f"{where}: '{key}' must be a list of object words, got {_type_name(v)}")
    for j, w in enumerate(v):
        if not isinstance(w, str) or not w.strip():
            raise FormatError(f"{where}: '{key}'[{j}] must be a non-empty string, got {w!r}")
    return tuple(v)


def read_amber_annotations(path: str | os.PathLike) -> dict[int, AmberAnnotation]:
    """Read AMBER's ``annotations.json`` into a dict by query id (file order kept).

    Entries are keyed by their ``id``, so a subset or a reordered file reads the same (the
    official script instead indexes entry ``id - 1``). Errors name the file and the entry: an
    unknown ``type`` (the accepted ones are :data:`AMBER_TYPES`), a generative entry without
    string lists ``truth`` and ``hallu``, a yes/no entry whose ``truth`` is not "yes"/"no",
    a repeated id; an empty list.
    """
    path = Path(path)
    out: dict[int, AmberAnnotation] = {}
    seen: dict[int, int] = {}
    for i, entry in enumerate(_amber_entries(path, "AMBER annotation")):
        qid, where = _amber_id(entry, i, path, seen)
        typ = _need_str(entry, "type", where)
        if typ not in AMBER_TYPES:
            raise FormatError(f"{where}: unknown type {typ!r} (known: {', '.join(AMBER_TYPES)})")
        dimension, subtype = AMBER_TYPES[typ]
        if dimension is None:
            truth = _word_list(entry, "truth", where)
            hallu = _word_list(entry, "hallu", where)
            label = None
            known = ("id", "type", "truth", "hallu")
        else:
            if "truth" not in entry:
                raise FormatError(f"{where}: missing field 'truth'")
            truth, hallu = (), ()
            label = _yes_no(entry["truth"], "truth", where)
            known = ("id", "type", "truth")
        meta = {k: v for k, v in entry.items() if k not in known}
        out[qid] = AmberAnnotation(qid, typ, dimension, subtype, truth, hallu, label, meta)
    return out


def read_amber_relation(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """Read AMBER's ``relation.json``: object word -> the words associated with it (as written)."""
    path = Path(path)
    obj = _load_json(path, "AMBER relation")
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: the top level must be an object word -> list of words, "
                          f"got {_type_name(obj)}")
    out: dict[str, tuple[str, ...]] = {}
    for word in obj:
        out[word] = _word_list(obj, word, str(path))
    return out


def read_amber_safe_words(path: str | os.PathLike) -> tuple[str, ...]:
    """Read AMBER's ``safe_words.txt``: one word per line, in file order (blank lines skipped,
    white space around a word removed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such AMBER safe-words file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return tuple(w.strip() for w in lines if w.strip())
