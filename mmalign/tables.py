"""Cells of the Markdown tables stages write: a value with its 95% interval.

An interval is a mapping ``{"value", "low", "high"}`` (what :func:`mmalign.metrics.bootstrap_ci`
gives, as the stages store it); None (nothing to estimate) prints ``n/a``.
"""

from __future__ import annotations


def pct_ci(v: dict | None) -> str:
    """``42.0% [38.1%, 46.2%]`` (a share), or ``n/a``."""
    return "n/a" if not v else f"{v['value']:.1%} [{v['low']:.1%}, {v['high']:.1%}]"


def num_ci(v: dict | None) -> str:
    """``0.812 [0.790, 0.833]`` (a plain number), or ``n/a``."""
    return "n/a" if not v else f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
