"""The thin base every method module stands on: the policy, the optimiser, the export."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.distributed as dist

from mmalign.policy import Policy
from mmalign.stage import StageOutput


def data_parallel_size() -> int:
    """Number of data-parallel processes (1 unless torch.distributed is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_denominator(local: torch.Tensor, min_total: float = 0.0) -> torch.Tensor:
    """What a rank divides its *summed* loss by so that data parallelism trains on the mean over
    the global batch, however unevenly its items (tokens, examples, weights) fall on the ranks.

    DDP, FSDP and DeepSpeed average the gradients of the W ranks. If rank ``r`` returns
    ``S_r / D`` with ``D = N / W``, ``N = sum_r N_r`` the all-reduced count, the average is
    ``(1 / W) * sum_r grad S_r / (N / W) = grad (sum_r S_r) / N``: the one-process mean of the
    global batch (Hugging Face Trainer's ``num_items_in_batch``). Each rank dividing by its own
    ``N_r`` instead is only the same when every ``N_r`` is equal: e.g. 2 ranks with 40 and 2
    answer tokens weigh each token of the short answers 20x more than the long ones.

    Args:
        local: count (or weight sum) of this rank's batch, a scalar or a vector of several
            counts reduced in one call; detached here (a count is no function of the weights).
        min_total: floor on the *global* count (1 for token counts, as ``masked_mean``), so an
            empty global batch divides by something > 0.

    Returns:
        ``max(N, min_total) / W`` (on one process ``max(N_r, min_total)``). Every rank must call
        it at the same point: under data parallelism it is a collective (one scalar all-reduce).
    """
    total = local.detach().float()
    w = data_parallel_size()
    if w > 1:
        total = total.clone()
        dist.all_reduce(total)
    return total.clamp(min=min_total) / w


#: learning-rate schedules by name: transformers' (``transformers.get_scheduler``), each with a linear
#: warm-up from 0 to ``lr`` over ``warmup_steps``, then: "linear" to 0, "cosine" to 0,
#: "cosine_with_min_lr" to ``lr * min_lr_ratio``, "constant_with_warmup" flat at ``lr``.
Schedule = Literal["linear", "cosine", "cosine_with_min_lr", "constant_with_warmup"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@dataclass(frozen=True)
class OptimArgs:
    """The optimiser of every method: AdamW (betas 0.9, 0.95) and its learning-rate schedule
    (YAML ``model.init_args.optim``; a config may give some fields, the others keep the
    method's defaults). Frozen, so an instance is a safe default argument: each method's
    signature holds its own defaults as one (``optim: OptimArgs = OptimArgs(lr=5e-6, ...)``).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms: 1-D parameters).
        warmup_steps: linear warm-up from 0 to ``lr`` over this many optimiser steps.
        min_lr_ratio: "cosine_with_min_lr" ends at ``lr * min_lr_ratio`` at the last step (the
            other schedules ignore it).
        schedule: "cosine_with_min_lr" (warm-up, then cosine decay to the floor), "cosine" (to
            0), "linear" (to 0) or "constant_with_warmup"; transformers' schedules of those names.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    schedule: Schedule = "cosine_with_min_lr"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, not {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class ExportArgs:
    """Where the trained model goes when training ends (YAML ``model.init_args.export``).

    Args:
        dir: folder the trained policy is written to in Hugging Face format (atomically: a
            killed export never leaves a half model); None = no export.
        merge_lora: merge LoRA into the weights on export (True) or save the adapter only.
    """

    dir: str | None = None
    merge_lora: bool = True


def _as(cls: type, value: Any, name: str) -> Any:
    """``value`` as a ``cls`` instance: as given (the CLI and Python callers), or from a mapping
    (hyperparameters read back from a checkpoint by ``load_from_checkpoint``)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{name} must be an {cls.__name__} (or a mapping of its fields), got {type(value).__name__}")


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimArgs,
                total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``optim.schedule`` over ``total_steps`` optimiser steps: transformers' schedule of that name
    (a LambdaLR: every parameter group is scaled by the same factor of its own ``lr``).

    With ``W = warmup_steps`` and ``T = total_steps``, optimiser step ``s`` runs at ``lr * s / W``
    for ``s < W`` (step 0 at 0) and, for "cosine_with_min_lr", at
    ``lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (T - W))) / 2)`` after, ``r = min_lr_ratio``:
    ``lr`` at step ``W``, the floor after the last step (tests/test_lr_schedule.py compares it
    with the hand-written schedule it replaced, whose warm-up ran ``(s + 1) / (W + 1)``)."""
    from transformers import get_scheduler

    extra = {"min_lr_rate": optim.min_lr_ratio} if optim.schedule == "cosine_with_min_lr" else None
    return get_scheduler(optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=extra)


class PolicyModule(L.LightningModule):
    """Holds the policy; AdamW with a warm-up + decay schedule; exports at the end.

    Args:
        policy: the model to train (``class_path: models.policy.HFPolicy`` in configs).
        optim: learning rate, weight decay and schedule (:class:`OptimArgs`); each method has
            its own defaults.
        export: where and how the trained policy is written (:class:`ExportArgs`).

    The hyperparameters (``self.hparams``, checkpoints) hold ``optim`` and ``export`` as plain
    dicts of their fields; the module reads them as ``self.optim`` and ``self.export_args``.
    """

    def __init__(self, policy: Policy, optim: OptimArgs = OptimArgs(), export: ExportArgs = ExportArgs()):
        super().__init__()
        self.policy = policy
        self.optim: OptimArgs = _as(OptimArgs, optim, "optim")
        self.export_args: ExportArgs = _as(ExportArgs, export, "export")
        # The policy is rebuilt from the YAML config (LightningCLI saves config.yaml beside the
        # logs); pickling a whole model into hparams would break weights_only checkpoint loads.
        self.save_hyperparameters(ignore=["policy"])
        # Plain dicts in hparams whoever built the module (LightningCLI records the config's
        # dicts, a Python caller the dataclasses): checkpoints stay loadable with weights_only.
        self.hparams["optim"] = asdict(self.optim)
        self.hparams["export"] = asdict(self.export_args)

    @classmethod
    def optim_defaults(cls, **changes: Any) -> OptimArgs:
        """This method's default :class:`OptimArgs` with ``changes``: what a Python caller passes
        to change one field and keep the method's others (``OptimArgs(lr=...)`` alone takes the
        generic defaults; a YAML or command-line ``optim.lr`` keeps the method's by itself)."""
        default = inspect.signature(cls).parameters["optim"].default
        return replace(default, **changes)

    def extra_parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """Trainable parameters outside the policy (score heads, value models), as ``(params,
        lr)`` pairs: each gets its own learning rate (a head starting from scratch usually wants a
        larger one) and the same weight-decay split and schedule as the policy."""
        return []

    def configure_optimizers(self):
        o = self.optim
        groups = []
        for params, lr in [(list(self.policy.trainable_parameters()), o.lr), *self.extra_parameter_groups()]:
            groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay, "lr": lr},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95))
        sched = lr_schedule(opt, o, max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def datamodule_args(self) -> dict[str, Any]:
        """What this module gives its DataModule: the mmalign CLI calls
        ``datamodule.connect(**model.datamodule_args())`` once both are built, so data and model
        share one processor (and, for reward models, one mode / prompt / type list)."""
        return {"processor": self.policy.processor}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.export_args.dir and self._trainer is not None:
            check_export_strategy(self.trainer.strategy)

    def on_fit_end(self) -> None:
        # Not on_train_end: Lightning skips the training loop (and its end hook) when a resumed
        # checkpoint is already at max_steps, so a run killed during its export and resumed with
        # --ckpt_path last would finish without a model. on_fit_end follows every completed fit.
        if self.trainer.fast_dev_run:
            # A smoke run must never leave a model where the next stage would take it as trained.
            print("fast_dev_run: export skipped")
            return
        if self.export_args.dir and self.trainer.is_global_zero:
            self.export(self.export_args.dir)

    def export(self, out_dir: str) -> None:
        """Write what the next stage loads (the policy; reward models add their heads)."""
        export_policy(self.policy, out_dir, self.export_args.merge_lora)


def check_export_strategy(strategy) -> None:
    """Refuse, before training, an export that the strategy cannot give.

    The export is rank 0 calling ``save_pretrained`` on its own copy of the policy (every other
    rank skips it). Under DDP and DeepSpeed ZeRO 1/2 every rank holds all the weights, so that
    is the whole model. Under FSDP and ZeRO 3 each rank holds a shard: FSDP's state_dict is a
    collective that rank 0 alone would wait on forever, and ZeRO 3's local parameters are empty
    placeholders. Train those with ``export: {dir: null}`` and keep Lightning's checkpoints.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
        raise ValueError(f"export.dir is set but {type(strategy).__name__} shards the weights across ranks, and the "
                         "export saves rank 0's copy only: use DDP or DeepSpeed stage 1/2 to export, or set "
                         "model.init_args.export.dir null and keep the checkpoints")


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
