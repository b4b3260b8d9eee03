"""Scale-out: DDP over 2 CPU processes (gloo) trains on exactly what 1 process trains on.

The 2-process runs split one fixed global batch 3 : 1 between the ranks, long detailed captions
on rank 0 and a one-word answer on rank 1, so both the token counts (~40 x 3 vs ~2) and the
example / pair counts (3 vs 1) differ between the ranks: the case where a per-rank mean, averaged
by DDP, is not the global mean. Each check also runs the naive per-rank mean through the same
DDP path and asserts that it misses, so the test shows the normalisation is what makes it pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SPLIT = 3                       # examples (or pairs) of the global batch of 4 on rank 0; rank 1 gets 1
CASES = ("sft_token", "sft_example", "dpo")


# ---------------------------------------------------------------------------------------------
# the global batch and one training step


def _records(world: Path) -> tuple[list, list[dict]]:
    """4 SFT records (3 captions, then a yes/no answer) and 4 caption preference pairs."""
    from mmalign.records import read_records

    recs = read_records(world / "train/sft.jsonl", "sft", data_root=world)
    caps = [r for r in recs if r.meta.get("task") == "detailed_caption"]
    short = [r for r in recs if len(r.messages[-1]["content"][0]["text"].split()) <= 2]
    sft = caps[:SPLIT] + short[:4 - SPLIT]
    pairs = [{"id": f"p{i}", "images": r.images, "prompt": r.messages[:-1],
              "chosen": r.messages[-1]["content"][0]["text"],
              "rejected": caps[i + 1].messages[-1]["content"][0]["text"]} for i, r in enumerate(caps[:4])]
    return sft, pairs


def _batches(policy, world: Path, tmp: Path, case: str) -> list[dict]:
    """The global batch collated whole, then rank 0's and rank 1's parts: ``[full, part0, part1]``."""
    from mmalign.collators import PreferenceCollator, VisionChatCollator
    from mmalign.data import ChatDataset, PreferenceDataModule

    sft, pairs = _records(world)
    if case == "dpo":
        path = tmp / "pairs.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        dm = PreferenceDataModule(str(path), data_root=str(world), batch_size=4, layout="shared_prompt", max_length=256)
        dm.connect(policy.processor)
        dm.setup()
        items, collate = [dm.train_set[i] for i in range(4)], PreferenceCollator(policy.processor, max_length=256)
    else:
        ds = ChatDataset(sft)
        items, collate = [ds[i] for i in range(4)], VisionChatCollator(policy.processor, max_length=256)
    return [collate(items), collate(items[:SPLIT]), collate(items[SPLIT:])]


def _module(model_dir: Path, case: str):
    from mmalign.methods.dpo import DPOModule
    from mmalign.methods.sft import SFTModule
    from models.policy import HFPolicy

    torch.manual_seed(0)
    policy = HFPolicy(str(model_dir))
    if case == "dpo":
        # loss_type "nll": the DPO term and the chosen answers' NLL, both means over the pairs;
        # reference = a frozen copy of the starting weights (full fine-tuning), taken as setup() does
        m = DPOModule(policy, loss_type="nll", beta=0.5, reference="on_the_fly")
        m.setup("fit")
    else:
        m = SFTModule(policy, loss_normalization=case.removeprefix("sft_"))
    # eval(): no dropout, so both runs see the same function (gradients still flow)
    return m.eval()


class _Step(torch.nn.Module):
    """What Lightning's DDP wrapper does: forward = the module's training_step, so DDP's hooks
    see the forward and all-reduce the gradients in backward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.training_step(batch, 0)


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for n, p in module.named_parameters() if p.requires_grad}


def _naive(local: torch.Tensor, min_total: float = 0.0) -> torch.Tensor:
    """The per-rank normaliser this file checks against: each rank divides by its own count."""
    return local.detach().float().clamp(min=min_total)


def _worker(rank: int, port: int, model_dir: str, world: str, tmp: str) -> None:
    import mmalign.methods.dpo as dpo_mod
    import mmalign.methods.sft as sft_mod
    from mmalign.methods.base import global_denominator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for case in CASES:
            module = _module(Path(model_dir), case)
            batch = _batches(module.policy, Path(world), Path(tmp) / f"rank{rank}", case)[1 + rank]
            # find_unused_parameters: the tiny LLaVA never reads its last vision layer (features
            # come from layer -2); without it that bucket is never all-reduced
            ddp = torch.nn.parallel.DistributedDataParallel(_Step(module), find_unused_parameters=True)
            for how in ("global", "naive"):
                if how == "naive":
                    sft_mod.global_denominator = dpo_mod.global_denominator = _naive
                else:
                    sft_mod.global_denominator = dpo_mod.global_denominator = global_denominator
                module.zero_grad(set_to_none=True)
                loss = ddp(batch)
                loss.backward()
                # the logged loss: sync_dist's mean of the ranks' values
                logged = loss.detach().clone()
                dist.all_reduce(logged)
                out[f"{case}/{how}"] = {"loss": float(logged) / WORLD, "grads": _grads(module)}
        if rank == 0:
            torch.save(out, Path(tmp) / "ddp.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# the checks


@pytest.fixture(scope="module")
def ddp_results(world, model_dirs, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    for r in range(WORLD):
        (tmp / f"rank{r}").mkdir()
    mp.spawn(_worker, args=(_free_port(), str(model_dirs["llava"]), str(world), str(tmp)), nprocs=WORLD, join=True)
    return torch.load(tmp / "ddp.pt", weights_only=True)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """Every gradient equal to ~1e-5 relative (of the largest entry of the whole gradient, so
    that entries that are ~0 do not turn float noise into a large ratio); and that error."""
    scale = max(float(v.abs().max()) for v in b.values())
    err = max(float((a[k] - b[k]).abs().max()) for k in b) / scale
    return err < 1e-5, err


@pytest.mark.parametrize("case", CASES)
def test_ddp_matches_one_process_on_the_global_batch(case, ddp_results, world, model_dirs, tmp_path):
    module = _module(model_dirs["llava"], case)
    full = _batches(module.policy, world, tmp_path, case)[0]
    loss = module.training_step(full, 0)
    loss.backward()
    ref = _grads(module)
    assert any(float(g.abs().max()) > 0 for g in ref.values())

    got = ddp_results[f"{case}/global"]
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert set(got["grads"]) == set(ref)
    ok, err = _close(got["grads"], ref)
    assert ok, f"DDP gradient differs from the 1-process one by {err:.2e} (relative to the largest entry)"

    # Without the global normaliser the same DDP run trains on a different objective: the mean
    # of the two ranks' means, where the one-word answer (or lone pair) of rank 1 weighs as much
    # as rank 0's three captions.
    naive = ddp_results[f"{case}/naive"]
    ok, err = _close(naive["grads"], ref)
    assert not ok and err > 1e-2, f"the per-rank mean should miss the global gradient, off by {err:.2e} only"
    # (the same tolerance as the check above; for DPO the pairs' losses are close, so the
    # means differ less in value than in gradient)
    assert naive["loss"] != pytest.approx(loss.item(), rel=1e-5)


def test_the_split_is_unequal(world, model_dirs, tmp_path):
    """The premise of the checks above: the two ranks' parts differ in answer tokens and size."""
    from models.policy import HFPolicy

    policy = HFPolicy(str(model_dirs["llava"]))
    _, part0, part1 = _batches(policy, world, tmp_path, "sft_token")
    n0, n1 = (int((b["labels"][:, 1:] != -100).sum()) for b in (part0, part1))
    assert n0 > 10 * n1 > 0
    assert part0["input_ids"].shape[0] == SPLIT and part1["input_ids"].shape[0] == 4 - SPLIT


# ---------------------------------------------------------------------------------------------
# the real CLI under Lightning's "ddp" strategy


def test_sft_trains_under_lightning_ddp_and_rank_0_exports_once(world, model_dirs, tmp_path):
    """`mmalign fit ... --config configs/trainer/ddp.yaml --trainer.devices 2`: Lightning relaunches
    the command for rank 1; both ranks train 2 steps and only rank 0 writes the export."""
    args = [sys.executable, "-m", "mmalign.cli", "fit", "--config", str(ROOT / "configs/sft/tiny.yaml"),
            "--config", str(ROOT / "configs/trainer/ddp.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.init_args.policy.init_args.path", str(model_dirs["llava"]),
            "--model.init_args.export.dir", str(tmp_path / "model"),
            "--data.init_args.train_file", str(world / "train/sft.jsonl"),
            "--data.init_args.val_file", str(world / "val/sft.jsonl"),
            "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.run(args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count(f"exported policy -> {tmp_path / 'model'}") == 1, out[-3000:]
    assert "GLOBAL_RANK: 1" in out or "MEMBER: 2/2" in out, out[-3000:]   # rank 1 really ran
    assert (tmp_path / "model/config.json").is_file()
    rows = (tmp_path / "logs/metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and len(rows) > 1
    print(f"2-process DDP CLI run: {time.time() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------
# the trainer snippets


@pytest.mark.parametrize("snippet,strategy,args", [
    ("ddp", "DDPStrategy", {"find_unused_parameters": True}),
    ("fsdp", "FSDPStrategy", {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}),
    ("deepspeed", "DeepSpeedStrategy", {"stage": 2}),
])
def test_trainer_snippets_compose_with_a_method_config(snippet, strategy, args, capsys):
    """Each configs/trainer/*.yaml composes with a method config through the real `mmalign fit`
    parser (`--print_config` parses and type-checks everything, then exits before anything is
    built), its strategy reaches the trainer's arguments, and the method config is intact. FSDP
    on CPU and DeepSpeed (not installed here) cannot run on this machine: this is what can be
    checked without them."""
    import yaml

    from mmalign.cli import cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(ROOT / "configs/sft/tiny.yaml"),
                  "--config", str(ROOT / f"configs/trainer/{snippet}.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    s = cfg["trainer"]["strategy"]
    assert s["class_path"] == f"lightning.pytorch.strategies.{strategy}"
    assert args.items() <= s["init_args"].items()
    assert cfg["trainer"]["accelerator"] == "gpu" and cfg["trainer"]["devices"] == -1   # the snippet's
    assert cfg["model"]["class_path"] == "mmalign.methods.sft.SFTModule"
    method = yaml.safe_load((ROOT / "configs/sft/tiny.yaml").read_text())  # the method's own values survive
    assert cfg["trainer"]["max_steps"] == method["trainer"]["max_steps"] == 1500
    assert cfg["data"]["init_args"]["batch_size"] == method["data"]["init_args"]["batch_size"] == 16
