"""SFT through the real CLI (LightningCLI + YAML), export and resume; every config parses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mmalign.cli import check_config, cli_main

ROOT = Path(__file__).resolve().parents[1]
# Every `mmalign fit` config. Not: configs/feedback/ (prompt templates), configs/models/ and
# configs/trainer/ (overlays layered over a method config; tested in test_plan.py / test_ddp.py),
# configs/vision/ (the vision stage's own config; tested in test_vision.py).
OVERLAY_DIRS = ("models", "trainer", "vision")
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name != "feedback" and p.relative_to(ROOT / "configs").parts[0] not in OVERLAY_DIRS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(path):
    check_config(str(path))


def test_a_bad_config_is_refused(tmp_path):
    bad = (ROOT / "configs/sft/tiny.yaml").read_text().replace("lr: 0.001", "lr: fast")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(Exception, match="lr"):
        check_config(str(tmp_path / "bad.yaml"))


def test_configs_open_with_their_command():
    for path in CONFIGS:
        assert path.read_text().startswith("# Run"), path


def fit_args(world: Path, model: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/sft/tiny.yaml"),
            "--trainer.default_root_dir", str(root),
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.init_args.policy.init_args.path", str(model),
            "--model.init_args.export.dir", str(root / "model"),
            "--data.init_args.train_file", str(world / "train/sft.jsonl"),
            "--data.init_args.val_file", str(world / "val/sft.jsonl"),
            "--data.init_args.data_root", str(world),
            "--data.init_args.batch_size", "4", *extra]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fast_dev_run_through_the_cli(world, model_dirs, tmp_path, family):
    cli = cli_main(fit_args(world, model_dirs[family], tmp_path, "--trainer.fast_dev_run", "2"))
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert not (tmp_path / "model").exists()  # a smoke run never exports


def test_train_export_and_resume(world, model_dirs, tmp_path):
    from models.policy import HFPolicy

    cli = cli_main(fit_args(world, model_dirs["llava"], tmp_path, "--trainer.max_steps", "4", "--trainer.callbacks",
                            '[{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 2, "save_last": true}}]'))
    assert cli.trainer.global_step == 4
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    # Exported in Hugging Face format, loadable by path, same weights as the trained module.
    exported = HFPolicy(str(tmp_path / "model"))
    trained = cli.model.policy.model.state_dict()
    for k, v in exported.model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # CSV logs with the training loss.
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    # Resume: `--ckpt_path last` continues from step 4 to step 6.
    resumed = cli_main(fit_args(world, model_dirs["llava"], tmp_path, "--trainer.max_steps", "6",
                                "--ckpt_path", "last"))
    assert resumed.trainer.global_step == 6
