"""mmalign.ranking: the ranking / pair logic shared by the prefs stage and the MM-RLHF importer.

Every expected value here is worked out by hand (the split hashes from the sha256 prefixes given
in the comments).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mmalign import ranking as R
from mmalign.records import PreferenceRecord

# ---------------------------------------------------------------------------------------------
# parse_weights


def test_parse_weights_open_names_keep_the_given_order():
    assert R.parse_weights("faithfulness=0.7, helpfulness=0.3") == {"faithfulness": 0.7, "helpfulness": 0.3}
    assert list(R.parse_weights("b=1,a=2")) == ["b", "a"]
    assert R.parse_weights("a=0,b=2") == {"a": 0.0, "b": 2.0}  # a zero weight is kept
    assert R.parse_weights("a=1,") == {"a": 1.0}  # an empty item is ignored


def test_parse_weights_fixed_dimensions_fill_zeros_and_take_aliases():
    dims, aliases = ("faithfulness", "helpfulness", "ethical"), {"ethics": "ethical"}
    got = R.parse_weights("ethics=0.5,faithfulness=2", dims, aliases)
    assert got == {"faithfulness": 2.0, "helpfulness": 0.0, "ethical": 0.5}
    assert list(got) == list(dims)  # the dimensions' order, not the text's
    with pytest.raises(ValueError, match="'speed' is not one of faithfulness, helpfulness, ethical"):
        R.parse_weights("speed=1", dims, aliases)
    with pytest.raises(ValueError, match="given twice"):
        R.parse_weights("ethical=1,ethics=1", dims, aliases)  # an alias is the same dimension


@pytest.mark.parametrize("bad", ["a", "=1", "a=", "a=x", "a=-1", "a=nan", "a=inf", "a=0", "a=0,b=0", "",
                                 "a=1,a=2"])
def test_parse_weights_refuses(bad):
    with pytest.raises(ValueError, match="^--weights"):
        R.parse_weights(bad)


# ---------------------------------------------------------------------------------------------
# overall, rank


def test_overall_is_the_weighted_mean():
    assert R.overall({"f": 1.0, "h": 4.0}, {"f": 1.0, "h": 2.0}) == 3.0  # (1*1 + 2*4) / 3
    assert R.overall({"f": 1.0, "h": 0.0}, {"f": 0.7, "h": 0.3}) == 0.7
    assert R.overall({"f": 2.0, "h": 5.0}, {"f": 1.0, "h": 0.0}) == 2.0  # weight 0: not in the mean
    assert R.overall({"f": 4.0}, {"f": 1.0, "h": 1.0}) == 4.0  # no score: drops out of the mean
    assert R.overall({"f": 4.0, "x": 9.0}, {"f": 1.0}) == 4.0  # unweighted dimension: ignored


def test_overall_rounds_only_when_asked():
    scores, weights = {"a": 0.1, "b": 0.2}, {"a": 1.0, "b": 1.0}
    assert R.overall(scores, weights) == (0.1 + 0.2) / 2 != 0.15  # float noise: 0.15000000000000002
    assert R.overall(scores, weights, ndigits=10) == 0.15


def test_overall_without_a_weighted_score_is_an_error():
    with pytest.raises(ValueError, match="no score in a dimension with weight > 0"):
        R.overall({"h": 1.0}, {"f": 1.0, "h": 0.0})


def test_rank_best_first_ties_in_input_order_or_by_tie_break():
    rs = [{"name": n, "overall": o, "human": h} for n, o, h in
          [("a", 0.5, 3), ("b", 0.9, 1), ("c", 0.5, 2), ("d", 0.1, 4), ("e", 0.5, None)]]
    assert [r["name"] for r in R.rank(rs)] == ["b", "a", "c", "e", "d"]
    by_human = R.rank(rs, tie_break=lambda r: 99 if r["human"] is None else r["human"])
    assert [r["name"] for r in by_human] == ["b", "c", "a", "e", "d"]
    objs = [SimpleNamespace(overall=o) for o in (1.0, 3.0, 2.0)]  # attributes work as well as keys
    assert [r.overall for r in R.rank(objs)] == [3.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# split_of


def test_split_of_hashes_the_id():
    # sha256("p1") starts f64551fcd6f07823: 0xf64551fcd6f07823 / 2**64 = 0.96199...
    assert R.split_of("p1", 0.96) == "train"
    assert R.split_of("p1", 0.97) == "val"
    # with a seed the key is "<seed>:<id>"; sha256("7:p1") starts 75ca76f9a667f4b1 -> 0.46012...
    assert R.split_of("p1", 0.46, seed=7) == "train"
    assert R.split_of("p1", 0.47, seed=7) == "val"
    assert R.split_of("p1", 0.47, seed="7") == "val"
    for i in range(20):
        assert R.split_of(f"p{i}", 0.0) == "train" and R.split_of(f"p{i}", 1.0) == "val"


def test_split_of_without_seed_nests_val():
    ids = [f"prompt-{i}" for i in range(200)]
    small = {p for p in ids if R.split_of(p, 0.1) == "val"}
    large = {p for p in ids if R.split_of(p, 0.3) == "val"}
    assert small and small < large


# ---------------------------------------------------------------------------------------------
# pairs


def _resp(text, overall, **extra):
    return {"text": text, "overall": overall, "scores": {"f": overall}, "critique": f"on {text}",
            "source": "sample", **extra}


def test_assistant_message():
    assert R.assistant_message("hi") == [{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]


def test_ranked_pairs_all_strict_pairs_with_meta():
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    ranked = [_resp("A", 0.9, human_rank=1), _resp("B", 0.5, human_rank=3), _resp("C", 0.5, human_rank=2)]
    recs = R.ranked_pairs("p", ("img.png",), prompt, ranked, response_meta=("human_rank",), meta={"task": "qa"})
    # B and C tie: (0, 1) and (0, 2) only
    assert [r.id for r in recs] == ["p-0-1", "p-0-2"]
    rec = recs[1]
    assert rec.images == ["img.png"] and rec.prompt == prompt
    assert rec.chosen == R.assistant_message("A") and rec.rejected == R.assistant_message("C")
    assert (rec.score_chosen, rec.score_rejected) == (0.9, 0.5)
    assert list(rec.meta.items()) == [
        ("prompt_id", "p"), ("chosen_rank", 0), ("rejected_rank", 2),
        ("scores_chosen", {"f": 0.9}), ("scores_rejected", {"f": 0.5}),
        ("critique_chosen", "on A"), ("critique_rejected", "on C"),
        ("source_chosen", "sample"), ("source_rejected", "sample"),
        ("human_rank_chosen", 1), ("human_rank_rejected", 2), ("task", "qa")]
    # the JSON is a valid preference record
    back = PreferenceRecord.from_json(rec.to_json(), "test", max_chars=None)
    assert back.meta == rec.meta and back.chosen == rec.chosen


def test_ranked_pairs_min_margin_and_objects():
    ranked = [SimpleNamespace(**_resp(t, o)) for t, o in [("A", 0.9), ("B", 0.85), ("C", 0.1)]]
    ids = [r.id for r in R.ranked_pairs("q", [], [], ranked)]
    assert ids == ["q-0-1", "q-0-2", "q-1-2"]  # 3 distinct scores: 3 * 2 / 2 pairs
    ids = [r.id for r in R.ranked_pairs("q", [], [], ranked, min_margin=0.1)]
    assert ids == ["q-0-2", "q-1-2"]  # 0.9 - 0.85 = 0.05 < 0.1
    assert R.ranked_pairs("q", [], [], ranked[:1]) == []


# ---------------------------------------------------------------------------------------------
# distribution


def test_distribution_quartiles_interpolate():
    assert R.distribution([5, 1, 4, 2, 3]) == {"n": 5, "min": 1, "p25": 2.0, "median": 3.0, "p75": 4.0,
                                               "max": 5, "mean": 3.0}
    # [1, 2]: positions 0.25, 0.5, 0.75 between the two values
    d = R.distribution([2.0, 1.0])
    assert (d["p25"], d["median"], d["p75"], d["mean"]) == (1.25, 1.5, 1.75, 1.5)
    assert R.distribution([7.0]) == {"n": 1, "min": 7.0, "p25": 7.0, "median": 7.0, "p75": 7.0, "max": 7.0,
                                     "mean": 7.0}
    assert R.distribution([]) == {"n": 0}


def test_distribution_rounding_and_histogram():
    d = R.distribution([0.12345, 0.2], ndigits=4)
    assert d["min"] == 0.12345 and d["max"] == 0.2  # values seen: not rounded
    assert d["mean"] == 0.1617  # 0.161725
    assert d["median"] == 0.1617  # 0.12345 + 0.07655 / 2 = 0.161725
    assert R.distribution([1, 1, 2, 0.5], histogram_max=3)["histogram"] == {"0.5": 1, "1": 2, "2": 1}
    assert "histogram" not in R.distribution([1, 1, 2, 0.5], histogram_max=2)
    assert "histogram" not in R.distribution([1, 1, 2])


# ---------------------------------------------------------------------------------------------
# command line, imports


def _parser():
    ap = argparse.ArgumentParser(prog="stage")
    ap.add_argument("--weights", default="a=1")
    return ap


def test_parse_stage_args(capsys):
    args, weights = R.parse_stage_args(_parser(), ["--weights", "a=2,b=1", "--force"])
    assert args.force is True and weights == {"a": 2.0, "b": 1.0}
    args, weights = R.parse_stage_args(_parser(), [], dimensions=("b", "a"))
    assert args.force is False and weights == {"b": 0.0, "a": 1.0}
    with pytest.raises(SystemExit) as e:
        R.parse_stage_args(_parser(), ["--weights", "a=-1"])
    assert e.value.code == 2
    assert "stage: error: --weights 'a=-1'" in capsys.readouterr().err


def test_importing_ranking_does_not_import_torch():
    code = "import sys, mmalign.ranking; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
