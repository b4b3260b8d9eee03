"""Pure loss functions over tensors (no model code); methods call them from their steps."""

from mmalign.losses.dpo import (
    DPOOutput,
    all_pairs,
    dpo_sigmoid_loss,
    dynamic_beta,
    ipo_loss,
    nll_anchored_dpo_loss,
)
from mmalign.losses.ppo import (
    aggregate_segment_rewards,
    combine_type_rewards,
    gae,
    kl_penalty,
    masked_entropy,
    place_segment_rewards,
    place_sequence_reward,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
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
    "aggregate_segment_rewards",
    "combine_type_rewards",
    "dpo_sigmoid_loss",
    "dynamic_beta",
    "gae",
    "gather_at",
    "ipo_loss",
    "kl_penalty",
    "last_label_index",
    "masked_entropy",
    "nll_anchored_dpo_loss",
    "place_segment_rewards",
    "place_sequence_reward",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rdpo_loss",
    "reward_centering",
    "token_rewards",
    "whiten",
]
