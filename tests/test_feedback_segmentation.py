"""The feedback stage's ``--segmentation``: labels cut the released way (default) or the fine way,
recorded in every record and the manifest, and checked against what the source returned."""

from __future__ import annotations

import json

import pytest

from data_pipelines import feedback as F
from data_pipelines import sample as S
from mmalign.feedback import FeedbackItem
from mmalign.segments import split_segments


@pytest.fixture(scope="module")
def scripted(world, model_dirs, tmp_path_factory):
    # per prompt: "There is a red circle." and "There are two objects: a blue star and a green cross."
    # (the empty sample is rejected by the sample stage)
    out = tmp_path_factory.mktemp("seg-sample") / "s"
    assert S.main(["--model", str(model_dirs["llava"]), "--policy-class", "tests.test_sample_feedback.ScriptedPolicy",
                   "--data", str(world), "--limit", "2", "--k", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def _rows(out):
    return [json.loads(x) for x in (out / "feedback.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source", ["oracle", "judge"])
def test_segmentation_is_threaded_recorded_and_counted(world, model_dirs, scripted, tmp_path, source):
    judge = ["--judge", str(model_dirs["llava"])] if source == "judge" else []
    counts = {}
    for seg in ("released", "fine"):
        out = tmp_path / seg
        extra = [] if seg == "released" else ["--segmentation", seg]   # released is the default
        assert F.main(["--responses", str(scripted), "--data", str(world), "--source", source, *judge, *extra,
                       "--out", str(out), "--no-progress"]) == 0
        rows = _rows(out)
        assert len(rows) == 4
        for r in rows:
            assert r["annotations"]["segmentation"] == seg
            got = [(s["start"], s["end"]) for s in r["annotations"]["segments"]]
            assert got == [(s.start, s.end) for s in split_segments(r["response"], seg)]
        assert json.loads((out / "manifest.json").read_text())["info"]["segmentation"] == seg
        report = json.loads((out / "report.json").read_text())
        assert report["segmentation"] == seg
        counts[seg] = report["counts"]
        assert f"segmentation `{seg}`" in (out / "report.md").read_text()
    # by hand: "There is a red circle." is one segment either way; "There are two objects: a blue star
    # and a green cross." is one released segment (no , ; ! ?) and three fine ones
    # ("There are two objects:" | "a blue star" | "and a green cross.")
    assert counts["released"]["segments_total"] == 2 * (1 + 1)
    assert counts["fine"]["segments_total"] == 2 * (1 + 3)
    assert counts["fine"]["segments_per_response"] == 2.0


def test_bad_segmentation_and_a_source_that_ignores_it(world, scripted, tmp_path, capsys):
    with pytest.raises(SystemExit):
        F.main(["--responses", str(scripted), "--data", str(world), "--segmentation", "words",
                "--out", str(tmp_path / "x")])
    assert "segmentation must be one of" in capsys.readouterr().err
    from mmalign.oracle import WorldOracle
    from mmalign.scene_io import load_scenes

    scenes = load_scenes(world)
    image = next(iter(scenes))
    item = FeedbackItem(id="r1", prompt="", response="There are two objects: a blue star and a green cross.",
                        image=image)
    fine = WorldOracle(scenes, segmentation="fine").annotate([item])
    F.check_segmentation_of([item], fine, "fine")
    with pytest.raises(ValueError, match=r"item 'r1': the source's segments .* are not the 'released' segmentation"):
        F.check_segmentation_of([item], fine, "released")
