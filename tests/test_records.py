"""Record schemas and readers: round trips and every bad-input error names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmalign.records import (
    AnnotatedResponse,
    PreferenceRecord,
    RecordError,
    SFTRecord,
    load_image,
    read_records,
)


def sft_obj(img="a.png", answer="A red circle."):
    return {
        "id": "r1",
        "images": [img],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "task": "short_caption",
    }


def pref_obj(img="a.png"):
    return {
        "id": "p1",
        "images": [img],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}],
        "rejected": "A blue star.",
        "score_chosen": 9.0,
        "score_rejected": 2,
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    return tmp_path


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_round_trips(root):
    for kind, obj in (("sft", sft_obj()), ("preference", pref_obj())):
        f = write_lines(root / f"{kind}.jsonl", [obj])
        (rec,) = read_records(f, kind)
        assert rec.images == [str(root / "a.png")]
        again = type(rec).from_json(json.loads(json.dumps(rec.to_json())), "x")
        assert again.to_json() == rec.to_json()
    # a string 'rejected' is normalised to one assistant message
    (p,) = read_records(root / "preference.jsonl", "preference")
    assert p.rejected == [{"role": "assistant", "content": [{"type": "text", "text": "A blue star."}]}]
    assert p.score_rejected == 2.0
    a = AnnotatedResponse.from_json({"images": ["a.png"], "prompt": pref_obj()["prompt"], "response": "x",
                                     "annotations": {"objects": []}}, "f:1")
    assert a.to_json()["annotations"] == {"objects": []}


def test_unknown_fields_survive_in_meta(root):
    f = write_lines(root / "s.jsonl", [sft_obj()])
    (rec,) = read_records(f, "sft")
    assert rec.meta["task"] == "short_caption"
    assert rec.to_json()["task"] == "short_caption"


BAD_CASES = [
    ("{not json", "malformed JSON"),
    ([1, 2], "must be a JSON object"),
    ({**sft_obj(), "messages": []}, "non-empty list"),
    ({**sft_obj(), "messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({**sft_obj(), "images": []}, "0 image path(s) but 1"),
    ({**sft_obj(), "images": ["missing.png"]}, "not found"),
    ({**sft_obj(), "images": ["../outside.png"]}, "escapes the data root"),
    ({**sft_obj(), "images": ["/etc/passwd"]}, "escapes the data root"),
    (sft_obj(answer="   "), "is empty"),
    (sft_obj(answer="x" * 50), "over the limit"),
    ({k: v for k, v in pref_obj().items() if k != "chosen"}, "missing field 'chosen'"),
    ({**pref_obj(), "score_chosen": float("nan")}, "NaN/inf"),
    ({**pref_obj(), "score_chosen": "high"}, "must be a number"),
]


@pytest.mark.parametrize("bad,needle", BAD_CASES)
def test_bad_records_name_file_and_line(root, bad, needle):
    kind = "preference" if isinstance(bad, dict) and "prompt" in bad else "sft"
    good = sft_obj() if kind == "sft" else pref_obj()
    if isinstance(bad, dict):
        bad = {**bad, "id": "bad"}
    f = write_lines(root / "bad.jsonl", [good, "", bad])  # the bad record is on line 3
    with pytest.raises(RecordError) as e:
        read_records(f, kind, max_chars=40)
    assert str(e.value).startswith(f"{f}:3")
    assert needle in str(e.value)


def test_duplicate_ids(root):
    f = write_lines(root / "d.jsonl", [sft_obj(), sft_obj()])
    with pytest.raises(RecordError, match=r"d.jsonl:2: duplicate id 'r1' \(first at line 1\)"):
        read_records(f, "sft")


def test_skip_mode_writes_rejects_and_counts(root):
    from mmalign.records import ReadReport

    f = write_lines(root / "m.jsonl", [sft_obj(), "{oops", {**sft_obj(), "id": "r2", "images": ["nope.png"]}])
    rep = ReadReport(str(f))
    recs = read_records(f, "sft", on_error="skip", report=rep)
    assert [r.id for r in recs] == ["r1"] and rep.rejected == 2
    rejects = [json.loads(x) for x in Path(rep.rejects_path).read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3]
    assert "not found" in rejects[1]["error"]


def test_corrupt_and_truncated_images(root):
    (root / "corrupt.png").write_bytes(b"not a png at all")
    buf = (root / "a.png").read_bytes()
    big = Image.new("RGB", (64, 64))
    big.save(root / "full.png")
    (root / "trunc.png").write_bytes((root / "full.png").read_bytes()[:60])
    for name in ("corrupt.png", "trunc.png"):
        with pytest.raises(RecordError, match=f"{name} cannot be read"):
            load_image(root / name, "f.jsonl:7")
        f = write_lines(root / "c.jsonl", [sft_obj(img=name)])
        with pytest.raises(RecordError, match=r"c.jsonl:1: image .* cannot be read"):
            read_records(f, "sft", check_images="decode")
    assert buf  # the good image still loads
    assert load_image(root / "a.png").size == (8, 8)


def test_decompression_bomb_guard(root, monkeypatch):
    from mmalign import records

    monkeypatch.setattr(records, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(RecordError, match="over the 50-pixel limit"):
        load_image(root / "a.png", "x:1")


def test_symlink_out_of_root_is_refused(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (4, 4)).save(outside / "o.png")
    (root / "link.png").symlink_to(outside / "o.png")
    f = write_lines(root / "l.jsonl", [sft_obj(img="link.png")])
    with pytest.raises(RecordError, match="escapes the data root"):
        read_records(f, "sft")


texts = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(prompt=texts, answer=texts, extra=st.dictionaries(st.sampled_from(["task", "scene_id", "note"]), texts))
def test_sft_record_round_trip_property(prompt, answer, extra):
    obj = {"id": "x", "images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": answer}], **extra}
    rec = SFTRecord.from_json(json.loads(json.dumps(obj)), "f:1")
    assert rec.to_json() == obj


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "images", "messages", "prompt", "chosen", "rejected", "response",
                                        "score_chosen", "annotations"]), json_values))
def test_arbitrary_json_never_crashes_the_reader(value):
    """Whatever JSON a record holds, validation raises RecordError, never KeyError/TypeError."""
    for schema in (SFTRecord, PreferenceRecord, AnnotatedResponse):
        try:
            schema.from_json(value, "f:1")
        except RecordError:
            pass


def test_read_scenes_names_the_bad_line(world, tmp_path):
    from mmalign.records import read_scenes

    good = (world / "test" / "scenes.jsonl").read_text().splitlines()
    scenes = read_scenes(world / "test" / "scenes.jsonl")
    assert len(scenes) == len(good) and scenes[0][1].startswith("images/test/")
    bad = tmp_path / "scenes.jsonl"
    bad.write_text("\n".join([good[0], '{"scene_id": "x"}']) + "\n")
    with pytest.raises(RecordError, match=rf"{bad}:2: not a scene record"):
        read_scenes(bad)


# --------------------------------------------------------------------------------------------
# property tests over whole files: what reaches a reader from disk


import io
import re
import tempfile

from mmalign.records import MAX_RESPONSE_CHARS, read_scenes, resolve_image_path
from mmalign.stage import atomic_write_jsonl

KINDS = ("sft", "preference", "annotated")
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
# Records that are nearly right: the schema's keys with arbitrary values, so validation is
# exercised deep inside (a bare random dict fails at the first missing key).
near_records = st.fixed_dictionaries({}, optional={
    "id": any_json, "images": st.lists(st.sampled_from(["a.png", "../x.png", "", "/etc/passwd", "a\x00.png"]) | any_json,
                                       max_size=2),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]) | any_json,
                                                "content": st.text(max_size=5) | any_json}), max_size=3) | any_json,
    "prompt": st.text(max_size=5) | any_json, "chosen": st.text(max_size=5) | any_json,
    "rejected": st.text(max_size=5) | any_json, "response": st.text(max_size=5) | any_json,
    "score_chosen": st.floats() | any_json, "annotations": any_json})


def names_line_1(msg: str, f: Path) -> bool:
    """``<f>:1: ...`` or ``<f>:1 <part>: ...`` (e.g. ``x.jsonl:1 prompt: message 0 ...``)."""
    return re.match(rf"{re.escape(str(f))}:1[: ]", msg) is not None


def _one_line_file(folder: str, line: bytes) -> Path:
    Image.new("RGB", (4, 4)).save(Path(folder) / "a.png")
    f = Path(folder) / "x.jsonl"
    f.write_bytes(line + b"\n")
    return f


@settings(max_examples=150, deadline=None)
@given(value=any_json | near_records, kind=st.sampled_from(KINDS))
def test_any_json_line_parses_or_names_its_line(value, kind):
    """Any JSON-serialisable value on line 1 either parses into a valid record (which then
    round-trips) or raises RecordError starting ``file:1`` -- never KeyError/TypeError/..."""
    with tempfile.TemporaryDirectory() as d:
        f = _one_line_file(d, json.dumps(value).encode())
        try:
            (rec,) = read_records(f, kind)
        except RecordError as e:
            assert names_line_1(str(e), f), str(e)
            return
        again = type(rec).from_json(json.loads(json.dumps(rec.to_json())), "y")
        assert again.to_json() == rec.to_json()


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
       kind=st.sampled_from(KINDS))
def test_any_bytes_line_parses_or_names_its_line(raw, kind):
    """Arbitrary bytes (bad UTF-8, BOMs, control characters, NaN literals) are no exception."""
    raw = raw.replace(b"\n", b" ").replace(b"\r", b" ")
    with tempfile.TemporaryDirectory() as d:
        f = _one_line_file(d, raw)
        try:
            read_records(f, kind, on_error="raise")
        except RecordError as e:
            assert names_line_1(str(e), f), str(e)


unicode_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(lambda s: s.strip())
messages_content = st.one_of(unicode_text, st.lists(unicode_text.map(lambda t: {"type": "text", "text": t}),
                                                     min_size=1, max_size=2))


@st.composite
def valid_records(draw):
    kind = draw(st.sampled_from(KINDS))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": draw(unicode_text)}]}]
    meta = draw(st.dictionaries(st.sampled_from(["task", "scene_id", "note"]), unicode_text, max_size=2))
    rid = draw(unicode_text | st.integers(0, 10**6).map(str))
    if kind == "sft":
        obj = {"id": rid, "images": ["a.png"],
               "messages": [*prompt, {"role": "assistant", "content": draw(messages_content)}], **meta}
    elif kind == "preference":
        score = st.none() | st.floats(-1e6, 1e6, allow_nan=False)
        obj = {"id": rid, "images": ["a.png"], "prompt": prompt,
               "chosen": [{"role": "assistant", "content": [{"type": "text", "text": draw(unicode_text)}]}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": draw(unicode_text)}]}],
               "score_chosen": draw(score), "score_rejected": draw(score), **meta}
        obj = {k: v for k, v in obj.items() if v is not None}
    else:
        obj = {"id": rid, "images": ["a.png"], "prompt": prompt, "response": draw(unicode_text),
               "annotations": draw(st.dictionaries(unicode_text, unicode_text, max_size=2)), **meta}
    return kind, obj


@settings(max_examples=100, deadline=None)
@given(recs=st.lists(valid_records(), min_size=1, max_size=4))
def test_write_then_read_is_identity(recs):
    """Valid records written with the stages' writer and read back are the same records, with
    arbitrary unicode (astral planes, RTL marks, combining characters) intact; only ``images``
    become absolute and ``source`` names the line."""
    kind = recs[0][0]
    objs = [o for k, o in recs if k == kind]
    for i, o in enumerate(objs):
        o["id"] = f"{i}-{o['id']}"  # distinct ids: duplicates are their own test
    with tempfile.TemporaryDirectory() as d:
        Image.new("RGB", (4, 4)).save(Path(d) / "a.png")
        f = Path(d) / "r.jsonl"
        atomic_write_jsonl(f, objs)
        got = read_records(f, kind)
        assert len(got) == len(objs)
        for n, (o, rec) in enumerate(zip(objs, got), 1):
            out = rec.to_json()
            assert out.pop("source") == f"{f}:{n}"
            assert out.pop("images") == [str(Path(d).resolve() / "a.png")]
            want = {k: v for k, v in o.items() if k != "images"}
            if kind == "preference":
                for k in ("score_chosen", "score_rejected"):
                    if k in want:
                        want[k] = float(want[k])
            assert out == want


@settings(max_examples=200, deadline=None)
@given(rel=st.text(max_size=40) | st.sampled_from(["..", "../a", "/", "a/../../b", "./a/./b", "a" * 300,
                                                    ("x" * 255 + "/") * 20, "a\x00b"]))
def test_resolve_image_path_stays_under_root_or_raises(rel):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d).resolve()
        try:
            full = resolve_image_path(rel, root, "f:9")
        except RecordError as e:
            assert str(e).startswith("f:9: image path")
            return
        assert full == root or root in full.parents


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _image_bytes("PNG"), _image_bytes("JPEG")


@settings(max_examples=150, deadline=None)
@given(data=st.sampled_from([PNG, JPEG]), cut=st.integers(0, 2000),
       flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=4))
def test_damaged_images_load_or_raise_record_error(data, cut, flips):
    """A truncated or bit-flipped PNG/JPEG either decodes or raises RecordError naming the
    record -- Pillow's SyntaxError, EOFError, zlib.error ... never escape."""
    b = bytearray(data[: max(1, min(cut, len(data)))] if cut < len(data) else data)
    for pos, x in flips:
        b[pos % len(b)] ^= x
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "img"
        p.write_bytes(bytes(b))
        try:
            im = load_image(p, "f:3")
        except RecordError as e:
            assert str(e).startswith("f:3: image ")
        else:
            assert im.mode == "RGB"


@settings(max_examples=150, deadline=None)
@given(value=any_json | st.fixed_dictionaries({"objects": st.lists(any_json, max_size=2) | any_json,
                                               "image": any_json}))
def test_read_scenes_any_json_is_a_scene_or_a_record_error(value):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "scenes.jsonl"
        f.write_text(json.dumps(value) + "\n")
        try:
            read_scenes(f)
        except RecordError as e:
            assert names_line_1(str(e), f), str(e)


def test_over_long_limit_is_the_default(root):
    """The default reader limit is MAX_RESPONSE_CHARS: one character more is an error."""
    ok = write_lines(root / "ok.jsonl", [sft_obj(answer="y" * MAX_RESPONSE_CHARS)])
    assert len(read_records(ok, "sft")) == 1
    long = write_lines(root / "long.jsonl", [sft_obj(answer="y" * (MAX_RESPONSE_CHARS + 1))])
    with pytest.raises(RecordError, match=rf"{long}:1: .*over the limit of {MAX_RESPONSE_CHARS}"):
        read_records(long, "sft")
