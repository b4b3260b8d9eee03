"""PolicyModule's optimiser: transformers' schedules against the hand-written warm-up + cosine
with a floor they replaced, the parameter groups, and the optimiser options in hyperparameters,
checkpoints and a resumed run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mmalign.methods.base import SCHEDULES, ExportArgs, OptimArgs, PolicyModule


def hand_written(step: int, warmup_steps: int, total: int, min_lr_ratio: float) -> float:
    """The LambdaLR factor PolicyModule.configure_optimizers used before transformers' schedule
    (verbatim, for the comparison)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StubPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)          # a 2-D weight (decayed) and a 1-D bias (not)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.processor = "the processor"

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


class WithHead(PolicyModule):
    def __init__(self, policy, head_lr: float = 0.5, **kwargs):
        super().__init__(policy, **kwargs)
        self.head = torch.nn.Linear(2, 1)

    def extra_parameter_groups(self):
        return [(list(self.head.parameters()), self.hparams.head_lr)]

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return (self.head(self.policy.proj(x)) ** 2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3)), batch_size=2)


def factors(optim: OptimArgs, total: int) -> list[float]:
    """The learning rate of each optimiser step 0 .. total (the last: after the last step) over ``lr``."""
    module = PolicyModule(StubPolicy(), optim=optim)
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"] / optim.lr)
        opt.step()
        sched.step()
    return out


SETTINGS = [(20, 100, 0.1), (40, 1500, 0.1), (10, 30, 0.0), (3, 5, 0.5), (0, 10, 0.1), (0, 1, 0.1), (0, 2, 0.0),
            (0, 50, 1.0), (1, 1, 0.1), (10, 5, 0.1)]


@pytest.mark.parametrize("warmup,total,ratio", SETTINGS)
def test_transformers_schedule_against_the_hand_written_one(warmup, total, ratio):
    """Step by step: after the warm-up both are the same cosine to ``lr * min_lr_ratio``
    (transformers' ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)``). The one
    difference is in the warm-up, off by one: transformers' factor at step ``s < W`` is ``s / W``
    (step 0 runs at lr 0), the hand-written one's ``(s + 1) / (W + 1)`` (step 0 at lr / (W + 1)).
    Both reach ``lr`` at step ``W``. Without warm-up the two are the same at every step."""
    got = factors(OptimArgs(lr=1e-3, warmup_steps=warmup, min_lr_ratio=ratio), total)
    for s, f in enumerate(got):
        old = hand_written(s, warmup, total, ratio)
        if s < warmup:
            assert f == pytest.approx(s / warmup, abs=1e-12), s
            assert old == pytest.approx((s + 1) / (warmup + 1), abs=1e-12)
            assert f < old                  # transformers' warm-up is one step behind
        else:
            assert f == pytest.approx(old, abs=1e-12), s
    if warmup < total:
        assert got[warmup] == pytest.approx(1.0)
        # the floor is reached after the last optimiser step (the last step itself runs a little above it)
        assert got[total] == pytest.approx(ratio, abs=1e-12)
        assert hand_written(total, warmup, total, ratio) == pytest.approx(ratio, abs=1e-12)
        if total - warmup > 1 and ratio < 1:
            assert got[total - 1] > ratio
    else:
        # warm-up as long as training or longer: no step reaches the cosine (both schedules)
        assert max(got[:total]) < 1.0
    if warmup == 0:
        assert got == pytest.approx([hand_written(s, 0, total, ratio) for s in range(total + 1)], abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_by_name(schedule):
    w, t, r = 4, 12, 0.25
    got = factors(OptimArgs(lr=2e-3, warmup_steps=w, min_lr_ratio=r, schedule=schedule), t)
    assert got[:w + 1] == pytest.approx([s / w for s in range(w + 1)])        # the same warm-up for all
    end = {"linear": 0.0, "cosine": 0.0, "cosine_with_min_lr": r, "constant_with_warmup": 1.0}[schedule]
    assert got[t] == pytest.approx(end, abs=1e-12)
    if schedule == "linear":
        assert got[w:] == pytest.approx([(t - s) / (t - w) for s in range(w, t + 1)])
    if schedule == "cosine":
        cos_floor_0 = factors(OptimArgs(lr=2e-3, warmup_steps=w, min_lr_ratio=0.0), t)
        assert got == pytest.approx(cos_floor_0, abs=1e-12)
    assert OptimArgs().schedule == "cosine_with_min_lr"                         # the default: today's


def test_parameter_groups_and_their_learning_rates():
    module = WithHead(StubPolicy(), head_lr=0.5, optim=OptimArgs(lr=1e-2, weight_decay=0.1, warmup_steps=2))
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    groups = [(len(g["params"]), g["weight_decay"], g["initial_lr"]) for g in opt.param_groups]
    # policy: 2-D weights decayed, 1-D bias not, frozen parameters left out; the head at its own lr
    assert groups == [(1, 0.1, 1e-2), (1, 0.0, 1e-2), (1, 0.1, 0.5), (1, 0.0, 0.5)]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_a_methods_defaults_with_one_change():
    from mmalign.methods.dpo import DPOModule
    from mmalign.methods.fgaif import FGAIFModule
    from mmalign.methods.realign import RealignModule

    assert FGAIFModule.optim_defaults(lr=1e-3) == OptimArgs(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)
    assert DPOModule.optim_defaults() == OptimArgs(lr=5e-6, warmup_steps=10)
    assert RealignModule.optim_defaults(schedule="linear") == OptimArgs(lr=1e-4, warmup_steps=10, schedule="linear")
    assert PolicyModule.optim_defaults() == OptimArgs()


def test_options_are_checked():
    for bad in ({"schedule": "step"}, {"warmup_steps": -1}, {"min_lr_ratio": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OptimArgs(**bad)
    with pytest.raises(TypeError, match="optim must be an OptimArgs"):
        PolicyModule(StubPolicy(), optim=1e-3)


def test_hyperparameters_hold_plain_dicts_and_rebuild_the_module():
    """Whoever builds the module, ``hparams`` holds ``optim`` and ``export`` as dicts of their
    fields (checkpoints load with ``weights_only``), and a module built from them is the same."""
    m = WithHead(StubPolicy(), optim=OptimArgs(lr=3e-4, warmup_steps=7), export=ExportArgs(dir="out", merge_lora=False))
    assert m.hparams.optim == {"lr": 3e-4, "weight_decay": 0.0, "warmup_steps": 7, "min_lr_ratio": 0.1,
                               "schedule": "cosine_with_min_lr"}
    assert m.hparams.export == {"dir": "out", "merge_lora": False}
    again = WithHead(StubPolicy(), **{k: v for k, v in m.hparams.items()})
    assert again.optim == m.optim and again.export_args == m.export_args and again.hparams == m.hparams
    assert m.datamodule_args() == {"processor": "the processor"}


def test_checkpoint_keeps_the_options_and_a_resumed_run_continues_the_schedule(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps: int, ckpt_path=None) -> tuple[L.Trainer, list[float]]:
        torch.manual_seed(0)
        seen: list[float] = []

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(trainer.optimizers[0].param_groups[0]["lr"])

        trainer = L.Trainer(max_steps=max_steps, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu",
                            callbacks=[Record(), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                                 save_top_k=-1)])
        model = WithHead(StubPolicy(), optim=OptimArgs(lr=1e-2, warmup_steps=2, min_lr_ratio=0.2))
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, seen

    _, full = run(6)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hp["optim"] == {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 2, "min_lr_ratio": 0.2,
                           "schedule": "cosine_with_min_lr"}
    assert hp["export"] == {"dir": None, "merge_lora": True}
    loaded = WithHead.load_from_checkpoint(ckpt, policy=StubPolicy())
    assert loaded.optim == OptimArgs(lr=1e-2, warmup_steps=2, min_lr_ratio=0.2)
    _, resumed = run(6, ckpt_path=ckpt)
    assert resumed == pytest.approx(full[3:], abs=1e-15)   # the resumed steps run at the same learning rates
