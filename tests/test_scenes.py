"""The data stage end to end on a small scale: determinism, disjoint splits, true answers, format."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import scenes as S
from mmalign import world as W
from mmalign.stage import read_jsonl, read_manifest
from tests.test_world import assert_qa_true

SMALL = ["--n-train", "40", "--n-val", "10", "--n-test", "10", "--no-progress"]


def small_config(seed: int = 0, **over: int) -> dict:
    args = S.parse_args(["--seed", str(seed), *SMALL])
    return {**S.build_config(args), **over}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "data"
    S.generate(out, small_config(0), progress=False)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


def test_layout_and_manifest(data: Path) -> None:
    m = read_manifest(data)
    assert m is not None and m["stage"] == "data" and m["seed"] == 0
    c = m["counts"]
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        assert c[f"{split}/scenes"] == n
        assert len(list((data / "images" / split).glob("*.png"))) == n
        recs = read_jsonl(data / split / "sft.jsonl")
        assert c[f"{split}/records"] == len(recs)
        for task in W.TASKS:
            assert c.get(f"{split}/records/{task}", 0) == sum(1 for r in recs if r["task"] == task)
        assert c[f"{split}/yes"] + c[f"{split}/no"] == sum(1 for r in recs if r["label"] is not None)
    assert "duplicates_rejected" in c and "split_full_rejected" in c


def test_records_format(data: Path) -> None:
    ids = set()
    for split in S.SPLITS:
        scenes = {s["scene_id"]: s for s in read_jsonl(data / split / "scenes.jsonl")}
        for r in read_jsonl(data / split / "sft.jsonl"):
            assert r["id"] not in ids
            ids.add(r["id"])
            assert r["id"].startswith(f"{r['scene_id']}-{r['task']}")
            assert r["images"] == [scenes[r["scene_id"]]["image"]]
            user, assistant = r["messages"]
            assert user["role"] == "user" and user["content"][0] == {"type": "image"}
            assert user["content"][1] == {"type": "text", "text": r["question"]}
            assert assistant == {"role": "assistant", "content": [{"type": "text", "text": r["answer"]}]}
            assert r["task"] in W.TASKS
        for sid, s in scenes.items():
            index = int(sid.split("-")[1])
            assert s["image"] == f"images/{split}/{index:06d}.png" and s["split"] == split
            img = Image.open(data / s["image"])
            assert img.size == (64, 64) and img.mode == "RGB"
            assert W.Scene.from_dict(s).graph_hash() == s["graph_hash"]


def test_splits_disjoint_by_graph_hash(data: Path) -> None:
    hashes = {split: [s["graph_hash"] for s in read_jsonl(data / split / "scenes.jsonl")] for split in S.SPLITS}
    for split, hs in hashes.items():
        assert len(set(hs)) == len(hs), f"repeated graph inside {split}"
    assert not set(hashes["train"]) & set(hashes["val"])
    assert not set(hashes["train"]) & set(hashes["test"])
    assert not set(hashes["val"]) & set(hashes["test"])


def test_every_answer_true_and_captions_exact(data: Path) -> None:
    for split in S.SPLITS:
        scenes = {s["scene_id"]: s for s in read_jsonl(data / split / "scenes.jsonl")}
        for r in read_jsonl(data / split / "sft.jsonl"):
            scene = scenes[r["scene_id"]]
            if r["task"] == "detailed_caption":
                check = W.check_caption(W.parse_caption(r["answer"]), W.Scene.from_dict(scene))
                assert check.complete, r["answer"]
            elif r["task"] == "short_caption":
                assert r["answer"] == W.short_caption(W.Scene.from_dict(scene))
            else:
                assert_qa_true(scene, r["task"], r["question"], r["answer"], r["label"], r["meta"])


def test_yes_no_balance(data: Path) -> None:
    labels = [r["label"] for r in read_jsonl(data / "train" / "sft.jsonl") if r["label"] is not None]
    assert 0.35 <= sum(labels) / len(labels) <= 0.65  # 120 coin flips: well within 3 sigma


def test_prompts_are_paraphrased(data: Path) -> None:
    prompts = {r["question"] for r in read_jsonl(data / "train" / "sft.jsonl") if r["task"] == "detailed_caption"}
    assert len(prompts) >= 3


def test_same_seed_identical_different_seed_differs(data: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    S.generate(again, small_config(0), progress=False)
    assert files(again) == files(data)  # identical records and byte-identical PNGs
    other = tmp_path / "other"
    S.generate(other, small_config(1), progress=False)
    a, b = files(data), files(other)
    assert a["train/sft.jsonl"] != b["train/sft.jsonl"]
    assert a["images/train/000000.png"] != b["images/train/000000.png"]


def test_rendering_is_per_scene_and_jittered() -> None:
    scene = W.Scene((W.SceneObject("circle", "red", "large", 0.5, 0.5),), "x-1")
    a = S.render_scene(scene, 64, seed=0)
    assert a.tobytes() == S.render_scene(scene, 64, seed=0).tobytes()
    assert a.tobytes() != S.render_scene(W.Scene(scene.objects, "x-2"), 64, seed=0).tobytes()
    # the colour at the centre stays clearly red despite jitter and noise
    r, g, b = a.getpixel((32, 32))
    assert r > 170 and g < 90 and b < 90
    assert S.render_scene(scene, 32).size == (32, 32)


def test_split_of_is_a_pure_function_of_the_hash() -> None:
    fr = [("train", 0.8), ("val", 0.1), ("test", 0.1)]
    assert S.split_of("0" * 64, fr) == "train" and S.split_of("f" * 64, fr) == "test"
    assert S.split_of("e" + "0" * 63, fr) == "val"  # 0.875


def test_cli_skips_when_up_to_date_and_force_redoes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert S.main(["--out", str(out), *SMALL]) == 0
    first = read_manifest(out)
    assert "data: wrote" in capsys.readouterr().out
    assert S.main(["--out", str(out), *SMALL]) == 0
    assert "up to date, skipping" in capsys.readouterr().out
    assert read_manifest(out) == first
    assert S.main(["--out", str(out), *SMALL, "--force"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert S.main(["--out", str(out), *SMALL, "--seed", "2"]) == 0  # config changed: regenerates
    assert read_manifest(out)["seed"] == 2


def test_cli_help_and_validation(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        S.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--seed", "--n-train", "--n-val", "--n-test", "--image-size", "--force"):
        assert opt in text
    with pytest.raises(SystemExit):
        S.parse_args(["--max-objects", "11"])
    with pytest.raises(SystemExit):
        S.parse_args(["--n-train", "-1"])


def test_too_many_scenes_for_the_world_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="too few distinct graphs"):
        S.sample_splits(0, {"train": 80}, min_objects=1, max_objects=1, max_draws_factor=5)


def test_qa_per_scene_adds_distinct_questions(tmp_path: Path) -> None:
    cfg = small_config(0, n_train=5, n_val=0, n_test=0, qa_per_scene=3)
    counts = S.generate(tmp_path / "d", cfg, progress=False)
    assert counts["train/records/count"] >= 10
    recs = read_jsonl(tmp_path / "d" / "train" / "sft.jsonl")
    assert len({r["id"] for r in recs}) == len(recs)
    assert not (tmp_path / "d" / "val" / "sft.jsonl").read_text()  # empty split: empty files
