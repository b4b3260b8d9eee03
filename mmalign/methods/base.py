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

    def extra_parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """Trainable parameters outside the policy (score heads, value models), as ``(params,
        lr)`` pairs: each gets its own learning rate (a head starting from scratch usually wants a
        larger one) and the same weight-decay split and schedule as the policy."""
        return []

    def configure_optimizers(self):
        hp = self.hparams
        groups = []
        for params, lr in [(list(self.policy.trainable_parameters()), hp.lr), *self.extra_parameter_groups()]:
            groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay, "lr": lr},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))
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
            self.export(self.hparams.export_dir)

    def export(self, out_dir: str) -> None:
        """Write what the next stage loads (the policy; reward models add their heads)."""
        export_policy(self.policy, out_dir, self.hparams.merge_lora)


def export_policy(policy: Policy, out_dir: str, merge_lora: bool = True, heads: torch.nn.Module | None = None,
                  head_file: str = "", config_file: str = "", config: dict | None = None, what: str = "policy") -> None:
    """Write ``policy`` to ``out_dir`` as a stage output: saved beside it, manifest last, then
    swapped in, so a killed export never leaves a half model where the next stage looks. A reward
    model adds its ``heads`` (safetensors, ``head_file``) and its ``config`` (JSON, ``config_file``)
    to the same output."""
    import json

    from mmalign.stage import atomic_write_text

    with StageOutput(out_dir, stage="export", config={"merge_lora": merge_lora, **({what: config} if config else {})}) as st:
        policy.save_pretrained(str(st.path), merge_lora=merge_lora)
        if heads is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()},
                      str(st.path / head_file))
        if config is not None:
            atomic_write_text(st.path / config_file, json.dumps(config, indent=2) + "\n")
    print(f"exported {what} -> {out_dir}")
