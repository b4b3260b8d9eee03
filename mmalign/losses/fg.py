"""FGAIF's fine-grained reward-model loss: per-type cross-entropy over labelled segments.

FGAIF (``RLHF/models/fine_reward_model.py``, ``RewardModelTrainer.compute_loss``) is
``F.cross_entropy(logits.view(-1, 3), labels.view(-1), ignore_index=-100)`` per reward type; here
the types can share a backbone (the loss is then the mean over types), the classes can be weighed
(scikit-learn's "balanced"), and the means can divide by a global count under data parallelism.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mmalign.feedback import LABELS
from mmalign.ops import IGNORE_INDEX

#: one class per segment label (hallucinated, correct, n/a)
N_CLASSES = len(LABELS)


def fg_loss(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, types: Sequence[str],
            class_weight: torch.Tensor | None = None,
            denominator: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Mean over types of the cross-entropy over each type's labelled segments.

    Args:
        logits: per type ``(N, S, 3)``.
        labels: ``(N, S, K)`` class indices, ``-100`` where ignored; column ``k`` is ``types[k]``.
        types: the label columns' types.
        class_weight: ``(K, 3)`` per-class weights (PyTorch's ``weight=``: the loss is then the
            weighted mean over segments), or None.
        denominator: maps the ``(K,)`` per-type totals the means divide by (labelled segments,
            or their summed class weights) to the ones to use; data parallelism passes
            :func:`mmalign.methods.base.global_denominator` so each rank's summed loss is its
            share of the global batch's mean (the ranks hold different numbers of labelled
            segments). None = this batch's own totals.

    Returns ``(loss, per_type)`` with ``per_type[t] = {"loss", "accuracy", "n"}`` (accuracy and
    n detached; a type without any labelled segment in the batch adds 0 to the loss and has
    NaN loss / accuracy).
    """
    if labels.ndim != 3 or labels.shape[-1] != len(types):
        raise ValueError(f"labels must be (N, S, {len(types)}), got {tuple(labels.shape)}")
    sums, totals, per = [], [], {}
    for k, t in enumerate(types):
        lg = logits[t].float().reshape(-1, N_CLASSES)
        y = labels[..., k].reshape(-1).to(lg.device)
        keep = y != IGNORE_INDEX
        w = (torch.ones(N_CLASSES, device=lg.device) if class_weight is None
             else class_weight[k].to(lg.device, torch.float32))
        # sum_i w_{y_i} ce_i and sum_i w_{y_i}: F.cross_entropy(weight=w)'s mean is their ratio
        ce = F.cross_entropy(lg[keep], y[keep], weight=w, reduction="sum") if keep.any() else lg.sum() * 0.0
        sums.append(ce)
        totals.append(w[y[keep]].sum())
        n = int(keep.sum())
        if n == 0:
            nan = torch.tensor(float("nan"), device=lg.device)
            per[t] = {"loss": nan, "accuracy": nan, "n": torch.tensor(0)}
        else:
            with torch.no_grad():
                acc = (lg[keep].argmax(-1) == y[keep]).float().mean()
            per[t] = {"loss": (ce / totals[-1]).detach(), "accuracy": acc, "n": torch.tensor(n)}
    total = torch.stack(totals)                                                   # (K,)
    # Called for every type even without labelled segments: under data parallelism it is a
    # collective that every rank must join.
    denom = total.clamp(min=1e-12) if denominator is None else denominator(total)
    loss = sum(s / d.clamp(min=1e-12) for s, d in zip(sums, denom))
    return loss / len(types), per


def balanced_class_weights(counts: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """``(K, 3)`` class counts -> scikit-learn's "balanced" weights ``n_k / (3 * n_{k,c})``.

    A class that never occurs gets weight 0 (it is never a target, so its weight is unused)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.ndim != 2 or c.shape[1] != N_CLASSES or (c < 0).any():
        raise ValueError(f"counts must be (K, {N_CLASSES}) non-negative, got {tuple(c.shape)}")
    total = c.sum(dim=1, keepdim=True)
    w = torch.where(c > 0, total / (N_CLASSES * c.clamp(min=1)), torch.zeros_like(c))
    return w.float()
