"""Bad input, every reader: a clear error naming file and line (or record id), or a reject that is
written down and counted -- never a silent drop.

The suite is a matrix: READERS (each reader or stage that takes external or upstream records)
x CLASSES (each kind of bad input). A reader's adapter says how to make a good record, how to
break it for each class that applies to it, and how to run it in each ``on_error`` mode it
has. Every cell writes a file whose line 1 and 4 are good and line 3 is bad (line 2 blank), then:

* ``raise`` mode: the reader raises, and the message names ``<file>:3`` (or the record id
  where a reader has no lines, e.g. the index's scene listing);
* ``skip`` mode: the bad line is in the rejects file (with line 3 and a reason), the count the
  reader reports is 1, and both good records come through.

Classes that do not apply to a reader are absent from its ``applies`` (docs/FAULTS.md says
why, e.g. a stage that only checks images exist is not where a corrupt image is found: the
training DataModule is, and has its own row). Readers in files this suite's author does not own
carry ``xfail`` cells whose reason names the fix.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmalign import world as W
from mmalign.records import RecordError

# --------------------------------------------------------------------------------------------
# images

BAD_LINE = 3  # line 1 good, line 2 blank, line 3 bad, line 4 good


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels with almost no data: what a
    decompression bomb looks like to a reader that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_images(root: Path) -> dict[str, str]:
    """The image files of the image classes under ``root`` (plus ``outside/`` next to it);
    returns class -> the path string a record would hold."""
    root.mkdir(parents=True, exist_ok=True)
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(outside / "o.png")
    for i in range(3):  # distinct good images, for readers that refuse one image listed twice
        Image.new("RGB", (8, 8), (0, 80 * i, 0)).save(root / f"g{i}.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(root / "full.png")
    noise.save(root / "full.jpg", quality=90)
    (root / "trunc.png").write_bytes((root / "full.png").read_bytes()[:2000])
    (root / "trunc.jpg").write_bytes((root / "full.jpg").read_bytes()[:1500])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage, not chunks")
    (root / "bomb.png").write_bytes(png_claiming(9000, 9000))            # 81M px: over our 64M cap only
    (root / "bomb_warn.png").write_bytes(png_claiming(10000, 10000))     # 100M: Pillow warns (> ~89M)
    (root / "bomb_pil.png").write_bytes(png_claiming(20000, 20000))      # 400M: Pillow refuses (> ~179M)
    link = root / "link.png"
    if not link.exists():
        link.symlink_to(outside / "o.png")
    return {
        "image_missing": "missing.png",
        "image_corrupt": "corrupt.png",
        "image_truncated_png": "trunc.png",
        "image_truncated_jpeg": "trunc.jpg",
        "image_bomb": "bomb.png",
        "image_bomb_pil_warning": "bomb_warn.png",
        "image_bomb_pil_error": "bomb_pil.png",
        "escape_dotdot": "../outside/o.png",
        "escape_absolute": str((outside / "o.png").resolve()),
        "escape_symlink": "link.png",
    }


TEXT_CLASSES = ("malformed_json", "not_object", "non_utf8", "missing_field", "wrong_type", "bad_id_type",
                "empty_text", "overlong_text", "nan_score", "inf_score", "duplicate_id")
DECODE_CLASSES = ("image_corrupt", "image_truncated_png", "image_truncated_jpeg", "image_bomb",
                  "image_bomb_pil_warning", "image_bomb_pil_error")
PATH_CLASSES = ("image_missing", "escape_dotdot", "escape_absolute", "escape_symlink")
CLASSES = TEXT_CLASSES + PATH_CLASSES + DECODE_CLASSES
#: What the error (or the reject's reason) must say, besides the place.
NEEDLES = {
    "malformed_json": "malformed JSON", "not_object": "object", "non_utf8": "UTF-8",
    "missing_field": "missing", "wrong_type": "must be", "bad_id_type": "'id'", "empty_text": "empty",
    "overlong_text": "over the limit", "nan_score": "nan", "inf_score": "inf", "duplicate_id": "duplicate",
    "image_missing": "not", "escape_dotdot": "escapes", "escape_absolute": "escapes", "escape_symlink": "escapes",
    "image_corrupt": "cannot be read", "image_truncated_png": "cannot be read",
    "image_truncated_jpeg": "cannot be read", "image_bomb": "pixel limit", "image_bomb_pil_warning": "pixel limit",
    "image_bomb_pil_error": "pixel limit",
}
OVERLONG = "x" * 20_001  # MAX_RESPONSE_CHARS + 1


# --------------------------------------------------------------------------------------------
# adapters


@dataclass
class Outcome:
    error: str | None = None                           # raise mode: the message
    rejects: list[dict] = field(default_factory=list)  # skip mode: the rejects file's entries
    count: int | None = None                           # skip mode: the count the reader reported
    kept: int | None = None                            # skip mode: good records that came through


def _prompt(q: str = "What is shown?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def f(rec: dict) -> None:
        d = rec
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


@dataclass
class Reader:
    """How to feed one reader. ``text``/``score``/``image`` are key paths into a good record;
    ``run(tmp, root, file, mode)`` runs the reader on ``file`` and returns an :class:`Outcome`."""

    name: str
    good: Callable[[int, str], dict]
    run: Callable[[Path, Path, Path, str], Outcome]
    file: str = "in.jsonl"
    modes: tuple[str, ...] = ("raise", "skip")
    applies: tuple[str, ...] = CLASSES
    required: str = ""
    wrong_type: tuple[tuple, Any] = ((), None)
    text: tuple | None = None
    score: tuple | None = None
    image: tuple | None = None
    #: classes that stay errors even in skip mode, with why
    always_error: tuple[str, ...] = ()
    #: what names the bad record when it is not ``file:3``
    locator: Callable[[Path], str] | None = None
    xfail: dict[str, str] = field(default_factory=dict)
    #: this reader's wording where it differs from NEEDLES
    needles: dict[str, str] = field(default_factory=dict)
    #: how record 2 repeats record 0's identity (default: the same ``id``)
    dup: Callable[[dict], None] | None = None


def bad_line(r: Reader, klass: str, images: dict[str, str]) -> bytes:
    """Line 3 of a cell: the good record 2 broken as ``klass`` says (record 0's id for duplicates)."""
    if klass == "malformed_json":
        return b'{"id": "x", "oops'
    if klass == "not_object":
        return b"[1, 2, 3]"
    if klass == "non_utf8":
        return b'{"id": "\xff\xfe bad bytes"}'
    rec = r.good(2, "a.png")
    if klass == "missing_field":
        del rec[r.required]
    elif klass == "wrong_type":
        _set(*r.wrong_type)(rec)
    elif klass == "bad_id_type":
        rec["id"] = {"nested": "object"}
    elif klass == "empty_text":
        _set(r.text, "   ")(rec)
    elif klass == "overlong_text":
        _set(r.text, OVERLONG)(rec)
    elif klass in ("nan_score", "inf_score"):
        _set(r.score, float("nan") if klass == "nan_score" else float("inf"))(rec)
    elif klass == "duplicate_id":
        if r.dup:
            r.dup(rec)
        else:
            rec["id"] = r.good(0, "a.png")["id"]
    else:
        _set(r.image, images[klass])(rec)
    return json.dumps(rec).encode()


def write_cell(path: Path, r: Reader, klass: str, images: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r.good(0, "a.png")).encode(), b"", bad_line(r, klass, images),
             json.dumps(r.good(1, "a.png")).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _err(fn: Callable[[], Any]) -> Outcome:
    with pytest.raises(RecordError) as e:
        fn()
    return Outcome(error=str(e.value))


# -- mmalign.records.read_records (sft / preference / annotated) -----------------------------


def _sft(i: int, img: str) -> dict:
    return {"id": f"r{i}", "images": [img], "messages": [*_prompt(f"Question {i}?"),
            {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}], "task": "short_caption"}


def _pref(i: int, img: str) -> dict:
    return {"id": f"p{i}", "images": [img], "prompt": _prompt(), "chosen": "A red circle.",
            "rejected": "A blue star.", "score_chosen": 9.0, "score_rejected": 2.0}


def _annotated(i: int, img: str) -> dict:
    return {"id": f"a{i}", "images": [img], "prompt": _prompt(), "response": "A red circle.",
            "annotations": {"source": "oracle", "id": f"a{i}", "scores": {"faithfulness": 0.5},
                            "critique": "fine", "refinement": None}, "source_id": f"q{i}"}


def _run_read_records(kind: str, check: str = "decode"):
    def run(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
        from mmalign.records import ReadReport, read_records

        if mode == "raise":
            return _err(lambda: read_records(f, kind, data_root=root, check_images=check))
        rep = ReadReport(str(f))
        recs = read_records(f, kind, data_root=root, check_images=check, on_error="skip", report=rep)
        rejects = [json.loads(x) for x in Path(rep.rejects_path).read_text().splitlines()] if rep.rejects_path else []
        return Outcome(rejects=rejects, count=rep.rejected, kept=len(recs))
    return run


def _run_chat_dataset(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    """The training DataModules' datasets decode images lazily (check_images="exists" by
    default): a corrupt image is found there, and the error names the record's file:line."""
    from mmalign.data import ChatDataset
    from mmalign.records import read_records

    ds = ChatDataset(read_records(f, "sft", data_root=root, check_images="exists"))
    return _err(lambda: [ds[i] for i in range(len(ds))])


# -- data_pipelines.prefs (and nlf, which reads through prefs.read_feedback) ------------------


def _stage_folder(folder: Path) -> None:
    (folder / "manifest.json").write_text("{}\n")  # a complete (hand-made) stage output


def _run_prefs(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines import prefs as P
    from mmalign.feedback_io import ScoreError

    _stage_folder(root)
    out = tmp / "prefs-out"
    argv = ["--feedback", str(f), "--data", str(root), "--out", str(out), "--inject-per-prompt", "0",
            "--weights", "faithfulness=1", "--on-error", mode]
    if mode == "raise":
        with pytest.raises((RecordError, ScoreError)) as e:
            P.main(argv)
        return Outcome(error=str(e.value))
    try:
        assert P.main(argv) == 0
    except ScoreError as e:  # NaN/inf: an error in skip mode too (see the prefs docstring)
        return Outcome(error=str(e))
    rep = json.loads((out / "report.json").read_text())
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return Outcome(rejects=rejects, count=rep["rejects"]["total"], kept=rep["prompts"]["total"])


# -- data_pipelines.realign_data.read_items ---------------------------------------------------

SCENE = W.Scene((W.SceneObject("circle", "red", "small", 0.2, 0.5),), scene_id="s0")


def _run_realign(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines.realign_data import read_items

    rejects: list[dict] = []
    stats: dict[str, Counter] = defaultdict(Counter)

    def call():
        return read_items(f, root, {"a.png": SCENE}, {"a.png"}, None, mode, rejects, stats)

    if mode == "raise":
        return _err(call)
    items = call()
    return Outcome(rejects=rejects, count=len(rejects), kept=len(items))


# -- data_pipelines.import_mmrlhf / import_dress ----------------------------------------------


def _mmrlhf(i: int, img: str) -> dict:
    return {"id": f"m{i}", "image": img, "question": f"What is shown {i}?", "video": None,
            "models_output": ["A red circle.", "A blue square."], "faithfulness": [3, 1], "helpfulness": [2, 1],
            "final_ranking": [1, 2]}


def _run_mmrlhf(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines.import_mmrlhf import run

    out = tmp / "mmrlhf-out"
    if mode == "raise":
        return _err(lambda: run(f, root, out, on_error="raise"))
    rep = run(f, root, out, on_error="skip")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return Outcome(rejects=rejects, count=rep["rejected"]["total"], kept=rep["prompts"]["total"])


def _dress(i: int, img: str) -> dict:
    return {"image_id": img, "caption": "a red circle", "interaction": [
        {"user": f"What is shown {i}?", "model": "A red circle.", "rating": 4, "critique NLF": "Correct."}]}


def _run_dress(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines.import_dress import run

    out = tmp / "dress-out"
    if mode == "raise":
        return _err(lambda: run([f], root, out, max_rating=5, on_error="raise"))
    rep = run([f], root, out, max_rating=5, on_error="skip")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return Outcome(rejects=rejects, count=rep["rejected"]["total"], kept=rep["lines"]["imported"])


# -- mmalign.records.read_scenes and the index stage's image listing --------------------------


def _scene(i: int, img: str) -> dict:
    return {**W.Scene((W.SceneObject("circle", "red", "small", 0.2, 0.5),), scene_id=f"s{i}").to_dict(),
            "image": img, "split": "train"}


def _index_scene(i: int, img: str) -> dict:
    return _scene(i, f"g{i}.png" if img == "a.png" else img)


def _run_read_scenes(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from mmalign.records import read_scenes

    return _err(lambda: read_scenes(f))


class _FakeEmbedder:
    name, dim = "fake", 3

    def embed(self, images):
        return np.ones((len(images), 3), dtype=np.float32)


def _run_index(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    """The index stage lists a split's scene images, checks they exist, then decodes them
    while embedding (``embed_items``); the embedder here is a stub, the listing and decoding real."""
    from data_pipelines.index import check_exist, embed_items, list_images

    def call():
        items = list_images(root, ["train"], [])
        check_exist(items)
        embed_items(_FakeEmbedder(), items, batch_size=2, progress=False)
    return _err(call)


# -- stages that read pairs / responses with read_records(on_error="raise") before any model --


def _run_ref_logps(tmp: Path, root: Path, f: Path, mode: str, capsys=None) -> Outcome:
    from data_pipelines.ref_logps import main

    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["--pairs", str(f), "--data-root", str(root), "--model", str(model), "--out", str(tmp / "out")])
    assert rc == 2
    return Outcome(error=err.getvalue())


def _run_score_rm(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines.score_rm import main

    rm = tmp / "rm"
    rm.mkdir(exist_ok=True)
    (rm / "reward_config.json").write_text(json.dumps({"mode": "scalar"}))
    return _err(lambda: main(["--pairs", str(f), "--data-root", str(root), "--rm", str(rm), "--out", str(tmp / "out")]))


def _run_fg_rm_eval(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines.fg_rm_eval import main
    from mmalign.rewards.fine_grained import CONFIG_FILE

    m = tmp / "fg"
    m.mkdir(exist_ok=True)
    (m / CONFIG_FILE).write_text("{}")  # never read: the input is checked before models load
    return _err(lambda: main(["--models", f"object={m}", "--feedback", str(f), "--data-root", str(root),
                              "--out", str(tmp / "out"), "--no-progress"]))


# -- readers in files owned by others ---------------------------------------------------------


def _run_sample_prompts(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from data_pipelines.sample import prompts_from

    return _err(lambda: prompts_from(root, "train", [], 0))


def _run_feedback_stage(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    """data_pipelines/feedback.py skips bad response lines into rejects.jsonl (always)."""
    from data_pipelines.feedback import main

    (root / "train").mkdir(exist_ok=True)
    (root / "train" / "scenes.jsonl").write_text(json.dumps(_scene(0, "a.png")) + "\n")
    _stage_folder(root)
    out = tmp / "fb-out"
    assert main(["--responses", str(f), "--data", str(root), "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    kept = sum(1 for x in (out / "feedback.jsonl").read_text().splitlines() if x.strip())
    return Outcome(rejects=rejects, count=manifest.get("counts", {}).get("rejected"), kept=kept)


def _pope(i: int, img: str) -> dict:
    return {"question_id": i, "image": img, "text": "Is there a circle in the image?", "label": "yes"}


def _run_pope(tmp: Path, root: Path, f: Path, mode: str) -> Outcome:
    from mmalign.eval.formats import read_pope_questions

    return _err(lambda: read_pope_questions(f, image_root=root))


RAISE = ("raise",)
PREF_PATHS = {"required": "chosen", "wrong_type": (("chosen",), 42), "text": ("chosen",), "score": ("score_chosen",),
                  "image": ("images", 0)}
ANN_PATHS = {"required": "response", "wrong_type": (("annotations",), "not an object"), "text": ("response",),
                 "score": ("annotations", "scores", "faithfulness"), "image": ("images", 0)}
SFT_PATHS = {"required": "messages", "wrong_type": (("messages",), "hello"),
                 "text": ("messages", 1, "content", 0, "text"), "image": ("images", 0)}
NO_SCORE = tuple(c for c in CLASSES if c not in ("nan_score", "inf_score"))
NOT_DECODED = tuple(c for c in CLASSES if c not in DECODE_CLASSES)
READERS = [
    Reader("records.sft", _sft, _run_read_records("sft"), applies=NO_SCORE, **SFT_PATHS),
    Reader("records.preference", _pref, _run_read_records("preference"), **PREF_PATHS),
    Reader("records.annotated", _annotated, _run_read_records("annotated"),
           applies=NO_SCORE, **ANN_PATHS),
    Reader("data.ChatDataset", _sft, _run_chat_dataset, modes=RAISE, applies=DECODE_CLASSES, **SFT_PATHS),
    Reader("prefs", _annotated, _run_prefs, file="feedback.jsonl", applies=NOT_DECODED,
           always_error=("nan_score", "inf_score"), **ANN_PATHS),
    Reader("realign_data.read_items", _sft, _run_realign, applies=tuple(c for c in NO_SCORE if c not in DECODE_CLASSES),
           **SFT_PATHS),
    Reader("import_mmrlhf", _mmrlhf, _run_mmrlhf, file="data.jsonl", required="question",
           wrong_type=(("models_output",), "one string"), text=("models_output", 0), score=("faithfulness", 0),
           image=("image",)),
    Reader("import_dress", _dress, _run_dress, file="hallucination_nlf.jsonl", required="interaction",
           wrong_type=(("interaction",), "one string"), text=("interaction", 0, "model"),
           score=("interaction", 0, "rating"), image=("image_id",),
           # ids are <dimension>-<line>: a line has no id of its own to repeat
           applies=tuple(c for c in CLASSES if c not in ("duplicate_id", "bad_id_type"))),
    Reader("records.read_scenes", _scene, _run_read_scenes, file="train/scenes.jsonl", modes=RAISE,
           applies=("malformed_json", "not_object", "non_utf8", "missing_field", "wrong_type", "nan_score",
                    "inf_score"),
           required="objects", wrong_type=(("objects", 0, "x"), "left"), score=("objects", 0, "x")),
    Reader("index", _index_scene, _run_index, dup=_set(("image",), "g0.png"), needles={"duplicate_id": "listed twice", "image_missing": "missing"}, file="train/scenes.jsonl", modes=RAISE,
           applies=PATH_CLASSES + DECODE_CLASSES + ("duplicate_id",),
           image=("image",), locator=lambda f: f"{f} scene s2"),
    Reader("ref_logps", _pref, _run_ref_logps, modes=RAISE, applies=NOT_DECODED, **PREF_PATHS),
    Reader("score_rm", _pref, _run_score_rm, modes=RAISE, applies=NOT_DECODED, **PREF_PATHS),
    Reader("fg_rm_eval", _annotated, _run_fg_rm_eval, modes=RAISE,
           applies=tuple(c for c in NOT_DECODED if c not in ("nan_score", "inf_score")), **ANN_PATHS),
    Reader("sample.prompts_from", _sft, _run_sample_prompts, file="train/sft.jsonl", modes=RAISE,
           applies=tuple(c for c in NO_SCORE if c not in DECODE_CLASSES), **SFT_PATHS),
    Reader("feedback_stage", _annotated, _run_feedback_stage, file="responses.jsonl", modes=("skip",),
           applies=("malformed_json", "missing_field", "duplicate_id", "escape_dotdot", "image_missing"), **ANN_PATHS),
    Reader("eval.read_pope_questions", _pope, _run_pope, modes=RAISE, dup=_set(("question_id",), 0),
           applies=("malformed_json", "not_object", "non_utf8", "missing_field", "wrong_type", "duplicate_id",
                    "image_missing", "escape_dotdot", "escape_absolute", "escape_symlink"),
           required="label", wrong_type=(("question_id",), [1]), image=("image",)),
]


def _cells():
    for r in READERS:
        for klass in r.applies:
            for mode in r.modes:
                marks = [pytest.mark.xfail(reason=r.xfail[klass], strict=True)] if klass in r.xfail else []
                yield pytest.param(r, klass, mode, id=f"{r.name}-{klass}-{mode}", marks=marks)


@pytest.mark.parametrize("reader,klass,mode", list(_cells()))
def test_bad_input_cell(tmp_path, reader: Reader, klass: str, mode: str):
    root = tmp_path / "root"
    images = make_images(root)
    f = write_cell(root / reader.file, reader, klass, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # must not leak out of a reader
        got = reader.run(tmp_path, root, f, mode)
    needle = reader.needles.get(klass, NEEDLES[klass])
    if mode == "raise" or klass in reader.always_error:
        assert got.error is not None, "no error raised"
        place = reader.locator(f) if reader.locator else f"{f}:{BAD_LINE}"
        assert place in got.error, f"the error does not name {place}: {got.error}"
        assert needle.lower() in got.error.lower(), got.error
        return
    assert got.count == 1, f"reported reject count {got.count}, expected 1"
    assert len(got.rejects) == 1, got.rejects
    (rej,) = got.rejects
    assert rej.get("line") == BAD_LINE or f"{f}:{BAD_LINE}" in str(rej.get("where", "")), rej
    assert needle.lower() in rej["error"].lower(), rej
    assert got.kept == 2, f"{got.kept} good records came through, expected 2"


def test_every_reader_has_cells():
    """Each reader in the matrix gets at least one image or text class; the docs table lists them."""
    assert all(r.applies for r in READERS)
    doc = Path(__file__).parents[1] / "docs" / "FAULTS.md"
    text = doc.read_text()
    missing = [r.name for r in READERS if f"`{r.name}`" not in text]
    assert not missing, f"docs/FAULTS.md has no row for {missing}"


# --------------------------------------------------------------------------------------------
# load_image on its own: Pillow's own decompression-bomb guard, under any warnings filter


@pytest.mark.parametrize("name", ["bomb.png", "bomb_warn.png", "bomb_pil.png"])
@pytest.mark.parametrize("filt", ["error", "default", "ignore"])
def test_decompression_bombs_are_record_errors_under_any_warning_filter(tmp_path, name, filt):
    from mmalign.records import load_image

    make_images(tmp_path / "root")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter(filt)
        with pytest.raises(RecordError, match=rf"^f\.jsonl:7: image .*{name} .*pixel limit"):
            load_image(tmp_path / "root" / name, "f.jsonl:7")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_bomb_over_pillow_limit_is_refused_even_when_our_cap_is_raised(tmp_path, monkeypatch):
    """With MAX_IMAGE_PIXELS raised above Pillow's, Pillow's own refusal still surfaces as a
    RecordError (not DecompressionBombError) naming the record."""
    from mmalign import records

    make_images(tmp_path / "root")
    monkeypatch.setattr(records, "MAX_IMAGE_PIXELS", 10**12)
    with pytest.raises(RecordError, match=r"x:1: image .*bomb_pil.png is over the pixel limit"):
        records.load_image(tmp_path / "root" / "bomb_pil.png", "x:1")


def test_non_utf8_and_bom_lines(tmp_path):
    """A UTF-8 BOM on line 1 is not an error (editors on Windows write it); a bad byte is, at its line."""
    from mmalign.records import read_records

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    f = tmp_path / "s.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(_sft(0, "a.png")).encode() + b"\n" + b"\xc3\x28\n")
    with pytest.raises(RecordError, match=rf"{f}:2: not valid UTF-8"):
        read_records(f, "sft")
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(_sft(0, "a.png")).encode() + b"\n")
    assert [r.id for r in read_records(f, "sft")] == ["r0"]


def test_deeply_nested_json_is_a_malformed_line(tmp_path):
    from mmalign.records import read_records

    f = tmp_path / "n.jsonl"
    f.write_text("[" * 200_000 + "\n")
    with pytest.raises(RecordError, match=rf"{f}:1: malformed JSON"):
        read_records(f, "sft")
