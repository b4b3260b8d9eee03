"""Metrics: hand-derived POPE and diversity numbers, loop detection, bootstrap properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmalign.eval import summary as S
from mmalign.health import generation_health
from mmalign.metrics import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    has_loop,
    paired_bootstrap_ratio_diff,
    words,
)
from mmalign.world import parse_yes_no

# ---------------------------------------------------------------------------------------------
# yes/no (POPE)


def _yes_no(preds, labels):
    """POPE scores as the evaluation computes them: per-question rows, summed."""
    rows = [S.yesno_row(p, y) for p, y in zip(preds, labels, strict=True)]
    got = {k: v["value"] for k, v in S.summarize(rows, S.YESNO, n_boot=20).items()}
    counts = {k: sum(r[k] for r in rows) for k in ("tp", "fp", "tn", "fn", "unparsed")}
    return got, counts


def test_yes_no_metrics_by_hand():
    """Six items, one unparseable.

    accuracy  = (TP+TN)/n = 3/6 = 0.5
    precision = 2/(2+1) = 2/3, recall = 2/(2+1) = 2/3, F1 = 2/3
    yes_ratio = yes / parsed = 3/5 = 0.6
    """
    answers = ["Yes.", "yes, there is", "No.", "Maybe.", "YES", "no"]
    preds = [parse_yes_no(a) for a in answers]
    assert preds == [True, True, False, None, True, False]
    m, c = _yes_no(preds, [True, False, False, True, True, True])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert (c["tp"], c["fp"], c["tn"], c["fn"], c["unparsed"]) == (2, 1, 1, 1, 1)


def test_yes_no_metrics_degenerate():
    """All-"no" answers: no predicted positives -> precision 0/0 is undefined (NaN, reported as
    such rather than as 0), recall 0/1 = 0, F1 0/1 = 0. All unparsed: accuracy 0/2 = 0,
    yes_ratio 0/0 undefined. No rows: no metrics."""
    m, _ = _yes_no([False, False], [True, False])
    assert (m["accuracy"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0)
    assert math.isnan(m["precision"])
    m, c = _yes_no([None, None], [True, False])
    assert m["accuracy"] == 0.0 and math.isnan(m["yes_ratio"]) and c["unparsed"] == 2
    assert S.summarize([], S.YESNO) == {}
    with pytest.raises(ValueError):
        _yes_no([True], [True, False])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([True, False, None]), st.booleans()), max_size=40))
def test_yes_no_metrics_properties(pairs):
    """Rates lie in [0, 1]; counts add up to n; accuracy = (TP+TN)/n."""
    preds = [p for p, _ in pairs]
    labels = [y for _, y in pairs]
    m, c = _yes_no(preds, labels)
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert k not in m or math.isnan(m[k]) or 0.0 <= m[k] <= 1.0
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] + c["unparsed"] == len(pairs)
    if pairs:
        assert m["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / len(pairs))


# ---------------------------------------------------------------------------------------------
# generation health


def test_generation_health_by_hand():
    """Two texts.

    "a red circle and a red square." -> a red circle and a red square (7 words)
        bigrams: (a red) (red circle) (circle and) (and a) (a red) (red square)  = 6
    "A red circle."                  -> a red circle (3 words)
        bigrams: (a red) (red circle)                                             = 2
    mean_words = (7+3)/2 = 5
    distinct-1 = |{a, red, circle, and, square}| / 10 = 5/10 = 0.5
    distinct-2 = |{a red, red circle, circle and, and a, red square}| / 8 = 5/8
    no loops, no empties.
    """
    h = generation_health(["a red circle and a red square.", "A red circle."])
    assert h["mean_words"] == pytest.approx(5.0)
    assert h["distinct1"] == pytest.approx(0.5)
    assert h["distinct2"] == pytest.approx(5 / 8)
    assert h["loop_rate"] == 0.0
    assert h["empty_rate"] == 0.0


def test_generation_health_collapse():
    """Four texts: one loop ("a red" x3), one empty, one punctuation-only (empty too), one fine.
    loop_rate = 1/4, empty_rate = 2/4, mean_words = (6+0+0+3)/4 = 2.25."""
    h = generation_health(["a red a red a red", "", " ... ", "A blue star."])
    assert h["loop_rate"] == pytest.approx(0.25)
    assert h["empty_rate"] == pytest.approx(0.5)
    assert h["mean_words"] == pytest.approx(2.25)
    assert generation_health([]) == {"mean_words": 0.0, "loop_rate": 0.0, "empty_rate": 0.0, "distinct1": 0.0,
                                     "distinct2": 0.0}


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("a red a red a red", 3, True),  # bigram x3
        ("a red a red", 3, False),  # bigram only x2
        ("the the the circle", 3, True),  # unigram x3
        ("a b c a b c a b c", 3, True),  # trigram x3
        ("a b c a b c a b c", 2, False),  # trigram loop invisible when only n <= 2 is checked
        ("a red circle and a red square and a red star", 3, False),  # repeats, but not back to back
        ("There is a red circle left of a blue star.", 3, False),
    ],
)
def test_has_loop(text, n, expected):
    assert has_loop(words(text), n=n, min_repeats=3) is expected


def test_has_loop_min_repeats():
    """"a red a red" repeats the bigram twice: a loop at min_repeats=2, not at 3."""
    assert has_loop(words("a red a red"), min_repeats=2)
    assert not has_loop(words("a red a red"), min_repeats=3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="ab .", max_size=20), max_size=8))
def test_generation_health_bounds(texts):
    h = generation_health(texts)
    for k in ("distinct1", "distinct2", "loop_rate", "empty_rate"):
        assert 0.0 <= h[k] <= 1.0


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_two_items_by_hand():
    """Values {0, 1}: a resample of 2 has mean 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so
    with 2000 resamples the 2.5% quantile is 0 and the 97.5% quantile is 1; point = 0.5."""
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_contains_point_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = (rng.random(200) < 0.3).astype(float)
    point, low, high = bootstrap_ci(x)
    assert point == pytest.approx(x.mean())
    assert low < point < high
    assert bootstrap_ci(x, seed=0) == (point, low, high)
    assert bootstrap_ci(x, seed=1) != (point, low, high)


def test_bootstrap_constant_has_zero_width():
    """Every resample of a constant is that constant: low == point == high (exactly; the value
    itself is 0.7 up to the rounding of a float mean)."""
    point, low, high = bootstrap_ci([0.7] * 50)
    assert low == point == high == pytest.approx(0.7)
    assert bootstrap_ratio_ci([1, 2, 3], [2, 4, 6]) == (0.5, 0.5, 0.5)


def test_bootstrap_wider_with_fewer_items():
    """Width of a rate's CI shrinks like 1/sqrt(n): 50 items vs 2000 items, p = 0.3."""
    rng = np.random.default_rng(2)
    x = (rng.random(2000) < 0.3).astype(float)
    _, lo_small, hi_small = bootstrap_ci(x[:50])
    _, lo_big, hi_big = bootstrap_ci(x)
    assert hi_small - lo_small > 3 * (hi_big - lo_big)


def test_bootstrap_custom_stat():
    """A non-mean statistic goes through the per-row path: median of 1..5 is 3."""
    point, low, high = bootstrap_ci([1, 2, 3, 4, 5], stat=np.median, n_boot=300)
    assert point == 3.0 and low <= 3.0 <= high


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], alpha=1.5)
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1, 2], [3])
    with pytest.raises(ValueError):
        paired_bootstrap_ratio_diff([1, 2], [1, 1], [1], [1])


def test_ratio_ci_by_hand():
    """CHAIR_i-style micro average: hallucinated (1, 0, 2) over mentions (2, 3, 5) = 3/10 = 0.3.
    It weights captions by mentions, unlike the macro mean of per-caption rates:
    (1, 0) over (1, 9) -> micro 1/10 = 0.1, whereas macro (1/1 + 0/9)/2 = 0.5."""
    assert bootstrap_ratio_ci([1, 0, 2], [2, 3, 5])[0] == pytest.approx(0.3)
    point, low, high = bootstrap_ratio_ci([1, 0], [1, 9])
    assert point == pytest.approx(0.1)
    assert low <= point <= high


def test_ratio_ci_matches_mean_with_unit_denominators():
    """With every denominator 1, sum(num)/sum(den) is the mean: same indices, same interval."""
    rng = np.random.default_rng(3)
    x = (rng.random(100) < 0.4).astype(float)
    assert bootstrap_ratio_ci(x, np.ones_like(x)) == pytest.approx(bootstrap_ci(x))


def test_ratio_ci_zero_denominators():
    """Item 0 has no mentions; resamples holding only item 0 (prob 1/4) are undefined and dropped.
    All denominators 0: the rate itself is undefined -> NaN."""
    point, low, high = bootstrap_ratio_ci([0, 1], [0, 2])
    assert point == 0.5 and (low, high) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ratio_ci([0, 0], [0, 0]))


def test_paired_diff_identical_is_exactly_zero():
    rng = np.random.default_rng(4)
    x = rng.random(100)
    assert paired_bootstrap_ratio_diff(x, np.ones_like(x), x, np.ones_like(x)) == (0.0, 0.0, 0.0)
    num, den = rng.integers(0, 3, 100), rng.integers(1, 6, 100)
    assert paired_bootstrap_ratio_diff(num, den, num, den) == (0.0, 0.0, 0.0)


def test_paired_narrower_than_unpaired():
    """b = a + 0.05 + small noise on the same items: item difficulty (sd 1) cancels in the
    paired difference, so its CI is far narrower than sqrt(w_a^2 + w_b^2), the width of an
    unpaired difference of two independent means."""
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 1.0, 300)
    b = a + 0.05 + rng.normal(0.0, 0.05, 300)
    ones = np.ones_like(a)
    diff, low, high = paired_bootstrap_ratio_diff(b, ones, a, ones)  # unit denominators: a difference of means
    assert diff == pytest.approx(b.mean() - a.mean())
    assert low < diff < high and low > 0.0  # the 0.05 shift is detected
    _, la, ha = bootstrap_ci(a)
    _, lb, hb = bootstrap_ci(b)
    assert high - low < 0.2 * math.hypot(ha - la, hb - lb)


def test_paired_ratio_diff_by_hand():
    """A: 2 hallucinated of 10 mentions = 0.2; B: 5 of 10 = 0.5; A - B = -0.3."""
    diff, low, high = paired_bootstrap_ratio_diff([1, 1], [5, 5], [2, 3], [5, 5])
    assert diff == pytest.approx(-0.3)
    assert low <= diff <= high


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=30), st.integers(0, 10))
def test_bootstrap_ci_properties(values, seed):
    """Ordered bounds around the point, inside the data's range; a paired diff with itself is 0."""
    point, low, high = bootstrap_ci(values, n_boot=200, seed=seed)
    eps = 1e-9
    assert min(values) - eps <= low <= point + eps
    assert point - eps <= high <= max(values) + eps
    ones = [1.0] * len(values)
    assert paired_bootstrap_ratio_diff(values, ones, values, ones, n_boot=50, seed=seed) == (0.0, 0.0, 0.0)
