"""The MM-RLHF importer on fixtures in the published ``data.jsonl`` and ``dpo_pairs.jsonl`` layouts.

data.jsonl (tests/fixtures/real/mmrlhf/data.jsonl): pairs follow the human ``final_ranking``;
with the default equal weights overall = mean of the dimension scores a response has, kept but
deciding nothing:

* ``short_000123``: ranks [2, 1, 3, 4] -> ranked input order 1, 0, 2, 3; 4 distinct ranks ->
  4*3/2 = 6 pairs. F = [2, 3, 1, 0], H = [2, 3, 2, 1], E = [3, 3, 3, 3] -> overall =
  [7/3, 3, 2, 4/3], which agrees with the ranks on all 6 pairs.
* ``long_000457``: ranks [1, 1, 3] -> ranked 0, 1, 2; responses 0 and 1 tie -> 2 pairs (ranked
  positions (0, 2) and (1, 2)) and 1 tie record (0, 1). overall = [8/3, 8/3, 5/3]: both pairs agree.
* ``mcq_000789``: ranks [1, 3, 2] -> ranked 0, 2, 1 -> 3 pairs. F = [3, 0, 3], H = [2, 0, 3],
  E = [3, 3, null] -> overall = [8/3, 1, 3] (response 2 averages only F and H): the pair
  (position 0 = response 0) over (position 1 = response 2) has the lower overall score (8/3 < 3),
  so 1 pair disagrees with the scores and 2 agree.
* ``video_000042``: a video record: skipped, listed in rejects.jsonl, counted.

Total: 3 prompts, 4 + 3 + 3 = 10 responses, 6 + 2 + 3 = 11 pairs (10 agree, 1 disagrees), 1 tie.

dpo_pairs.jsonl: lines 1-2 two pairs of one (image, prompt) with critiques, line 3 a tie, line 4
a pair without critiques (is_tie false, ls_factor 0.5), line 5 a video pair -> 3 prompts, 3 pairs,
1 tie, 3 records with critiques, 1 skipped video.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from data_pipelines import import_mmrlhf as M
from mmalign.records import PreferenceRecord, RecordError, read_records
from mmalign.stage import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "real" / "mmrlhf"
DATA = FIXTURE / "data.jsonl"
IMAGES = FIXTURE / "images"


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list) -> Path:
    """Records as JSONL; a str entry is written verbatim (to make malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_cli(*args: str) -> int:
    return M.main([str(a) for a in args])


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmrlhf") / "import"
    assert run_cli("--input", DATA, "--images", IMAGES, "--out", out, "--val-fraction", "0") == 0
    return out


def pairs_of(out: Path) -> list[dict]:
    return read_jsonl(out / "train" / "pairs.jsonl") + read_jsonl(out / "val" / "pairs.jsonl")


# --------------------------------------------------------------------------------------------
# the fixture


def test_fixture_ranked_order_and_pair_count(imported):
    ranked = {r["id"]: r for r in read_jsonl(imported / "ranked.jsonl")}
    assert list(ranked) == ["short_000123", "long_000457", "mcq_000789"]
    order = {pid: [resp["input_index"] for resp in r["responses"]] for pid, r in ranked.items()}
    assert order == {"short_000123": [1, 0, 2, 3], "long_000457": [0, 1, 2], "mcq_000789": [0, 2, 1]}
    overall = [resp["overall"] for resp in ranked["short_000123"]["responses"]]
    assert overall == pytest.approx([3, 7 / 3, 2, 4 / 3])
    mcq = ranked["mcq_000789"]["responses"]
    assert mcq[1]["scores"] == {"faithfulness": 3.0, "helpfulness": 3.0}  # the null ethical score drops out
    assert [r["overall"] for r in mcq] == pytest.approx([8 / 3, 3.0, 1.0])  # not sorted: the ranks decide
    for r in ranked.values():
        assert r["split"] == "train"
        assert r["prompt"][0]["content"][0] == {"type": "image"}
        assert all(resp["source"] == "mmrlhf" and resp["critique"] for resp in r["responses"])
        ranks = [resp["human_rank"] for resp in r["responses"]]
        assert ranks == sorted(ranks)
    # The LLaVA "<image>" token is dropped from the text: the image is its own part.
    assert ranked["long_000457"]["prompt"][0]["content"][1]["text"] == "Describe the painting in detail."
    assert ranked["mcq_000789"]["reference"] == "C"
    assert ranked["short_000123"]["images"] == ["short/sharegpt4v_000123.jpg"]

    pairs = pairs_of(imported)
    assert len(pairs) == 11
    per_prompt = {pid: sum(p["prompt_id"] == pid for p in pairs) for pid in ranked}
    assert per_prompt == {"short_000123": 6, "long_000457": 2, "mcq_000789": 3}
    report = json.loads((imported / "report.json").read_text())
    assert report["format"] == "data"
    assert report["prompts"] == {"train": 3, "val": 0, "total": 3}
    assert report["responses"]["total"] == 10
    assert report["pairs"] == {"train": 11, "val": 0, "total": 11}
    assert report["ties"] == {"train": 1, "val": 0, "total": 1}
    assert report["prompts_with_ties"] == 1 and report["prompts_without_pairs"] == 0
    assert report["scores"]["ethical"]["missing"] == 1
    assert report["scores"]["faithfulness"]["histogram"] == {"0": 2, "1": 2, "2": 2, "3": 4}
    assert report["score_order_agreement"] == {"agree": 10, "disagree": 1, "score_tie": 0}
    assert report["rejected"]["total"] == 0 and report["skipped_video"] == 1
    manifest = json.loads((imported / "manifest.json").read_text())
    assert manifest["counts"]["train/pairs"] == 11 and manifest["counts"]["train/ties"] == 1
    assert manifest["counts"]["skipped_video"] == 1
    assert Path(manifest["info"]["image_root"]) == IMAGES.resolve() and manifest["info"]["format"] == "data"
    assert "ties" in (imported / "report.md").read_text()


def test_pairs_are_preference_records(imported):
    for split, n in (("train", 11), ("val", 0)):
        recs = read_records(imported / split / "pairs.jsonl", "preference", data_root=IMAGES,
                            check_images="decode")
        assert len(recs) == n
    recs = read_records(imported / "train" / "pairs.jsonl", "preference", data_root=IMAGES)
    first = recs[0]
    assert isinstance(first, PreferenceRecord)
    assert first.id == "short_000123-0-1"
    assert first.chosen[0]["content"][0]["text"].startswith("The image shows a red circle")
    assert first.score_chosen == pytest.approx(3.0) and first.score_rejected == pytest.approx(7 / 3)
    assert first.meta["scores_chosen"] == {"faithfulness": 3.0, "helpfulness": 3.0, "ethical": 3.0}
    assert first.meta["critique_rejected"] == "Correct objects and colours, but the background is not mentioned."
    for key in ("prompt_id", "chosen_rank", "rejected_rank", "scores_rejected", "critique_chosen",
                "source_chosen", "source_rejected", "human_rank_chosen", "human_rank_rejected"):
        assert key in first.meta
    for r in recs:
        assert r.meta["human_rank_chosen"] < r.meta["human_rank_rejected"]  # the human ranking decides
        assert "is_tie" not in r.meta
        assert r.id == f"{r.meta['prompt_id']}-{r.meta['chosen_rank']}-{r.meta['rejected_rank']}"
    # the pair the scores disagree with is kept, chosen by the annotators
    (mcq,) = [r for r in recs if r.id == "mcq_000789-0-1"]
    assert mcq.chosen[0]["content"][0]["text"] == "C"
    assert mcq.score_chosen == pytest.approx(8 / 3) and mcq.score_rejected == pytest.approx(3.0)


def test_equal_ranks_make_tie_records(imported):
    ids = sorted(p["id"] for p in pairs_of(imported) if p["prompt_id"] == "long_000457")
    assert ids == ["long_000457-0-2", "long_000457-1-2"]  # the two tied responses make no pair...
    (tie,) = read_records(imported / "train" / "ties.jsonl", "preference", data_root=IMAGES, check_images="decode")
    assert tie.id == "long_000457-0-1" and tie.meta["is_tie"] is True  # ...but a tie record
    assert tie.meta["human_rank_chosen"] == tie.meta["human_rank_rejected"] == 1
    assert tie.chosen[0]["content"][0]["text"].startswith("A large green square")  # the earlier response
    assert read_jsonl(imported / "val" / "ties.jsonl") == []


def test_weights_change_overall_not_pairs(tmp_path):
    # Helpfulness only: overall = H; the pairs still follow final_ranking (11, the same ids).
    out = tmp_path / "out"
    assert run_cli("--input", DATA, "--images", IMAGES, "--out", out, "--val-fraction", "0",
                   "--weights", "helpfulness=1") == 0
    pairs = pairs_of(out)
    assert len(pairs) == 11
    first = next(p for p in pairs if p["id"] == "short_000123-0-1")
    assert (first["score_chosen"], first["score_rejected"]) == (3.0, 2.0)  # H of responses 1 and 0
    assert M.parse_weights("faithfulness=2,ethics=0.5") == {"faithfulness": 2.0, "helpfulness": 0.0, "ethical": 0.5}
    for bad in ("speed=1", "faithfulness=-1", "faithfulness=nan", "faithfulness=0", "helpfulness"):
        with pytest.raises(ValueError):
            M.parse_weights(bad)
    with pytest.raises(SystemExit):
        run_cli("--input", DATA, "--images", IMAGES, "--out", tmp_path / "x", "--weights", "speed=1")


# --------------------------------------------------------------------------------------------
# dpo_pairs.jsonl


PAIRS = FIXTURE / "dpo_pairs.jsonl"


def test_dpo_pairs_fixture(tmp_path):
    out = tmp_path / "out"
    assert run_cli("--input", PAIRS, "--images", IMAGES, "--out", out, "--val-fraction", "0") == 0  # auto: pairs
    pairs = read_records(out / "train" / "pairs.jsonl", "preference", data_root=IMAGES, check_images="decode")
    ties = read_records(out / "train" / "ties.jsonl", "preference", data_root=IMAGES, check_images="decode")
    assert [r.id for r in pairs] == ["mmrlhf-pair-0", "mmrlhf-pair-1", "mmrlhf-pair-3"]
    assert [r.id for r in ties] == ["mmrlhf-pair-2"] and ties[0].meta["is_tie"] is True
    src = [json.loads(x) for x in PAIRS.read_text().splitlines()]
    a, b, mcq = pairs
    assert a.meta["prompt_id"] == b.meta["prompt_id"] != mcq.meta["prompt_id"]  # one (image, prompt)
    assert a.prompt[0]["content"] == [{"type": "image"}, {"type": "text", "text": src[0]["prompt"][len("<image>\n"):]}]
    assert a.meta["critique_chosen"] == src[0]["chosen_reason"] and a.meta["critique_rejected"] == src[0]["rejected_reason"]
    assert a.chosen[0]["content"][0]["text"] == src[0]["chosen"]
    assert read_jsonl(out / "train" / "pairs.jsonl")[0]["images"] == ["short/sharegpt4v_000123.jpg"]  # relative
    assert a.score_chosen is None and a.meta["source_chosen"] == "mmrlhf"
    assert "critique_chosen" not in mcq.meta and mcq.meta["ls_factor"] == 0.5 and "is_tie" not in mcq.meta
    rep = json.loads((out / "report.json").read_text())
    assert rep["format"] == "pairs" and rep["prompts"] == {"train": 3, "val": 0, "total": 3}
    assert rep["pairs"]["total"] == 3 and rep["ties"]["total"] == 1 and rep["skipped_video"] == 1
    assert rep["with_critiques"] == 3 and rep["with_ls_factor"] == 1 and rep["other_fields"] == {}
    assert rep["prompts_with_ties"] == 1 and rep["prompts_without_pairs"] == 1  # the painting: a tie only
    assert not (out / "ranked.jsonl").exists()
    assert [r["kind"] for r in read_jsonl(out / "rejects.jsonl")] == ["unsupported_video"]
    # a prompt's pairs share a split whatever the fraction
    for frac in (0.3, 0.5, 0.7):
        assert M.split_of(a.meta["prompt_id"], frac) == M.split_of(b.meta["prompt_id"], frac)


def test_dpo_pairs_other_fields_are_counted(tmp_path):
    src = [json.loads(x) for x in PAIRS.read_text().splitlines()]
    rows = [dict(src[0], id="x1", score=0.9), dict(src[3], id=7, has_image=True)]
    out = tmp_path / "out"
    rep = M.run(write_jsonl(tmp_path / "p.jsonl", rows), IMAGES, out, val_fraction=0.0, fmt="pairs")
    assert rep["other_fields"] == {"has_image": 1, "score": 1}
    assert [r["id"] for r in read_jsonl(out / "train" / "pairs.jsonl")] == ["x1", "7"]


PAIR = json.loads(PAIRS.read_text().splitlines()[0])


@pytest.mark.parametrize("case,changes,message", [
    ("one_reason", {"rejected_reason": None}, "'chosen_reason' without 'rejected_reason'"),
    ("empty_reason", {"chosen_reason": " "}, "'chosen_reason' must be a non-empty string"),
    ("bad_tie", {"is_tie": "yes"}, "'is_tie' must be true or false"),
    ("missing_chosen", {"chosen": None}, "missing field 'chosen'"),
    ("empty_rejected", {"rejected": ""}, "'rejected' is an empty response"),
    ("missing_prompt", {"prompt": None}, "missing field 'prompt'"),
    ("bad_ls_factor", {"ls_factor": "high"}, "'ls_factor' is 'high'"),
    ("escaping_image", {"image": "../outside.png"}, "escapes the data root"),
    ("duplicate_id", {"id": "a"}, "duplicate id"),
])
def test_bad_pair_error_names_file_and_line(tmp_path, images, case, changes, message):
    bad = {k: v for k, v in {**PAIR, **changes}.items() if v is not None}
    data = write_jsonl(tmp_path / "dpo_pairs.jsonl", [dict(PAIR, id="a"), bad])
    with pytest.raises(RecordError) as info:
        M.run(data, images, tmp_path / "out", fmt="pairs")
    text = str(info.value)
    assert text.startswith(f"{data}:2 id="), text
    assert message in text
    assert not (tmp_path / "out").exists()
    # skipped: listed and counted, the good pair imported
    rep = M.run(data, images, tmp_path / "out", fmt="pairs", on_error="skip", val_fraction=0.0)
    assert rep["rejected"]["total"] == 1 and rep["pairs"]["total"] + rep["ties"]["total"] == 1


def test_format_detection(tmp_path):
    assert M.detect_format(DATA) == "data" and M.detect_format(PAIRS) == "pairs"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(RecordError, match=r"odd\.jsonl:1: cannot tell the layout"):
        M.run(odd, IMAGES, tmp_path / "out")


def test_split_keeps_prompts_whole(tmp_path):
    base = fixture_records()[0]
    recs = [dict(base, id=f"p{i:03d}") for i in range(40)]
    data = write_jsonl(tmp_path / "data.jsonl", recs)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run_cli("--input", data, "--images", IMAGES, "--out", out, "--val-fraction", "0.5",
                       "--check-images", "exists") == 0
        outs.append(out)
    split = {r["id"]: r["split"] for r in read_jsonl(outs[0] / "ranked.jsonl")}
    assert set(split.values()) == {"train", "val"}  # 40 prompts at 0.5: both splits used
    for s in ("train", "val"):
        for p in read_jsonl(outs[0] / s / "pairs.jsonl"):
            assert split[p["prompt_id"]] == s
    per_prompt = {}
    for p in pairs_of(outs[0]):
        per_prompt[p["prompt_id"]] = per_prompt.get(p["prompt_id"], 0) + 1
    assert set(per_prompt.values()) == {6}  # every prompt's 6 pairs are together, none lost
    # Deterministic (a hash of the id, not of the run) and independent of the file order.
    assert (outs[1] / "ranked.jsonl").read_text() == (outs[0] / "ranked.jsonl").read_text()
    assert {pid: M.split_of(pid, 0.5) for pid in split} == split
    write_jsonl(tmp_path / "rev.jsonl", recs[::-1])
    assert run_cli("--input", tmp_path / "rev.jsonl", "--images", IMAGES, "--out", tmp_path / "rev",
                   "--val-fraction", "0.5", "--check-images", "exists") == 0
    assert {r["id"]: r["split"] for r in read_jsonl(tmp_path / "rev" / "ranked.jsonl")} == split
    assert all(M.split_of(f"p{i}", 1.0) == "val" and M.split_of(f"p{i}", 0.0) == "train" for i in range(20))


# --------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def images(tmp_path) -> Path:
    """A copy of the fixture image root with one corrupt image and one file outside it."""
    root = tmp_path / "images"
    shutil.copytree(IMAGES, root)
    (root / "short" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "outside.png").write_bytes((IMAGES / "long" / "wikiart_000457.png").read_bytes())
    return root


def _mutate(rec: dict, **changes) -> dict:
    rec = dict(rec)
    for k, v in changes.items():
        if v is DROP:
            rec.pop(k)
        else:
            rec[k] = v
    return rec


DROP = object()
GOOD = fixture_records()[0]
# (case, bad record, text the error must contain). The bad record goes on line 2 of the input.
BAD = [
    ("malformed_json", '{"id": "x", "question": ', "malformed JSON"),
    ("not_object", "[1, 2]", "must be a JSON object"),
    ("missing_question", _mutate(GOOD, id="b", question=DROP), "missing field 'question'"),
    ("missing_outputs", _mutate(GOOD, id="b", models_output=DROP), "missing field 'models_output'"),
    ("missing_image", _mutate(GOOD, id="b", image=DROP), "missing field 'image'"),
    ("no_scores", _mutate(GOOD, id="b", faithfulness=DROP, helpfulness=DROP, ethical=DROP), "missing score fields"),
    ("non_numeric_score", _mutate(GOOD, id="b", helpfulness=[2, "good", 2, 1]), "helpfulness[1] is 'good'"),
    ("bool_score", _mutate(GOOD, id="b", faithfulness=[True, 3, 1, 0]), "faithfulness[0] is True"),
    ("nan_score", _mutate(GOOD, id="b", faithfulness=[2, math.nan, 1, 0]), "NaN/inf"),
    ("length_mismatch", _mutate(GOOD, id="b", ethical=[3, 3, 3]), "'ethical' has 3 entries"),
    ("empty_response", _mutate(GOOD, id="b", models_output=["a", "  ", "c", "d"]), "models_output[1] is an empty"),
    ("bad_rank", _mutate(GOOD, id="b", final_ranking=[0, 1, 2, 3]), "ranks start at 1"),
    ("no_ranking", _mutate(GOOD, id="b", final_ranking=DROP), "missing field 'final_ranking'"),
    ("null_rank", _mutate(GOOD, id="b", final_ranking=[1, None, 2, 3]), "final_ranking[1] is null"),
    ("duplicate_id", _mutate(GOOD), "duplicate id"),
    ("escaping_image", _mutate(GOOD, id="b", image="../outside.png"), "escapes the data root"),
    ("absolute_image", _mutate(GOOD, id="b", image="/etc/hostname"), "escapes the data root"),
    ("missing_image_file", _mutate(GOOD, id="b", image="short/nope.jpg"), "does not exist"),
    ("corrupt_image", _mutate(GOOD, id="b", image="short/corrupt.jpg"), "cannot be read"),
]


@pytest.mark.parametrize("case,bad,message", BAD, ids=[b[0] for b in BAD])
def test_bad_record_error_names_file_and_line(tmp_path, images, case, bad, message):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad])
    with pytest.raises(RecordError) as info:
        M.run(data, images, tmp_path / "out")
    text = str(info.value)
    assert text.startswith(f"{data}:2"), text
    assert message in text
    if not isinstance(bad, str):
        assert "id=" in text  # the record's id too, once it is known
    assert not (tmp_path / "out").exists()


def test_cli_reports_error_and_exit_code(tmp_path, images, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, _mutate(GOOD, id="b", helpfulness=[1, None, "x", 2])])
    assert run_cli("--input", data, "--images", images, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{data}:2 id=b" in err and "helpfulness[2] is 'x'" in err
    assert run_cli("--input", tmp_path / "nope.jsonl", "--images", images, "--out", tmp_path / "out") == 1
    assert "nope.jsonl: no such input file" in capsys.readouterr().err


def test_json_list_input_names_record_index(tmp_path, images):
    good = tmp_path / "data.json"
    good.write_text(json.dumps(fixture_records()))
    out = tmp_path / "out"
    rep = M.run(good, images, out, val_fraction=0.0)
    assert rep["pairs"]["total"] == 11
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([GOOD, _mutate(GOOD, id="b"), _mutate(GOOD, id="c", question="")]))
    with pytest.raises(RecordError, match=rf"^{bad}: record 2 id=c: 'question' is empty"):
        M.run(bad, images, tmp_path / "out2")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(RecordError, match="broken.json: malformed JSON"):
        M.run(tmp_path / "broken.json", images, tmp_path / "out3")


def test_skip_mode_writes_rejects(tmp_path, images):
    cases = [b for b in BAD if b[0] != "duplicate_id"]
    bad = [b if isinstance(b, str) else _mutate(b, id=f"bad-{i}") for i, (_, b, _) in enumerate(cases)]
    lines = [GOOD, *bad, *fixture_records()[1:]]
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    out = tmp_path / "out"
    assert run_cli("--input", data, "--images", images, "--out", out, "--on-error", "skip",
                   "--val-fraction", "0") == 0
    rejects = read_jsonl(out / "rejects.jsonl")
    errors = [r for r in rejects if r["kind"] != "unsupported_video"]
    assert len(errors) == len(cases)
    for r, (case, _, message), b in zip(errors, cases, bad):
        assert message in r["error"], case
        assert r["where"].startswith(f"{data}:") and r["error"].startswith(r["where"])
        # The record as read: the raw line when it is not JSON, else the parsed value.
        expected = b if case == "malformed_json" else json.loads(b) if isinstance(b, str) else b
        assert json.dumps(r["record"]) == json.dumps(expected)  # (dumps: NaN != NaN as a float)
    assert [r["kind"] for r in rejects].count("unsupported_video") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["rejected"]["total"] == len(cases)
    assert sum(report["rejected"]["by_kind"].values()) == len(cases)
    assert report["rejected"]["by_kind"]["image"] == 4 and report["rejected"]["by_kind"]["bad_score"] == 4
    assert report["prompts"]["total"] == 3 and report["pairs"]["total"] == 11  # the good records all made it
    assert len(read_records(out / "train" / "pairs.jsonl", "preference", data_root=images)) == 11


def test_nothing_importable_is_an_error(tmp_path, images):
    data = write_jsonl(tmp_path / "data.jsonl", [_mutate(GOOD, image="short/nope.jpg")])
    with pytest.raises(RecordError, match="no record could be imported"):
        M.run(data, images, tmp_path / "out", on_error="skip")
    assert not (tmp_path / "out").exists()


def test_failure_leaves_no_partial_output(tmp_path, images):
    out = tmp_path / "out"
    assert run_cli("--input", DATA, "--images", images, "--out", out) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, _mutate(GOOD, id="b", image="short/corrupt.jpg")])
    assert run_cli("--input", data, "--images", images, "--out", out, "--force") == 1
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous complete output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "images", "out", "outside.png"]
    fresh = tmp_path / "fresh"
    assert run_cli("--input", data, "--images", images, "--out", fresh) == 1
    assert not fresh.exists() and not list(tmp_path.glob("fresh.*"))


def test_rerun_is_up_to_date(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--input", DATA, "--images", IMAGES, "--out", out) == 0
    capsys.readouterr()
    assert run_cli("--input", DATA, "--images", IMAGES, "--out", out) == 0
    assert "up to date" in capsys.readouterr().out
    assert run_cli("--input", DATA, "--images", IMAGES, "--out", out, "--weights", "helpfulness=1") == 0
    assert "up to date" not in capsys.readouterr().out  # a new config redoes the work


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("--help")
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("models_output", "final_ranking", "score_reasons", "--weights", "--on-error", "rejects.jsonl",
                 "ranked.jsonl", "pairs.jsonl", "dpo_pairs.jsonl", "chosen_reason", "is_tie", "ties.jsonl",
                 "--format"):
        assert word in text
