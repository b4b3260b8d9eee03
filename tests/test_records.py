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
    import mmalign.records as records

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
