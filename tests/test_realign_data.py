"""The `realign_data` stage (Re-Align dual preference) on a hand-made world and a hand-made index.

The world (``tmp_path``): scene graphs, blank images and SFT records as the data stage writes
them; the index is an :class:`ImageIndex` built from hand-placed unit vectors (no model), saved
inside a stage output so it has a manifest. Cosines follow from the angles below:

* ``s0`` (query, red circle left of blue square) at 0 deg; ``s0same`` at 5 deg shows the same scene
  graph (objects moved a little); ``s0super`` at 10 deg adds a yellow triangle, so its graph
  differs but every claim of s0's caption still holds on it; ``s1`` (green star, yellow triangle)
  at 20 deg. So s0's neighbours are s0same, s0super, s1 and the first qualifying one is s1 (rank 3).
* ``s1``'s nearest is s0super (10 deg away), which has no star: it qualifies at rank 1.
* ``s2`` (one large purple cross) and ``s2diff`` (a small purple cross) sit in another plane.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import realign_data as R
from mmalign import world as W
from mmalign.oracle import verify_world_claim, world_claims
from mmalign.ranking import split_of
from mmalign.records import PreferenceRecord, RecordError, read_records
from mmalign.retrieval import ImageIndex
from mmalign.stage import StageOutput, atomic_write_jsonl

O = W.SceneObject
SCENES = {
    "s0": W.Scene((O("circle", "red", "small", 0.2, 0.5), O("square", "blue", "large", 0.8, 0.5)), scene_id="s0"),
    "s0same": W.Scene((O("circle", "red", "small", 0.25, 0.5), O("square", "blue", "large", 0.75, 0.5)),
                      scene_id="s0same"),
    "s0super": W.Scene((O("circle", "red", "small", 0.2, 0.5), O("square", "blue", "large", 0.8, 0.5),
                        O("triangle", "yellow", "small", 0.5, 0.15)), scene_id="s0super"),
    "s1": W.Scene((O("star", "green", "large", 0.3, 0.3), O("triangle", "yellow", "small", 0.7, 0.8)), scene_id="s1"),
    "s2": W.Scene((O("cross", "purple", "large", 0.5, 0.5),), scene_id="s2"),
    "s2diff": W.Scene((O("cross", "purple", "small", 0.5, 0.5),), scene_id="s2diff"),
}
ANGLES = {"s0": (0, 1, 0.0), "s0same": (0, 1, 5.0), "s0super": (0, 1, 10.0), "s1": (0, 1, 20.0),
          "s2": (2, 3, 0.0), "s2diff": (2, 3, 10.0)}
QUESTION = "Describe the image in detail."


def image_of(sid: str) -> str:
    return f"images/train/{sid}.png"


def vector(sid: str) -> np.ndarray:
    a, b, deg = ANGLES[sid]
    v = np.zeros(6, dtype=np.float32)
    v[a], v[b] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return v


def sft(sid: str, task: str = "detailed_caption", rid: str | None = None, answer: str | None = None) -> dict:
    answer = answer if answer is not None else W.detailed_caption(SCENES[sid])
    return {"id": rid or f"{sid}-{task}", "images": [image_of(sid)],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "task": task, "scene_id": sid}


RECORDS = [sft("s0"), sft("s0", "short_caption", answer="A red circle and a blue square."), sft("s1"), sft("s2"),
           sft("s0", rid="s0-again")]  # the same image + question under another id: used once


def write_data(root: Path, records: list[dict | str]) -> Path:
    """A data-stage output holding every scene (images + scenes.jsonl) and ``records`` as sft.jsonl."""
    out = root / "data"
    with StageOutput(out, stage="data", config={"hand_made": True}) as st:
        (st.path / "images" / "train").mkdir(parents=True)
        for sid in SCENES:
            Image.new("RGB", (8, 8)).save(st.path / image_of(sid))
        atomic_write_jsonl(st.path / "train" / "scenes.jsonl",
                           [{**s.to_dict(), "split": "train", "image": image_of(sid)} for sid, s in SCENES.items()])
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        (st.path / "train" / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return out


def write_index(root: Path, sids=tuple(SCENES)) -> Path:
    out = root / "index"
    with StageOutput(out, stage="index", config={"hand_made": True}) as st:
        ImageIndex.build([image_of(s) for s in sids], np.stack([vector(s) for s in sids])).save(st.path)
    return out


@pytest.fixture
def world(tmp_path) -> tuple[Path, Path]:
    return write_data(tmp_path, RECORDS), write_index(tmp_path)


def run(data: Path, index: Path, out: Path, *extra: str) -> int:
    """The stage in its injection mode (the refill mode, the default, is tests/test_realign_refill.py)."""
    mode = [] if "--rejected" in extra else ["--rejected", "injection"]
    return R.main(["--data", str(data), "--index", str(index), "--out", str(out), "--no-progress", *mode, *extra])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def pairs_of(out: Path) -> dict[str, dict]:
    return {p["id"]: p for split in ("train", "val") for p in jsonl(out / split / "pairs.jsonl")}


def text(msgs: list[dict]) -> str:
    return msgs[0]["content"][0]["text"]


def diff_spans(a: str, b: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The differing middles of ``a`` and ``b`` after their common prefix and suffix."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return (p, len(a) - s), (p, len(b) - s)


def test_the_premises_of_the_hand_made_world():
    """s0same has s0's graph; s0super's differs while every claim of s0's caption holds on it."""
    assert SCENES["s0same"].graph_hash() == SCENES["s0"].graph_hash()
    assert SCENES["s0super"].graph_hash() != SCENES["s0"].graph_hash()
    claims = world_claims(W.detailed_caption(SCENES["s0"]))
    assert claims and all(verify_world_claim(c, SCENES["s0super"]) for c in claims)
    assert any(verify_world_claim(c, SCENES["s1"]) is False for c in claims)


def test_first_different_picks_the_highest_ranked_qualifying_neighbour(world, tmp_path):
    data, index = world
    out = tmp_path / "realign"
    assert run(data, index, out, "--k", "5", "--val-fraction", "0") == 0
    pairs = pairs_of(out)
    assert set(pairs) == {"s0-detailed_caption", "s1-detailed_caption", "s2-detailed_caption"}
    p0 = pairs["s0-detailed_caption"]
    # rank 1 (s0same, identical scene) and rank 2 (s0super, answer still right) are skipped
    assert p0["rejected_images"] == [image_of("s1")] and p0["retrieved_scene_id"] == "s1"
    r = p0["retrieval"]
    assert r["rank"] == 3 and r["differs"] is True and r["score"] == pytest.approx(math.cos(math.radians(20)), abs=1e-5)
    assert r["chosen_faithfulness_on_retrieved"] < 1
    assert pairs["s1-detailed_caption"]["rejected_images"] == [image_of("s0super")]
    assert pairs["s1-detailed_caption"]["retrieval"]["rank"] == 1
    assert pairs["s2-detailed_caption"]["rejected_images"] == [image_of("s2diff")]
    assert p0["images"] == [image_of("s0")] and p0["scene_id"] == "s0" and p0["task"] == "detailed_caption"
    assert p0["rejected_source"] == "injection" and p0["retrieval"]["select"] == "first-different"
    assert text(p0["chosen"]) == W.detailed_caption(SCENES["s0"])
    # the records read back as preference records, with both images resolved under the data root
    recs = read_records(out / "train" / "pairs.jsonl", kind="preference", data_root=data)
    assert all(isinstance(x, PreferenceRecord) for x in recs) and len(recs) == 3

    rep = json.loads((out / "report.json").read_text())
    assert rep["rejected"] == "injection"
    assert rep["records"]["items"] == 3 and rep["records"]["duplicates"] == 1 and rep["records"]["other_task"] == 1
    t1 = rep["retrieval"]["raw_top1"]
    # raw top-1: s0 -> s0same (same scene), s1 -> s0super, s2 -> s2diff
    assert t1["n"] == 3 and t1["differs"] == pytest.approx(2 / 3, abs=1e-4)
    assert t1["makes_chosen_wrong"] == pytest.approx(2 / 3, abs=1e-4)
    assert rep["retrieval"]["selected"]["mean_rank"] == pytest.approx(5 / 3, abs=1e-3)
    assert rep["pairs"] == {"total": 3, "train": 3, "val": 0}
    assert (out / "report.md").read_text().startswith("# Re-Align")


def test_top1_takes_the_raw_nearest_neighbour(world, tmp_path):
    data, index = world
    out = tmp_path / "top1"
    assert run(data, index, out, "--select", "top1") == 0
    p0 = pairs_of(out)["s0-detailed_caption"]
    assert p0["rejected_images"] == [image_of("s0same")]
    assert p0["retrieval"]["rank"] == 1 and p0["retrieval"]["differs"] is False
    assert p0["retrieval"]["chosen_faithfulness_on_retrieved"] == 1.0 and p0["retrieval"]["select"] == "top1"


def test_rejected_text_differs_by_one_injected_claim(world, tmp_path):
    data, index = world
    out = tmp_path / "realign"
    assert run(data, index, out, "--seed", "3") == 0
    rep = json.loads((out / "report.json").read_text())
    for p in pairs_of(out).values():
        chosen, rejected, inj = text(p["chosen"]), text(p["rejected"]), p["injection"]
        assert rejected != chosen and p["injection_kind"] in ("object", "attribute", "relation")
        assert rejected[inj["start"]:inj["end"]] == inj["replacement"]
        # the texts differ in one place: the injected span (with its connector, " and " / ", ", for an
        # inserted object), which replaced the original words
        (ca, cb), (ra, rb) = diff_spans(chosen, rejected)
        assert inj["start"] - len(" and ") <= ra and rb <= inj["end"] and chosen[ca:cb] in inj["original"]
        scene = SCENES[p["scene_id"]]
        assert all(verify_world_claim(c, scene) is not False for c in world_claims(chosen))
        assert sum(verify_world_claim(c, scene) is False for c in world_claims(rejected)) == 1
    # s2's caption has one object and no relation: a relation injection is impossible there
    assert pairs_of(out)["s2-detailed_caption"]["injection_kind"] != "relation"
    assert sum(rep["injections"]["used"].values()) == 3


def test_impossible_kinds_are_counted_and_a_record_without_any_is_rejected(world, tmp_path):
    data, index = world
    out = tmp_path / "realign"
    assert run(data, index, out, "--kinds", "relation") == 0
    assert {p["injection_kind"] for p in pairs_of(out).values()} == {"relation"}
    assert set(pairs_of(out)) == {"s0-detailed_caption", "s1-detailed_caption"}
    rejects = jsonl(out / "rejects.jsonl")
    assert [(r["id"], r["reason"]) for r in rejects] == [("s2-detailed_caption", "no injection possible")]
    rep = json.loads((out / "report.json").read_text())
    assert rep["injections"]["failed_attempts"] == {"relation: the response has no correct relation claim to flip": 1}


def test_the_split_keeps_prompts_whole_and_follows_the_id_hash(tmp_path):
    recs = [sft("s0"), sft("s1"), sft("s2")] + [sft(s, rid=f"{s}-copy") for s in ("s0", "s1", "s2")]
    data, index = write_data(tmp_path, recs), write_index(tmp_path)
    out = tmp_path / "realign"
    assert run(data, index, out, "--val-fraction", "0.5") == 0
    train, val = (jsonl(out / s / "pairs.jsonl") for s in ("train", "val"))
    ids = [p["prompt_id"] for p in train + val]
    assert sorted(ids) == ["s0-detailed_caption", "s1-detailed_caption", "s2-detailed_caption"]  # once each
    for split, rows in (("train", train), ("val", val)):
        assert all(split_of(p["prompt_id"], 0.5) == split for p in rows)


def test_no_qualifying_neighbour_goes_to_rejects(world, tmp_path):
    """With k=2, s0's neighbours are only s0same and s0super: neither qualifies."""
    data, index = world
    out = tmp_path / "realign"
    assert run(data, index, out, "--k", "2") == 0
    assert set(pairs_of(out)) == {"s1-detailed_caption", "s2-detailed_caption"}
    rejects = jsonl(out / "rejects.jsonl")
    assert len(rejects) == 1 and rejects[0]["reason"] == "no qualifying neighbour" and rejects[0]["id"] == "s0-detailed_caption"
    assert [c["id"] for c in rejects[0]["candidates"]] == [image_of("s0same"), image_of("s0super")]
    assert [c["differs"] for c in rejects[0]["candidates"]] == [False, True]
    assert [c["chosen_wrong"] for c in rejects[0]["candidates"]] == [False, False]
    assert "sft.jsonl:1:" in rejects[0]["error"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["retrieval"]["no_qualifying_neighbour"] == {"n": 1, "share": pytest.approx(1 / 3, abs=1e-4)}
    assert rep["rejects"]["reasons"] == {"no qualifying neighbour": 1}


def test_rerun_is_skipped_when_up_to_date(world, tmp_path, capsys):
    data, index = world
    out = tmp_path / "realign"
    assert run(data, index, out) == 0
    capsys.readouterr()
    assert run(data, index, out) == 0
    assert "up to date" in capsys.readouterr().out
    assert run(data, index, out, "--k", "3") == 0  # another config: redone
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["config"]["k"] == 3


def test_errors_name_file_and_line_and_skip_sends_them_to_rejects(tmp_path):
    escape = {**sft("s1"), "id": "escape", "images": ["../../etc/passwd"]}
    recs = [sft("s0"), "{not json", escape, sft("s2")]
    data, index = write_data(tmp_path, recs), write_index(tmp_path)
    out = tmp_path / "realign"
    with pytest.raises(RecordError, match=r"train/sft\.jsonl:2: malformed JSON"):
        run(data, index, out)
    assert not out.exists()  # nothing half-written
    assert run(data, index, out, "--on-error", "skip") == 0
    rejects = jsonl(out / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "malformed record"), (3, "image")]
    assert "escapes the data root" in rejects[1]["error"]
    assert set(pairs_of(out)) == {"s0-detailed_caption", "s2-detailed_caption"}


def test_an_image_missing_from_the_index_is_an_error(tmp_path):
    data = write_data(tmp_path, [sft("s0"), sft("s1")])
    index = write_index(tmp_path, sids=("s0", "s0same", "s0super", "s2", "s2diff"))
    with pytest.raises(RecordError, match=r"sft\.jsonl:2: image 'images/train/s1.png' is not in the index"):
        run(data, index, tmp_path / "realign")


def test_injection_mode_needs_a_scene_graph_for_every_record(tmp_path):
    no_scene = {**sft("s1"), "id": "lost", "images": [image_of("s1")], "scene_id": "nowhere"}
    data = write_data(tmp_path, [sft("s0"), no_scene])
    # s1's scene graph is in scenes.jsonl under its image; drop it so the record has none
    scenes = data / "train" / "scenes.jsonl"
    scenes.write_text("".join(x + "\n" for x in scenes.read_text().splitlines() if '"s1"' not in x))
    with pytest.raises(RecordError, match=r"sft\.jsonl:2: no scene graph for image 'images/train/s1.png'"):
        run(data, write_index(tmp_path), tmp_path / "realign")
