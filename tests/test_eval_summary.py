"""Per-item rows -> rates with intervals; paired differences; intervals cover the truth."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.eval import summary as S
from mmalign.health import generation_health
from mmalign.metrics import bootstrap_ratio_ci


def test_yesno_rows_reproduce_pope_metrics_by_hand():
    """Predictions yes, yes, no, None, no, yes against labels yes, no, no, yes, yes, yes:
    TP = 2 (items 0, 5), FP = 1 (item 1), TN = 1 (item 2), FN = 1 (item 4), 1 unparsed.
    accuracy 3/6, precision 2/3, recall 2/3, F1 = 2*2 / (2*2 + 1 + 1) = 2/3, yes-ratio 3/5."""
    preds = [True, True, False, None, False, True]
    labels = [True, False, False, True, True, True]
    rows = [S.yesno_row(p, y) for p, y in zip(preds, labels)]
    got = {k: v["value"] for k, v in S.summarize(rows, S.YESNO, n_boot=50).items()}
    assert got["accuracy"] == pytest.approx(3 / 6)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3) and got["yes_ratio"] == pytest.approx(3 / 5)
    assert got["unparsed_rate"] == pytest.approx(1 / 6)
    # AMBER's "no is positive": TN = 1 of 2 said-no (precision 1/2), of 2 parsed true-no (recall 1/2).
    amber = {k: v["value"] for k, v in S.summarize(rows, S.YESNO_AMBER, n_boot=50).items()}
    assert amber["precision_no"] == pytest.approx(1 / 2) and amber["recall_no"] == pytest.approx(1 / 2)
    assert amber["f1_no"] == pytest.approx(1 / 2)


def test_ratio_metric_is_micro_averaged():
    """CHAIR_i over captions with (hallucinated, mentions) = (1, 4), (0, 2), (3, 3): 4/9, not the
    mean of 1/4, 0, 1; CHAIR_s = 2/3."""
    rows = [{"obj_hallucinated": h, "obj_mentions": m, "obj_any": int(h > 0), "obj_gt": 1, "obj_covered": 1}
            for h, m in ((1, 4), (0, 2), (3, 3))]
    got = S.summarize(rows, S.OBJECT_CAPTION[:3], n_boot=200)
    assert got["chair_i"]["value"] == pytest.approx(4 / 9)
    assert got["chair_s"]["value"] == pytest.approx(2 / 3)
    assert got["chair_i"]["low"] <= 4 / 9 <= got["chair_i"]["high"]
    assert got["chair_i"]["n"] == 3


def test_distinct_matches_generation_health():
    texts = ["a red circle", "a red circle and a blue star", "two squares", ""]
    h = generation_health(texts)
    assert S.distinct_ci(texts, 1, n_boot=100)["value"] == pytest.approx(h["distinct1"])
    assert S.distinct_ci(texts, 2, n_boot=100)["value"] == pytest.approx(h["distinct2"])
    d = S.distinct_ci(["a a a a"] * 5, 1, n_boot=100)
    assert d["value"] == pytest.approx(1 / 20) and d["low"] == d["high"] == pytest.approx(1 / 20)


def test_paired_diff_identical_is_zero_and_ids_must_match():
    rows = [{"id": str(i), **S.yesno_row(i % 3 == 0, i % 2 == 0)} for i in range(30)]
    d = S.paired_diff(rows, list(reversed(rows)), S.YESNO, n_boot=100)
    assert all(v["value"] == v["low"] == v["high"] == 0 for v in d.values())
    better = [{**r, **S.yesno_row(int(r["id"]) % 2 == 0, int(r["id"]) % 2 == 0)} for r in rows]
    d = S.paired_diff(rows, better, S.YESNO, n_boot=200)
    assert d["accuracy"]["value"] == pytest.approx(1 - np.mean([r["correct"] for r in rows]))
    assert d["accuracy"]["low"] > 0
    with pytest.raises(ValueError, match="not evaluated on the same items: 1 only in the first"):
        S.paired_diff(rows, rows[1:], S.YESNO)


@pytest.mark.parametrize("kind", ["rate", "ratio"])
def test_intervals_cover_the_truth_on_simulated_data(kind):
    """Draw 200 data sets from a known process and count how often the 95% interval holds the
    true value. "rate": 150 yes/no items correct with p = 0.7. "ratio" (CHAIR_i-like): 150
    captions with Poisson(3) + 1 mentions each, each hallucinated with p = 0.2, so the true
    micro rate is 0.2. A correct 95% interval covers about 190 of 200 times; the binomial
    spread of that count is ~3, so [176, 199] is a generous but failing-capable band (an
    interval half as wide covers ~70%)."""
    rng = np.random.default_rng(123)
    hits = 0
    for rep in range(200):
        if kind == "rate":
            num, den, truth = rng.random(150) < 0.7, np.ones(150), 0.7
        else:
            den = rng.poisson(3, 150) + 1
            num, truth = rng.binomial(den, 0.2), 0.2
        _, lo, hi = bootstrap_ratio_ci(num, den, n_boot=500, seed=rep)
        hits += lo <= truth <= hi
    assert 176 <= hits <= 199, hits


def test_chair_on_coco_captions_by_hand():
    """Image 1 holds {person, dog}; image 2 holds {dining table, cup}.
    "Two men walk a dog past a cat." -> person (men), dog, cat: 3 mentions, cat hallucinated.
    "Two cups sit on the wooden table." -> cup (plural), dining table (synonym): 0 hallucinated.
    CHAIR_i = 1 / 5, CHAIR_s = 1 / 2; Cover = (2 + 2) / (2 + 2) = 1."""
    from mmalign.eval.runner import _object_row
    from mmalign.eval.vocab import ObjectVocabulary

    vocab = ObjectVocabulary.coco()
    rows = [_object_row([m.category for m in vocab.extract(text)], truth) for text, truth in (
        ("Two men walk a dog past a cat.", {"person", "dog"}),
        ("Two cups sit on the wooden table.", {"dining table", "cup"}))]
    assert rows[0]["obj_mentions"] == 3 and rows[0]["obj_hallucinated"] == 1 and rows[1]["obj_hallucinated"] == 0
    got = S.summarize(rows, S.OBJECT_CAPTION[:3], n_boot=50)
    assert got["chair_i"]["value"] == pytest.approx(1 / 5)
    assert got["chair_s"]["value"] == pytest.approx(1 / 2)
    assert got["object_cover"]["value"] == pytest.approx(1.0)
