"""The thin base every method module stands on: the policy, the optimiser, the export."""

from __future__ import annotations

import math

import lightning as L
import torch

from mmalign.policy import Policy
from mmalign.stage import StageOutput


class PolicyModule(L.LightningModule):
    """Holds the policy; AdamW with linear warm-up and cosine decay; exports at the end.

    Args:
        policy: the model to train (``class_path: models.policy.HFPolicy`` in configs).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_steps: linear warm-up from 0 to ``lr``.
        min_lr_ratio: cosine decay ends at ``lr * min_lr_ratio`` at the last step.
        export_dir: where the trained policy is written in Hugging Face format when training
            ends (atomically: a killed export never leaves a half model); None = no export.
        merge_lora: merge LoRA into the weights on export (True) or save the adapter only.
    """

    def __init__(self, policy: Policy, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 20,
                 min_lr_ratio: float = 0.1, export_dir: str | None = None, merge_lora: bool = True):
        super().__init__()
        self.policy = policy
        # The policy is rebuilt from the YAML config (LightningCLI saves config.yaml beside the
        # logs); pickling a whole model into hparams would break weights_only checkpoint loads.
        self.save_hyperparameters(ignore=["policy"])

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.policy.trainable_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=(0.9, 0.95))
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / (hp.warmup_steps + 1)
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.trainer.fast_dev_run:
            # A smoke run must never leave a model where the next stage would take it as trained.
            print("fast_dev_run: export skipped")
            return
        if self.hparams.export_dir and self.trainer.is_global_zero:
            export_policy(self.policy, self.hparams.export_dir, self.hparams.merge_lora)


def export_policy(policy: Policy, out_dir: str, merge_lora: bool = True) -> None:
    """Write ``policy`` to ``out_dir`` as a stage output: saved beside it, manifest last, then
    swapped in, so a killed export never leaves a half model where the next stage looks."""
    with StageOutput(out_dir, stage="export", config={"merge_lora": merge_lora}) as st:
        policy.save_pretrained(str(st.path), merge_lora=merge_lora)
    print(f"exported policy -> {out_dir}")
