"""Pure loss functions over tensors (no model code); methods call them from their steps."""

from mmalign.losses.dpo import (
    DPOOutput,
    all_pairs,
    dpo_sigmoid_loss,
    dynamic_beta,
    ipo_loss,
    nll_anchored_dpo_loss,
)

__all__ = ["DPOOutput", "all_pairs", "dpo_sigmoid_loss", "dynamic_beta", "ipo_loss", "nll_anchored_dpo_loss"]
