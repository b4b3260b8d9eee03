"""Typed record schemas and validating JSONL readers.

Field names follow the TRL / Hugging Face datasets conventions for vision data, so a user can
bring records from there unchanged:

* SFT (``SFTRecord``): ``{"images": [...], "messages": [{"role": ..., "content": ...}, ...]}``
  — TRL's conversational vision format, where ``content`` is a string or a list of parts
  ``{"type": "image"}`` / ``{"type": "text", "text": ...}``; one image part per entry of ``images``.
* Preference pairs (``PreferenceRecord``): ``{"images", "prompt", "chosen", "rejected"}`` with
  optional ``score_chosen`` / ``score_rejected`` (the UltraFeedback/TRL names). ``prompt`` is a
  list of messages or a string; ``chosen``/``rejected`` are a list holding one assistant message,
  or a string.
* Annotated responses (``AnnotatedResponse``): one sampled response to an (image, prompt) with
  whatever feedback a later stage attached under ``annotations``.

Image paths in records are relative to a *data root* (by default the folder of the JSONL file).
Readers refuse paths that escape that root, so a record can never make a stage read
``/etc/passwd`` or ``../../secret.png``.

Every problem is reported as a :class:`RecordError` naming ``file:line`` and what is wrong. With
``on_error="skip"`` bad lines are written, with the reason, to a rejects file instead and counted,
so nothing is lost silently.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from mmalign.stage import atomic_write_jsonl
from mmalign.world import Scene

ROLES = ("system", "user", "assistant")
# Pillow's own guard stops at ~179M pixels; a 64-megapixel cap is already far beyond any VLM input
# and stops decompression bombs early.
MAX_IMAGE_PIXELS = 64_000_000
# Longest response text accepted by default: ~5k tokens, far beyond any answer the methods train
# on; longer ones are runaway generations or concatenation bugs upstream.
MAX_RESPONSE_CHARS = 20_000


class RecordError(ValueError):
    """A record is malformed; the message starts with ``file:line`` (or ``file:line id=...``)."""


# --------------------------------------------------------------------------------------------
# messages


def where(meta: Any, record_id: Any = None, default: str = "<record>") -> str:
    """How an error names a record: ``<file>:<line> id=<id>`` from its ``meta`` (``source``, set by
    :func:`read_records`, and ``id``), or whichever of the two is known, or ``default``.

    ``record_id`` overrides ``meta["id"]`` (records carry their id outside ``meta``); an id that
    the source already contains is not repeated."""
    meta = meta if isinstance(meta, dict) else {}
    src = meta.get("source")
    rid = record_id if record_id is not None else meta.get("id")
    if src and rid is not None and str(rid) not in str(src):
        return f"{src} id={rid}"
    return str(src or rid or default)


def _check_content(content: Any, where: str) -> int:
    """Validate one message's ``content``; return how many image parts it holds."""
    if isinstance(content, str):
        return 0
    if not isinstance(content, list):
        raise RecordError(f"{where}: message content must be a string or a list of parts, got {type(content).__name__}")
    n_images = 0
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise RecordError(f"{where}: content part {j} must be an object with a 'type'")
        if part["type"] == "image":
            n_images += 1
        elif part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise RecordError(f"{where}: text part {j} has no string 'text'")
        else:
            raise RecordError(f"{where}: content part {j} has unsupported type {part['type']!r} (image or text)")
    return n_images


def check_messages(messages: Any, where: str) -> int:
    """Validate a list of chat messages; return the number of image parts."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: messages must be a non-empty list")
    n_images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"{where}: message {i} must be an object")
        if m.get("role") not in ROLES:
            raise RecordError(f"{where}: message {i} has role {m.get('role')!r}; expected one of {ROLES}")
        if "content" not in m:
            raise RecordError(f"{where}: message {i} has no 'content'")
        n_images += _check_content(m["content"], f"{where}: message {i}")
    return n_images


def message_text(message: dict) -> str:
    """The text of one message, image parts dropped."""
    c = message["content"]
    if isinstance(c, str):
        return c
    return "".join(p["text"] for p in c if p["type"] == "text")


def as_messages(value: Any, role: str) -> list[dict]:
    """Normalise a TRL prompt/completion field (string or message list) to a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": [{"type": "text", "text": value}]}]
    return value


def _check_images(images: Any, n_parts: int, where: str) -> list[str]:
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise RecordError(f"{where}: 'images' must be a list of path strings")
    if n_parts != len(images):
        raise RecordError(
            f"{where}: {len(images)} image path(s) but {n_parts} {{'type': 'image'}} part(s) in the messages; "
            "they must match one to one"
        )
    return images


def _check_text(value: Any, name: str, where: str, max_chars: int | None) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{where}: '{name}' is empty")
    if max_chars is not None and len(value) > max_chars:
        raise RecordError(f"{where}: '{name}' has {len(value)} characters, over the limit of {max_chars}")
    return value


def _record_id(obj: dict, where: str) -> str:
    """The record's ``id`` (a string or an integer); without one, ``where`` stands in for it.
    Objects, lists or booleans as ids would print as Python reprs and never match across files."""
    if "id" not in obj:
        return where
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise RecordError(f"{where}: 'id' must be a non-empty string or an integer, got {type(rid).__name__} {rid!r}")
    return str(rid)


def _check_score(value: Any, name: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{where}: '{name}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RecordError(f"{where}: '{name}' is {value} (NaN/inf scores are not allowed)")
    return float(value)


# --------------------------------------------------------------------------------------------
# schemas


@dataclass
class SFTRecord:
    """Visual instruction tuning example: images + a conversation (loss on assistant turns)."""

    id: str
    images: list[str]
    messages: list[dict]
    meta: dict = field(default_factory=dict)

    kind: ClassVar[str] = "sft"

    @classmethod
    def from_json(cls, obj: dict, where: str, max_chars: int | None = None) -> SFTRecord:
        if "messages" not in obj:
            raise RecordError(f"{where}: missing field 'messages'")
        n = check_messages(obj["messages"], where)
        if obj["messages"][-1]["role"] != "assistant":
            raise RecordError(f"{where}: the last message must be the assistant's (the training target)")
        for i, m in enumerate(obj["messages"]):
            if m["role"] == "assistant":
                _check_text(message_text(m), f"messages[{i}] text", where, max_chars)
        images = _check_images(obj.get("images", []), n, where)
        known = {"id", "images", "messages"}
        return cls(id=_record_id(obj, where), images=images, messages=obj["messages"],
                   meta={k: v for k, v in obj.items() if k not in known})

    def to_json(self) -> dict:
        return {"id": self.id, "images": self.images, "messages": self.messages, **self.meta}


@dataclass
class PreferenceRecord:
    """A preference pair for one (images, prompt): ``chosen`` is preferred over ``rejected``.

    ``rejected_images`` (optional; Re-Align's dual preference): images that look like ``images``
    but do not show the same thing; with them, ``chosen`` under ``images`` is also preferred over
    ``chosen`` under ``rejected_images``. Same count as ``images``, resolved and checked alike."""

    id: str
    images: list[str]
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    score_chosen: float | None = None
    score_rejected: float | None = None
    meta: dict = field(default_factory=dict)
    rejected_images: list[str] = field(default_factory=list)

    kind: ClassVar[str] = "preference"

    @classmethod
    def from_json(cls, obj: dict, where: str, max_chars: int | None = None) -> PreferenceRecord:
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise RecordError(f"{where}: missing field '{key}'")
        prompt = as_messages(obj["prompt"], "user")
        n = check_messages(prompt, where + " prompt")
        completions = {}
        for key in ("chosen", "rejected"):
            msgs = as_messages(obj[key], "assistant")
            check_messages(msgs, f"{where} {key}")
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                raise RecordError(f"{where}: '{key}' must be one assistant message")
            _check_text(message_text(msgs[0]), key, where, max_chars)
            completions[key] = msgs
        images = _check_images(obj.get("images", []), n, where)
        rejected_images = []
        if obj.get("rejected_images") is not None:
            rejected_images = _check_images(obj["rejected_images"], n, where + " rejected_images")
        known = {"id", "images", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "rejected_images"}
        return cls(
            id=_record_id(obj, where), images=images, prompt=prompt,
            chosen=completions["chosen"], rejected=completions["rejected"],
            score_chosen=_check_score(obj.get("score_chosen"), "score_chosen", where),
            score_rejected=_check_score(obj.get("score_rejected"), "score_rejected", where),
            meta={k: v for k, v in obj.items() if k not in known},
            rejected_images=rejected_images,
        )

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "meta" and v is not None}
        if not self.rejected_images:
            del d["rejected_images"]
        return {**d, **self.meta}


@dataclass
class AnnotatedResponse:
    """A response sampled for (images, prompt), with the feedback stages' annotations."""

    id: str
    images: list[str]
    prompt: list[dict]
    response: str
    annotations: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    kind: ClassVar[str] = "annotated"

    @classmethod
    def from_json(cls, obj: dict, where: str, max_chars: int | None = None) -> AnnotatedResponse:
        if "prompt" not in obj or "response" not in obj:
            raise RecordError(f"{where}: missing field 'prompt' or 'response'")
        prompt = as_messages(obj["prompt"], "user")
        n = check_messages(prompt, where + " prompt")
        response = _check_text(obj["response"], "response", where, max_chars)
        annotations = obj.get("annotations", {})
        if not isinstance(annotations, dict):
            raise RecordError(f"{where}: 'annotations' must be an object")
        images = _check_images(obj.get("images", []), n, where)
        known = {"id", "images", "prompt", "response", "annotations"}
        return cls(id=_record_id(obj, where), images=images, prompt=prompt, response=response,
                   annotations=annotations, meta={k: v for k, v in obj.items() if k not in known})

    def to_json(self) -> dict:
        return {"id": self.id, "images": self.images, "prompt": self.prompt, "response": self.response,
                "annotations": self.annotations, **self.meta}


SCHEMAS = {c.kind: c for c in (SFTRecord, PreferenceRecord, AnnotatedResponse)}


# --------------------------------------------------------------------------------------------
# paths and images


def resolve_image_path(rel: str, root: str | os.PathLike, where: str) -> Path:
    """Resolve ``rel`` under ``root``; refuse anything that lands outside it (``..``, absolute
    paths elsewhere, symlinks pointing out) or that is no usable path at all (a NUL byte, a
    name too long for the file system)."""
    try:
        root_real = Path(root).resolve()
        p = Path(rel)
        full = (p if p.is_absolute() else root_real / p).resolve()
    except (OSError, ValueError) as e:  # ValueError: embedded NUL byte; OSError: ENAMETOOLONG, ELOOP
        raise RecordError(f"{where}: image path {rel!r} is not a usable path ({e})") from None
    if full != root_real and root_real not in full.parents:
        raise RecordError(f"{where}: image path {rel!r} escapes the data root {str(root_real)!r}")
    return full


def image_exists(full: Path) -> bool:
    """``full.is_file()``, False (not an exception) for names the file system refuses."""
    try:
        return full.is_file()
    except (OSError, ValueError):  # Path.is_file only swallows ENOENT-like errors, not ENAMETOOLONG
        return False


# What a corrupt or truncated file can make Pillow's decoders raise besides OSError: the PNG
# plugin raises SyntaxError on bad chunks, some readers EOFError, struct.error or zlib.error.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


def load_image(path: str | os.PathLike, where: str = "") -> Image.Image:
    """Open and fully decode an image as RGB; missing, corrupt, truncated or oversized files
    (decompression bombs) raise :class:`RecordError` naming ``where`` and the path."""
    prefix = f"{where}: " if where else ""
    try:
        with warnings.catch_warnings():
            # Pillow warns between its own limit (Image.MAX_IMAGE_PIXELS, ~89M) and twice it;
            # our cap is lower and checked below from the header alone, so the warning says
            # nothing new, and under ``-W error`` it would escape as a non-RecordError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise RecordError(f"{prefix}image {path} is {w}x{h} px, over the {MAX_IMAGE_PIXELS:,}-pixel "
                                      "limit (a decompression bomb?)")
                return im.convert("RGB")  # convert() forces a full decode, so truncation shows here
    except RecordError:
        raise
    except FileNotFoundError:
        raise RecordError(f"{prefix}image {path} does not exist") from None
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: refused in Image.open
        raise RecordError(f"{prefix}image {path} is over the pixel limit (a decompression bomb?): {e}") from None
    except _DECODE_ERRORS as e:
        raise RecordError(f"{prefix}image {path} cannot be read: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# readers


@dataclass
class ReadReport:
    path: str
    read: int = 0
    rejected: int = 0
    rejects_path: str | None = None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line_number, parsed_or_None, error_or_None)`` for each non-blank line.

    Lines are decoded one by one, so a line that is not UTF-8 is an error at its own line (not a
    UnicodeDecodeError for the whole file); a UTF-8 byte-order mark on line 1 is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON ({e.msg} at column {e.colno})"
            except RecursionError:  # e.g. 100k nested brackets
                yield lineno, None, "malformed JSON (nested too deeply)"


def read_records(
    path: str | os.PathLike,
    kind: Literal["sft", "preference", "annotated"] = "sft",
    data_root: str | os.PathLike | None = None,
    check_images: Literal["none", "exists", "decode"] = "exists",
    on_error: Literal["raise", "skip"] = "raise",
    rejects_path: str | os.PathLike | None = None,
    max_chars: int | None = MAX_RESPONSE_CHARS,
    report: ReadReport | None = None,
) -> list:
    """Read and validate a JSONL file of records of schema ``kind``.

    Args:
        path: the JSONL file.
        kind: which schema each line must satisfy.
        data_root: folder image paths are relative to (default: the file's folder). Paths that
            escape it are errors.
        check_images: "exists" checks every image file is there (cheap); "decode" also decodes
            it (finds corrupt/truncated files up front); "none" skips the check.
        on_error: "raise" stops at the first bad line; "skip" writes it with its reason to
            ``rejects_path`` (default ``<path>.rejects.jsonl``) and goes on.
        max_chars: longest response text accepted (over-long responses are errors).
        report: filled in with counts when given.

    Returns the records with ``images`` rewritten to absolute, checked paths.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such record file")
    root = Path(data_root) if data_root is not None else path.parent
    schema = SCHEMAS[kind]
    rep = report if report is not None else ReadReport(str(path))
    rep.path = str(path)
    out, rejects, seen = [], [], {}
    for lineno, obj, err in iter_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            if err:
                raise RecordError(f"{where}: {err}")
            if not isinstance(obj, dict):
                raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
            rec = schema.from_json(obj, where, max_chars=max_chars)
            if "id" in obj:
                if rec.id in seen:
                    raise RecordError(f"{where}: duplicate id {rec.id!r} (first at line {seen[rec.id]})")
                seen[rec.id] = lineno
            for attr in ("images", "rejected_images"):
                resolved = []
                for rel in getattr(rec, attr, ()):
                    full = resolve_image_path(rel, root, where)
                    if check_images != "none" and not image_exists(full):
                        raise RecordError(f"{where}: image {rel!r} not found under {root}")
                    if check_images == "decode":
                        load_image(full, where)
                    resolved.append(str(full))
                if hasattr(rec, attr):
                    setattr(rec, attr, resolved)
            rec.meta.setdefault("source", where)
            out.append(rec)
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"line": lineno, "error": str(e), "record": obj})
    rep.read = len(out)
    rep.rejected = len(rejects)
    if rejects:
        rp = Path(rejects_path) if rejects_path else path.with_suffix(path.suffix + ".rejects.jsonl")
        atomic_write_jsonl(rp, rejects)
        rep.rejects_path = str(rp)
    return out


def _check_scene(d: Any, where: str) -> tuple[Scene, str]:
    if not isinstance(d, dict):
        raise RecordError(f"{where}: a scene record must be a JSON object, got {type(d).__name__}")
    for key in ("objects", "image"):
        if key not in d:
            raise RecordError(f"{where}: not a scene record: missing field {key!r}")
    if not isinstance(d["image"], str) or not d["image"].strip():
        raise RecordError(f"{where}: not a scene record: 'image' must be a path string, got {d['image']!r}")
    if not isinstance(d["objects"], list):
        raise RecordError(f"{where}: not a scene record: 'objects' must be a list, got {type(d['objects']).__name__}")
    for i, o in enumerate(d["objects"]):
        if not isinstance(o, dict):
            raise RecordError(f"{where}: not a scene record: object {i} must be an object, got {type(o).__name__}")
        for k in ("shape", "color", "size"):
            if k in o and not isinstance(o[k], str):
                raise RecordError(f"{where}: not a scene record: object {i} '{k}' must be a string, got {o[k]!r}")
        for k in ("x", "y"):
            v = o.get(k)
            if k in o and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise RecordError(f"{where}: not a scene record: object {i} '{k}' must be a finite number, got {v!r}")
    try:
        return Scene.from_dict(d), d["image"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{where}: not a scene record: {e}") from None


def read_scenes(path: str | os.PathLike) -> list[tuple[Scene, str]]:
    """The data stage's ``<split>/scenes.jsonl``: ``(scene graph, image path relative to the data
    root)`` per line; a line that is not a scene record is a :class:`RecordError` at ``file:line``
    (scene graphs are ground truth: a bad one is never skipped)."""
    path = Path(path)
    out = []
    for lineno, d, err in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if err:
            raise RecordError(f"{where}: not a scene record: {err}")
        out.append(_check_scene(d, where))
    return out
