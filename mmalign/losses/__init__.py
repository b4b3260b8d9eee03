"""Pure loss functions over tensors (no model code); methods call them from their steps."""

from mmalign.losses.dpo import (
    DPOOutput,
    all_pairs,
    dpo_sigmoid_loss,
    dynamic_beta,
    ipo_loss,
    nll_anchored_dpo_loss,
)
from mmalign.losses.rdpo import RDPOOutput, rdpo_loss
from mmalign.losses.reward import (
    bradley_terry_loss,
    gather_at,
    last_label_index,
    reward_centering,
)

__all__ = [
    "DPOOutput",
    "RDPOOutput",
    "all_pairs",
    "bradley_terry_loss",
    "dpo_sigmoid_loss",
    "dynamic_beta",
    "gather_at",
    "ipo_loss",
    "last_label_index",
    "nll_anchored_dpo_loss",
    "rdpo_loss",
    "reward_centering",
]
