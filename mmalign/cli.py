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
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


class MMAlignCLI(LightningCLI):
    """LightningCLI with mmalign's run layout.

    Everything of a run lives under ``trainer.default_root_dir``: checkpoints in
    ``<root>/checkpoints`` (a fixed place, so ``--ckpt_path last`` finds them after a kill) unless
    a ModelCheckpoint names its own ``dirpath``, and, when the config names no logger, CSV logs in
    ``<root>/logs`` plus TensorBoard logs in ``<root>/tb`` if tensorboard is installed.
    """

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
