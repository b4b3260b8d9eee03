"""The refinement benchmark's metrics (DRESS's multi-turn setting) and their table cells.

``data_pipelines.refine_bench`` computes them per turn from per-scene score columns (its
``turn_row``: ``false_<type>``, ``claims_<type>``, ``checked_<type>``, ``hallucinated``,
``coverage``, ``words``, and against turn 0 ``fixed_<type>``, ``false_at_0``, ...), each summed
over scenes with a 95% bootstrap interval (:func:`mmalign.eval.summary.summarize`);
``data_pipelines.report`` prints them from the benchmark's output files. Both format a metric's
cell with :func:`fmt_metric`, so a share prints in percent and a count per caption as a number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmalign.eval import summary as S
from mmalign.eval.report import fmt
from mmalign.feedback import HALLUCINATION_TYPES

TYPES: tuple[str, ...] = tuple(HALLUCINATION_TYPES)


def _m(*args: Any, **kw: Any) -> S.Metric:
    return S.Metric(*args, **kw)


#: every turn
TURN_METRICS: tuple[S.Metric, ...] = (
    _m("false_per_caption", "false claims / caption (all types)", "false_all", percent=False),
    *(_m(f"false_{t}_per_caption", f"false {t} claims / caption", f"false_{t}", percent=False) for t in TYPES),
    _m("chair_i", "CHAIR_i (false object claims / object claims)", "false_object", "claims_object"),
    _m("attribute_error_rate", "false / checkable attribute claims", "false_attribute", "checked_attribute"),
    _m("relation_error_rate", "false / checkable relation claims", "false_relation", "checked_relation"),
    _m("hallucinated_share", "captions with a false claim (CHAIR_s-style)", "hallucinated"),
    _m("coverage", "coverage (scene objects correctly described)", "coverage", better="higher"),
    _m("mean_words", "mean length (words)", "words", better="", percent=False),
)
#: turn k >= 1, against turn 0
REVISION_METRICS: tuple[S.Metric, ...] = (
    _m("fixed_caption_share", "turn-0 hallucinated captions now hallucination-free", "fixed_caption",
       "hallucinated_at_0", better="higher"),
    _m("fixed_claim_share", "turn-0 false claims fixed (all types)", "fixed_all", "false_at_0", better="higher"),
    *(_m(f"fixed_{t}_share", f"turn-0 false {t} claims fixed", f"fixed_{t}", f"false_at_0_{t}", better="higher")
      for t in TYPES),
    _m("introduced_per_caption", "new false claims / caption (vs turn 0)", "introduced_all", percent=False),
    _m("new_hallucination_share", "captions with a new false claim (vs turn 0)", "any_introduced"),
    _m("refined_share", "scenes asked to revise at this turn", "refined", better=""),
)
ALL_METRICS: dict[str, S.Metric] = {m.key: m for m in (*TURN_METRICS, *REVISION_METRICS)}


def fmt_metric(v: Mapping[str, float] | None, key: str, signed: bool = False) -> str:
    """The table cell of metric ``key``'s value (or paired difference, ``signed``) with its interval:
    percent for a share, plain for a count (an unknown key prints as a share)."""
    m = ALL_METRICS.get(key)
    return fmt(v, m.percent if m else True, signed=signed)


def metric_label(key: str) -> str:
    """The row label of metric ``key`` (the key itself when it is not one of these)."""
    return ALL_METRICS[key].label if key in ALL_METRICS else key
