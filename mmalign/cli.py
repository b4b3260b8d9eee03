"""``mmalign``: the command line.

    mmalign fit --config configs/sft/tiny.yaml      # train any method (LightningCLI)
    mmalign fit --config configs/sft/tiny.yaml --print_config
    mmalign fit --config configs/sft/tiny.yaml --ckpt_path last   # resume
    mmalign eval --model runs/demo/sft/model --data runs/demo/data --out runs/demo/eval/sft
    mmalign eval compare runs/demo/eval/sft runs/demo/eval/other   # paired differences

Every option of a method, a data module and the policy is a constructor argument; its docstring
is the ``--help`` text and its name the YAML key (``mmalign fit --help``,
``mmalign fit --model.help mmalign.methods.sft.SFTModule``).
"""

from __future__ import annotations

import importlib.util
import os
import random
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


class RNGState(Callback):
    """Saves the global RNG states (torch, CUDA, numpy, Python) in every checkpoint and puts them
    back when a resumed run takes its first training step, so dropout, sampled generations and
    anything else random continue as in a run that was never stopped (Lightning restores model,
    optimiser, schedulers and loop counters, but not the RNGs).

    Why at the first step and not at load time: between loading and training, the resumed run
    does things the uninterrupted one did not at this point (sanity validation, ``on_fit_start``
    probes), and they may draw random numbers. A validation that Lightning replays because the
    checkpoint was saved just before it counts as that first step too (it ran after the save in the
    uninterrupted run). Under DDP the checkpoint holds rank 0's states, which every rank then takes.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np

            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            # plain ints, not an ndarray: checkpoints are loaded with torch.load(weights_only=True)
            state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        except ImportError:
            pass
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def _restore(self) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state:
            import numpy as np

            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._restore()


def connect_data(model: LightningModule, datamodule: LightningDataModule | None) -> None:
    """``datamodule.connect(**model.datamodule_args())``: the one way a DataModule gets what only
    the model knows (the policy's processor; a reward model's mode, prompt or types), litgpt's
    ``connect`` shape. The model declares what it gives, the DataModule's ``connect`` what it
    takes; a pair that does not fit is a TypeError naming both before anything is read. Nothing
    happens for a DataModule without ``connect`` (or no DataModule)."""
    import inspect

    connect = getattr(datamodule, "connect", None)
    if connect is None:
        return
    dm, mod = type(datamodule).__name__, type(model).__name__
    give = getattr(model, "datamodule_args", None)
    if give is None:
        raise TypeError(f"{dm} takes its processor from the model through connect(), but {mod} has no "
                        "datamodule_args() (mmalign's methods derive from mmalign.methods.base.PolicyModule)")
    args = give()
    try:
        inspect.signature(connect).bind(**args)
    except TypeError as e:
        raise TypeError(f"{dm}.connect{inspect.signature(connect)} does not fit what {mod}.datamodule_args() "
                        f"gives ({', '.join(sorted(args))}): {e}; is this the data module for {mod}?") from None
    connect(**args)


class MMAlignCLI(LightningCLI):
    """LightningCLI with mmalign's run layout.

    Everything of a run lives under ``trainer.default_root_dir``: checkpoints in
    ``<root>/checkpoints`` (a fixed place, so ``--ckpt_path last`` finds them after a kill) unless
    a ModelCheckpoint names its own ``dirpath``, and, when the config names no logger, CSV logs in
    ``<root>/logs`` plus TensorBoard logs in ``<root>/tb`` if tensorboard is installed. Every run
    gets :class:`RNGState`, so a run killed mid-epoch and resumed with ``--ckpt_path last`` trains
    exactly as if it had never stopped (the train loaders are resumable too, see mmalign.data).
    Once model and data are built, the data module is connected to the model (:func:`connect_data`).
    """

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        connect_data(self.model, self.datamodule)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = config.get("default_root_dir") or os.getcwd()
        if config.get("logger") in (None, True):
            loggers = [CSVLogger(root, name="logs", version="")]
            if importlib.util.find_spec("tensorboard") is not None:
                loggers.append(TensorBoardLogger(root, name="tb", version=""))
            config["logger"] = loggers
        for cb in (config.get("callbacks") or []) + callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(os.path.join(root, "checkpoints"))
        if not any(isinstance(cb, RNGState) for cb in (config.get("callbacks") or []) + callbacks):
            callbacks = [*callbacks, RNGState()]
        return super()._instantiate_trainer(config, callbacks)


def cli_main(args: list[str] | None = None, run: bool = True) -> MMAlignCLI:
    return MMAlignCLI(
        LightningModule, LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__, "default_env": False},
        args=args, run=run,
    )


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["eval"]:
        # Evaluation is not training: a plain argparse CLI (mmalign/eval/cli.py), not LightningCLI.
        from mmalign.eval.cli import main as eval_main

        raise SystemExit(eval_main(list(args[1:])))
    # args=None lets LightningCLI read sys.argv itself (it warns when given both).
    cli_main(argv)


if __name__ == "__main__":
    main()


def check_config(path: str) -> None:
    """Parse and type-check a ``fit`` config without instantiating anything (no model is
    loaded), so configs for checkpoints that are not on this machine can still be validated."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=int | bool, default=0)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    parser.parse_path(path)
