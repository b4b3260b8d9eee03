"""Generation health: the signals of a collapsed policy, in one place.

Preference optimisation and PPO can "win" their objective by degenerating: shorter answers,
fewer distinct words, loops, empty answers. The evaluation reports the per-answer columns
(:func:`health_row`), and DPO-family and PPO training probe a fixed prompt set every few steps
(:func:`generation_health`) and compare it with the step-0 probe (:func:`collapsed`).

Tokens are :func:`mmalign.metrics.words` (lower-cased, punctuation dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmalign.metrics import has_loop, words


def health_row(text: str) -> dict[str, int]:
    """Per-answer columns: ``words`` (token count), ``loop`` (:func:`has_loop`: some 1-3 word
    n-gram three times back to back) and ``empty`` (no tokens)."""
    return _row(words(text))


def _row(toks: Sequence[str]) -> dict[str, int]:
    return {"words": len(toks), "loop": int(has_loop(toks)), "empty": int(not toks)}


def generation_health(texts: Sequence[str]) -> dict[str, float]:
    """Health of a set of answers.

    * ``mean_words``: mean token count per answer (empty answers included, as 0);
    * ``distinct1`` / ``distinct2``: unique unigrams (bigrams) / all unigrams (bigrams), pooled
      over the set (Li et al. 2016); bigrams never span two answers. Li et al. divide by the
      number of *tokens*; dividing by the number of n-grams keeps distinct-2 in [0, 1] and equal
      to 1 for a set with no repeated bigram;
    * ``loop_rate`` / ``empty_rate``: the share of answers with :func:`health_row`'s ``loop`` /
      ``empty``.

    Every 0/0 (no texts, no bigrams) is 0.0.
    """
    toks = [words(t) for t in texts]   # tokenised once: the rows and distinct-n read the same tokens
    rows = [_row(t) for t in toks]
    m = max(1, len(rows))
    out = {"mean_words": sum(r["words"] for r in rows) / m,
           "loop_rate": sum(r["loop"] for r in rows) / m,
           "empty_rate": sum(r["empty"] for r in rows) / m}
    for n in (1, 2):
        grams = [tuple(w[i:i + n]) for w in toks for i in range(len(w) - n + 1)]
        out[f"distinct{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    return out


def collapsed(now: Mapping[str, float], start: Mapping[str, float]) -> list[str]:
    """Reasons the probe says the policy collapsed, measured against the step-0 probe: answers
    at most half as long, half the distinct bigrams, or 30 points more looping / empty answers."""
    why = []
    if now["mean_words"] < 0.5 * start["mean_words"]:
        why.append(f"mean length {now['mean_words']:.1f} words < half of {start['mean_words']:.1f} at the start")
    if now["distinct2"] < 0.5 * start["distinct2"]:
        why.append(f"distinct-2 {now['distinct2']:.3f} < half of {start['distinct2']:.3f} at the start")
    if now["loop_rate"] > start["loop_rate"] + 0.3:
        why.append(f"loop rate {now['loop_rate']:.2f} vs {start['loop_rate']:.2f} at the start")
    if now["empty_rate"] > start["empty_rate"] + 0.3:
        why.append(f"empty answers {now['empty_rate']:.2f} vs {start['empty_rate']:.2f} at the start")
    return why
