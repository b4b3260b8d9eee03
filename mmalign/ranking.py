"""Ranked responses per prompt -> preference pairs: the logic the preference-data stages share.

MM-RLHF (Zhang et al. 2025) ranks several responses to one (image, prompt) by a weighted mean of
per-dimension scores and trains on *every* pair with a strict preference. Two stages build that
data: ``data_pipelines.prefs`` (from the synthetic world's feedback) and
``data_pipelines.import_mmrlhf`` (from the published MM-RLHF release). What they have in common
lives here:

* :func:`parse_weights`: the ``--weights "faithfulness=0.7,helpfulness=0.3"`` option;
* :func:`overall`: the weighted mean of a response's dimension scores;
* :func:`rank`: responses best first, ties broken by an optional key, then by input order;
* :func:`split_of`: a prompt's train/val split from a hash of its id;
* :func:`ranked_pairs` (with :func:`assistant_message`): every strict-preference pair of a
  ranking as :class:`mmalign.records.PreferenceRecord` s;
* :func:`distribution`: count, quartiles, mean (and a histogram) of scores for the reports;
* :func:`parse_stage_args`: the shared end of the two command lines (``--force``, then the
  parsed ``--weights``).

A response is anything with ``text``, ``overall``, ``scores``, ``critique`` and ``source``: a
mapping with those keys (the importer's dicts) or an object with those attributes (the prefs
stage's dataclass). Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mmalign.records import PreferenceRecord

#: The ``meta`` keys every pair gets, in this order (``<field>_chosen``, ``<field>_rejected``).
PAIR_FIELDS = ("scores", "critique", "source")


def _field(response: Any, name: str) -> Any:
    """``response[name]`` for a mapping, else ``response.name``."""
    return response[name] if isinstance(response, Mapping) else getattr(response, name)


# ---------------------------------------------------------------------------------------------
# scores


def parse_weights(text: str, dimensions: Sequence[str] | None = None,
                  aliases: Mapping[str, str] | None = None) -> dict[str, float]:
    """Parse ``--weights``: ``"faithfulness=0.7,helpfulness=0.3"`` -> ``{"faithfulness": 0.7, ...}``.

    Args:
        text: comma-separated ``name=weight`` items; empty items (``"a=1,"``) are ignored.
        dimensions: the names allowed. ``None`` (default): any name, and the result holds the
            names given, in the order given. Else every name must be one of them (after
            ``aliases``) and the result holds all of ``dimensions`` in that order, 0 for a
            dimension not named.
        aliases: other spellings accepted for a name, e.g. ``{"ethics": "ethical"}``.

    Weights must be finite and >= 0, each name given once (an alias and its name count as the
    same), with at least one weight > 0; they need not sum to 1 (:func:`overall` divides by
    their sum).

    Raises:
        ValueError: naming ``--weights`` and what is wrong.
    """
    aliases = aliases or {}
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = aliases.get(name.strip(), name.strip())
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not name or not math.isfinite(w) or w < 0:
            raise ValueError(f"--weights {text!r}: {item!r} is not <name>=<number >= 0>")
        if dimensions is not None and name not in dimensions:
            also = f" (or {', '.join(aliases)})" if aliases else ""
            raise ValueError(f"--weights {text!r}: {name!r} is not one of {', '.join(dimensions)}{also}")
        if name in out:
            raise ValueError(f"--weights {text!r}: {name!r} is given twice")
        out[name] = w
    if not any(out.values()):
        raise ValueError(f"--weights {text!r}: at least one weight must be > 0")
    if dimensions is not None:
        out = {d: out.get(d, 0.0) for d in dimensions}
    return out


def overall(scores: Mapping[str, float], weights: Mapping[str, float], ndigits: int | None = None) -> float:
    """The weighted mean of ``scores`` over the dimensions that have one and a weight > 0.

    A dimension without a score drops out of the mean (so does one with weight 0 or none);
    sums run in the order of ``scores``. ``ndigits`` rounds the result (the prefs stage uses
    10, so float noise between two weightings of equal scores never makes a preference).

    Raises:
        ValueError: when no dimension has both a score and a weight > 0.
    """
    terms = [(weights[d], s) for d, s in scores.items() if weights.get(d, 0) > 0]
    if not terms:
        raise ValueError(f"no score in a dimension with weight > 0 (scores: {dict(scores) or 'none'}; "
                         f"weights: {dict(weights)})")
    mean = sum(w * s for w, s in terms) / sum(w for w, _ in terms)
    return mean if ndigits is None else round(mean, ndigits)


def rank(responses: Iterable[Any], tie_break: Callable[[Any], Any] | None = None) -> list[Any]:
    """``responses`` sorted by ``overall``, best first.

    Equal ``overall`` scores are ordered by ``tie_break(response)`` (ascending) when given (the
    importer passes the annotators' rank), and then keep their input order (the sort is stable).
    """
    if tie_break is None:
        return sorted(responses, key=lambda r: -_field(r, "overall"))
    return sorted(responses, key=lambda r: (-_field(r, "overall"), tie_break(r)))


def split_of(prompt_id: str, val_fraction: float, seed: int | str | None = None) -> str:
    """``"val"`` or ``"train"`` for a prompt, from a hash of its id alone.

    ``"val"`` when sha256 of the id (of ``"<seed>:<id>"`` when ``seed`` is given), its first 8
    bytes read as a fraction of 2^64, is below ``val_fraction``. Every pair of a prompt thus lands
    in the same split whatever the file order, re-runs agree, and without a seed a smaller
    ``val_fraction`` gives a subset of the val prompts of a larger one.
    """
    key = prompt_id if seed is None else f"{seed}:{prompt_id}"
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


# ---------------------------------------------------------------------------------------------
# pairs


def assistant_message(text: str) -> list[dict]:
    """A completion in the records' message format: one assistant message holding ``text``."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def ranked_pairs(prompt_id: str, images: Sequence[str], prompt: list[dict], ranked: Sequence[Any], *,
                 min_margin: float = 0.0, response_meta: Sequence[str] = (),
                 meta: Mapping[str, Any] | None = None) -> list[PreferenceRecord]:
    """Every strict-preference pair of one prompt's ranking, as :class:`PreferenceRecord` s.

    One record per ``(i, j)`` of :func:`mmalign.losses.dpo.all_pairs` over the ``overall``
    scores of ``ranked`` (best first), so ties make no pair; a pair whose margin is under
    ``min_margin`` is left out too. Record ``id`` is ``<prompt_id>-<i>-<j>``, ``chosen`` /
    ``rejected`` the two texts as :func:`assistant_message` s, ``score_chosen`` /
    ``score_rejected`` their ``overall``. ``meta``, in this order: ``prompt_id``,
    ``chosen_rank`` (``i``), ``rejected_rank`` (``j``), ``<f>_chosen`` and ``<f>_rejected`` for
    ``f`` in :data:`PAIR_FIELDS` and then in ``response_meta`` (further response fields, e.g.
    ``human_rank``), then the items of ``meta`` (the same for every pair of the prompt).
    """
    from mmalign.losses.dpo import all_pairs  # here: mmalign.losses imports torch

    out = []
    for i, j in all_pairs([_field(r, "overall") for r in ranked]):
        c, r = ranked[i], ranked[j]
        if _field(c, "overall") - _field(r, "overall") < min_margin:
            continue
        pair_meta: dict[str, Any] = {"prompt_id": prompt_id, "chosen_rank": i, "rejected_rank": j}
        for f in (*PAIR_FIELDS, *response_meta):
            pair_meta[f"{f}_chosen"] = _field(c, f)
            pair_meta[f"{f}_rejected"] = _field(r, f)
        out.append(PreferenceRecord(
            id=f"{prompt_id}-{i}-{j}", images=list(images), prompt=prompt,
            chosen=assistant_message(_field(c, "text")), rejected=assistant_message(_field(r, "text")),
            score_chosen=_field(c, "overall"), score_rejected=_field(r, "overall"),
            meta={**pair_meta, **(meta or {})}))
    return out


# ---------------------------------------------------------------------------------------------
# reports


def distribution(values: Iterable[float], ndigits: int | None = None,
                 histogram_max: int | None = None) -> dict[str, Any]:
    """``{"n", "min", "p25", "median", "p75", "max", "mean"}`` of ``values`` (only ``n`` when empty).

    Quartiles interpolate linearly between the sorted values (the "inclusive" method: p25 of
    ``[1, 2, 3, 4, 5]`` is 2). ``ndigits`` rounds the mean and the quartiles (min and max are
    values seen and stay as they are). With ``histogram_max``, a ``histogram`` ``{"<value>":
    count}`` is added when there are at most that many distinct values (useful for the small
    integer scales annotators use).
    """
    v = sorted(values)
    if not v:
        return {"n": 0}

    def q(p: float) -> float:
        x = p * (len(v) - 1)
        lo = math.floor(x)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)

    def r(x: float) -> float:
        return x if ndigits is None else round(x, ndigits)

    out: dict[str, Any] = {"n": len(v), "min": v[0], "p25": r(q(0.25)), "median": r(q(0.5)),
                           "p75": r(q(0.75)), "max": v[-1], "mean": r(sum(v) / len(v))}
    counts = Counter(v)
    if histogram_max is not None and len(counts) <= histogram_max:
        out["histogram"] = {f"{k:g}": c for k, c in sorted(counts.items())}
    return out


# ---------------------------------------------------------------------------------------------
# command line


def parse_stage_args(ap: argparse.ArgumentParser, argv: list[str] | None, *,
                     dimensions: Sequence[str] | None = None,
                     aliases: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, dict[str, float]]:
    """Add ``--force``, parse ``argv`` and its ``--weights`` (see :func:`parse_weights`).

    ``ap`` must already have a ``--weights`` option. Bad weights end the program through
    ``ap.error`` (usage and message on stderr, exit status 2), like any other bad option.
    """
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    args = ap.parse_args(argv)
    try:
        weights = parse_weights(args.weights, dimensions, aliases)
    except ValueError as e:
        ap.error(str(e))
    return args, weights
