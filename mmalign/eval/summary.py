"""Per-item scores -> rates with 95% bootstrap intervals, and paired differences between runs.

Every metric the evaluation reports is a ratio of per-item sums, ``sum(num) / sum(den)`` over
the items of one section (a caption set or a yes/no split), so one routine gives every rate its
interval (:func:`mmalign.metrics.bootstrap_ratio_ci`: items are resampled, never the mentions
inside an item) and every comparison its paired interval
(:func:`mmalign.metrics.paired_bootstrap_ratio_diff`). A per-item rate (CHAIR_s, accuracy) is
the special case ``den = 1``. The one pooled statistic that is not a ratio of per-item sums,
distinct-n, has its own resampling loop (:func:`distinct_ci`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmalign.metrics import _bootstrap, _ngrams, bootstrap_ratio_ci, paired_bootstrap_ratio_diff, words


@dataclass(frozen=True)
class Metric:
    """``sum(row[num]) / sum(row[den])`` over a section's rows (``den=None``: per-item mean).

    ``better`` says which direction is an improvement ("lower", "higher" or "" for neither) and
    ``percent`` whether to print it as a percentage.
    """

    key: str
    label: str
    num: str
    den: str | None = None
    better: str = "lower"
    percent: bool = True

    def arrays(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        num = np.array([float(r[self.num]) for r in rows])
        den = np.ones_like(num) if self.den is None else np.array([float(r[self.den]) for r in rows])
        return num, den


def _m(*args: Any, **kw: Any) -> Metric:
    return Metric(*args, **kw)


#: Generation health (every generative section): collapse shows up here first.
HEALTH: tuple[Metric, ...] = (
    _m("mean_words", "mean length (words)", "words", better="", percent=False),
    _m("loop_rate", "repeated n-gram loop", "loop"),
    _m("empty_rate", "empty responses", "empty"),
)

#: Captions scored against a scene graph (:func:`mmalign.eval.world_bench.score_caption`).
WORLD_CAPTION: tuple[Metric, ...] = (
    _m("chair_i", "CHAIR_i", "obj_hallucinated", "obj_mentions"),
    _m("chair_s", "CHAIR_s", "obj_any"),
    _m("object_cover", "Cover (object)", "obj_covered", "obj_gt", "higher"),
    _m("object_cog", "Cog (object)", "obj_cog", "obj_cog_listed"),
    _m("attribute_error_rate", "attribute errors / attribute claims", "attr_wrong", "attr_claims"),
    _m("attribute_hal", "Hal (attribute)", "attr_any"),
    _m("attribute_cover", "Cover (attribute)", "attr_covered", "attr_gt", "higher"),
    _m("attribute_cog", "Cog (attribute)", "attr_cog", "attr_cog_listed"),
    _m("relation_error_rate", "relation errors / relation claims", "rel_wrong", "rel_claims"),
    _m("relation_hal", "Hal (relation)", "rel_any"),
    _m("relation_cover", "Cover (relation)", "rel_covered", "rel_gt", "higher"),
    _m("relation_cog", "Cog (relation)", "rel_cog", "rel_cog_listed"),
    _m("hal_any", "Hal (any type)", "any_hallucination"),
    _m("exact_caption_rate", "exact caption", "exact", better="higher"),
    _m("count_accuracy", "stated object count right", "count_correct", "count_stated", "higher"),
    *HEALTH,
)

#: Captions scored against a list of ground-truth objects (COCO instances for CHAIR; AMBER).
OBJECT_CAPTION: tuple[Metric, ...] = (
    _m("chair_i", "CHAIR_i", "obj_hallucinated", "obj_mentions"),
    _m("chair_s", "CHAIR_s (= AMBER Hal)", "obj_any"),
    _m("object_cover", "Cover", "obj_covered", "obj_gt", "higher"),
    *HEALTH,
)
AMBER_CAPTION: tuple[Metric, ...] = OBJECT_CAPTION[:3] + (
    _m("object_cog", "Cog", "obj_cog", "obj_cog_listed"),
) + HEALTH

#: POPE (Li et al. 2023): "yes" is the positive class. F1 = 2TP / (2TP + FP + FN).
YESNO: tuple[Metric, ...] = (
    _m("accuracy", "accuracy", "correct", better="higher"),
    _m("precision", "precision", "tp", "said_yes", "higher"),
    _m("recall", "recall", "tp", "yes_parsed", "higher"),
    _m("f1", "F1", "f1_num", "f1_den", "higher"),
    _m("yes_ratio", "yes-ratio", "said_yes", "parsed", ""),
    _m("unparsed_rate", "unparsed answers", "unparsed"),
)
#: AMBER's discriminative scores take "no" as the positive class (its inference.py).
YESNO_AMBER: tuple[Metric, ...] = YESNO[:1] + (
    _m("precision_no", "precision (no = positive, AMBER)", "tn", "said_no", "higher"),
    _m("recall_no", "recall (no = positive, AMBER)", "tn", "no_parsed", "higher"),
    _m("f1_no", "F1 (no = positive, AMBER)", "f1no_num", "f1no_den", "higher"),
) + YESNO[1:]

#: Judge-rated sections (MMHal-Bench style): mean 0-6 rating and share rated < 3.
JUDGE: tuple[Metric, ...] = (
    _m("judge_score", "judge rating (0-6)", "judge_rating", better="higher", percent=False),
    _m("judge_hallucination_rate", "judge: hallucination (rating < 3)", "judge_hallucination"),
)


def yesno_row(pred: bool | None, label: bool) -> dict[str, int]:
    """Per-question columns for :data:`YESNO` (an unparsed answer is wrong and in no confusion cell)."""
    parsed = pred is not None
    tp = int(parsed and pred and label)
    fp = int(parsed and pred and not label)
    fn = int(parsed and not pred and label)
    tn = int(parsed and not pred and not label)
    return {
        "correct": tp + tn, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "said_yes": tp + fp, "said_no": tn + fn, "yes_parsed": tp + fn, "no_parsed": tn + fp,
        "f1_num": 2 * tp, "f1_den": 2 * tp + fp + fn, "f1no_num": 2 * tn, "f1no_den": 2 * tn + fn + fp,
        "parsed": int(parsed), "unparsed": int(not parsed),
    }


def _interval(point: float, low: float, high: float, n: int) -> dict[str, float]:
    return {"value": point, "low": low, "high": high, "n": n}


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[Metric], n_boot: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric.key: {"value", "low", "high", "n"}}`` with 95% percentile intervals.

    ``n`` is the number of items whose denominator is non-zero (e.g. captions that made any
    attribute claim); a metric with no such item has value NaN.
    """
    out: dict[str, dict[str, float]] = {}
    if not rows:
        return out
    for m in metrics:
        if not all(m.num in r and (m.den is None or m.den in r) for r in rows):
            continue
        num, den = m.arrays(rows)
        out[m.key] = _interval(*bootstrap_ratio_ci(num, den, n_boot=n_boot, seed=seed), n=int((den != 0).sum()))
    return out


def _ngram_ids(texts: Sequence[str], n: int) -> list[np.ndarray]:
    vocab: dict[tuple[str, ...], int] = {}
    return [np.array([vocab.setdefault(g, len(vocab)) for g in _ngrams(words(t), n)], dtype=np.int64) for t in texts]


def distinct_ci(texts: Sequence[str], n: int, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Distinct-n (unique n-grams / n-grams, pooled over the responses; Li et al. 2016) with a
    bootstrap interval over responses. The n-grams of a resample are pooled with multiplicity:
    a response drawn twice adds its n-grams twice, which lowers distinct-n as real duplicates do."""
    ids = _ngram_ids(texts, n)

    def replicate(idx: np.ndarray) -> np.ndarray:
        vals = []
        for row in idx.astype(np.int64):
            pooled = np.concatenate([ids[i] for i in row]) if len(row) else np.zeros(0, np.int64)
            vals.append(np.unique(pooled).size / pooled.size if pooled.size else np.nan)
        return np.array(vals)

    point, low, high = _bootstrap([np.arange(len(texts))], replicate, n_boot, 0.05, seed)
    return _interval(point, low, high, len(texts))


def paired_diff(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]],
                metrics: Sequence[Metric], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``metric(B) - metric(A)`` on the same items, with a paired bootstrap interval.

    Rows are matched by their ``id``; both runs must hold exactly the same ids (two checkpoints
    evaluated on the same questions), else a ValueError says how many differ.
    """
    by_id = {r["id"]: r for r in rows_b}
    ids_a = [r["id"] for r in rows_a]
    missing = [i for i in ids_a if i not in by_id]
    extra = len(by_id) - (len(ids_a) - len(missing))
    if missing or extra:
        raise ValueError(f"the runs were not evaluated on the same items: {len(missing)} only in the first "
                         f"(e.g. {missing[:3]}), {extra} only in the second")
    rows_b = [by_id[i] for i in ids_a]
    out = {}
    for m in metrics:
        if not all(m.num in r and (m.den is None or m.den in r) for r in (*rows_a, *rows_b)):
            continue
        na, da = m.arrays(rows_a)
        nb, db = m.arrays(rows_b)
        out[m.key] = _interval(*paired_bootstrap_ratio_diff(nb, db, na, da, n_boot=n_boot, seed=seed), n=len(ids_a))
    return out


#: Metric sets by name; a section stores its set's name so `eval compare` can recompute it.
METRIC_SETS: dict[str, tuple[Metric, ...]] = {
    "world_caption": WORLD_CAPTION,
    "object_caption": OBJECT_CAPTION,
    "amber_caption": AMBER_CAPTION,
    "yesno": YESNO,
    "yesno_amber": YESNO_AMBER,
}
