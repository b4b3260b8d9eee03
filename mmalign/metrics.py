"""Evaluation statistics: bootstrap intervals, and the word tokens and loop test the metrics share.

Pure functions (numpy only, no model code, no I/O). The caption checker and the CHAIR-style
rates live in :mod:`mmalign.world`; this module turns per-item results into the numbers a
report prints, each with a confidence interval that resamples *items* (questions, captions),
never the mentions inside a caption, because items are the independent units.

Definitions and sources
-----------------------
* Bootstrap: percentile interval (Efron & Tibshirani 1993, "An Introduction to the
  Bootstrap", ch. 13): draw ``n_boot`` resamples of the items with replacement, compute the
  statistic on each, report the ``alpha/2`` and ``1 - alpha/2`` quantiles.
* Micro-averaged rates (CHAIR_i = hallucinated mentions / mentions, Rohrbach et al. 2018)
  resample captions and recompute ``sum(num) / sum(den)`` on each resample.
* Paired differences (checkpoint A minus B on the same items) use the *same* resample indices
  for both, so item difficulty cancels (Koehn 2004, "Statistical Significance Tests for
  Machine Translation Evaluation", paired bootstrap).

The metrics themselves are declared in :mod:`mmalign.eval.summary` (POPE's yes/no scores, CHAIR,
coverage: per-item count columns summarised as micro-averaged rates with these intervals) and
:mod:`mmalign.health` (generation health: length, distinct-n, loops).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

#: Upper bound on resample-index entries held in memory at once (int64: 4M x 8 B = 32 MB).
_CHUNK_ENTRIES = 4_000_000

Stat = Callable[[np.ndarray], float]


# ---------------------------------------------------------------------------------------------
# bootstrap


def _resample_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``[rows, n]`` blocks of item indices drawn with replacement, ``n_boot`` rows in all.

    The block size depends only on ``n``, so one seed always gives the same indices.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ENTRIES // n)
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _bootstrap(arrays: Sequence[Sequence[float] | np.ndarray], replicate: Callable[..., np.ndarray],
               n_boot: int, alpha: float, seed: int) -> tuple[float, float, float]:
    """The one bootstrap loop every public function uses.

    ``arrays``: per-item values, all ``[n]`` and indexed by the same items. ``replicate`` maps
    the arrays resampled to ``[rows, n]`` (one index set applied to all, which is what makes
    paired statistics paired) to ``[rows]`` statistics. Returns the statistic on the full data
    (``replicate`` of the arrays as one row) and the percentile interval of the finite
    replicates (NaN, NaN when there are none).
    """
    arrs = [np.asarray(x, dtype=float) for x in arrays]
    if len({x.shape for x in arrs}) != 1:
        raise ValueError(f"the arrays must score the same items, got shapes {[x.shape for x in arrs]}")
    n = arrs[0].size
    if n == 0:
        raise ValueError("bootstrap needs at least one item")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    boot = np.concatenate([replicate(*(x[idx] for x in arrs)) for idx in _resample_indices(n, n_boot, seed)])
    point = float(replicate(*(x[None, :] for x in arrs))[0])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return point, float("nan"), float("nan")
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)


def _apply(stat: Stat, samples: np.ndarray) -> np.ndarray:
    """``stat`` on each row of ``samples`` ``[rows, n]`` -> ``[rows]``; vectorised for np.mean."""
    if stat is np.mean:
        return samples.mean(axis=1)
    return np.array([stat(row) for row in samples], dtype=float)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Row-wise ``sum(num) / sum(den)`` of ``[rows, n]`` counts, NaN where the denominator is 0
    (the rate is undefined there)."""
    num, den = num.sum(axis=1), den.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1), np.nan)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Stat = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval of ``stat`` over per-item values.

    ``values`` ``[n]``: one number per item, e.g. a 0/1 correctness indicator (then the mean
    is a rate) or a per-caption score. Returns ``(stat(values), low, high)`` where ``low`` and
    ``high`` are the ``alpha/2`` and ``1 - alpha/2`` quantiles (linear interpolation) of
    ``stat`` over ``n_boot`` resamples of the ``n`` items drawn with replacement.
    """
    return _bootstrap([values], lambda v: _apply(stat, v), n_boot, alpha, seed)


def bootstrap_ratio_ci(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Micro-averaged rate ``sum(num) / sum(den)`` with a bootstrap interval over items.

    ``numerators``, ``denominators`` ``[n]``: per-item counts, e.g. hallucinated mentions and
    mentions per caption (CHAIR_i). Items (captions) are resampled, not mentions, since the
    mentions of one caption are not independent. A resample whose denominators sum to 0 has no
    rate and is dropped before taking quantiles; if the full data's denominator is 0 the point
    estimate is NaN (and so, necessarily, are the bounds).
    """
    return _bootstrap([numerators, denominators], _ratio, n_boot, alpha, seed)


def paired_bootstrap_ratio_diff(
    num_a: Sequence[float] | np.ndarray,
    den_a: Sequence[float] | np.ndarray,
    num_b: Sequence[float] | np.ndarray,
    den_b: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b)`` with a paired item bootstrap.

    All four arrays ``[n]`` are indexed by the same items (e.g. captions of the same images by
    two checkpoints); each resample applies one index set to all four. Resamples where either
    rate is undefined (denominator 0) are dropped, as in :func:`bootstrap_ratio_ci`.
    """
    return _bootstrap([num_a, den_a, num_b, den_b], lambda na, da, nb, db: _ratio(na, da) - _ratio(nb, db),
                      n_boot, alpha, seed)


# ---------------------------------------------------------------------------------------------
# text


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters, digits and apostrophes (punctuation dropped)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(toks: Sequence[str], k: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + k]) for i in range(len(toks) - k + 1)]


def has_loop(toks: Sequence[str], n: int = 3, min_repeats: int = 3) -> bool:
    """True when some ``k``-word n-gram (``1 <= k <= n``) occurs ``min_repeats`` times back to back.

    "a red a red a red" -> the bigram ("a", "red") three times in a row -> True.
    """
    for k in range(1, n + 1):
        span = k * min_repeats
        for i in range(len(toks) - span + 1):
            head = list(toks[i:i + k])
            if all(list(toks[i + j * k:i + (j + 1) * k]) == head for j in range(1, min_repeats)):
                return True
    return False
