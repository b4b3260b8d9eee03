"""Faults: a training run killed with SIGKILL mid-epoch resumes exactly (`--ckpt_path last`), and a
data stage killed mid-write never leaves an output that looks complete.

Every kill here is a real ``SIGKILL`` of a real ``python -m ...`` subprocess: no ``finally``, no
``atexit``, no Lightning teardown runs, exactly as when the OOM killer or a pre-empted node ends a run.
The moment of the kill is made deterministic by letting the child say where it is (a marker file
written by a test-only callback, or the stage's own temporary folder) instead of sleeping and hoping.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mmalign.stage import MANIFEST, input_hash, is_up_to_date, read_manifest

ROOT = Path(__file__).resolve().parents[1]
#: One thread per child: the same reduction order in every run (so "exactly the same" can be
#: asked for) and no fight over the two cores with the other children.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
#: Generous: a child starts transformers + Lightning on a loaded 2-core machine.
WAIT_S = 600


class PauseAt(Callback):
    """Test-only: when training is about to run the batch after ``step`` optimizer steps, write
    ``marker`` and hang, so the parent can SIGKILL a run that is known to be mid-epoch, past its
    last checkpoint. Never used outside these tests."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(json.dumps({"global_step": trainer.global_step, "batch_idx": batch_idx,
                                                     "epoch": trainer.current_epoch}))
            while True:  # wait for the kill; the parent's timeout bounds this
                time.sleep(1)


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=CHILD_ENV, stdout=out, stderr=subprocess.STDOUT)


def run(args: list[str], log: Path) -> None:
    p = start(args, log)
    try:
        rc = p.wait(timeout=WAIT_S)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, f"{' '.join(args)} failed ({rc}):\n{log.read_text()[-4000:]}"


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> None:
    """Poll until ``path`` exists; fail early (with the child's output) if the child ends first."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child ended ({proc.returncode}) before {path.name} appeared:\n{log.read_text()[-4000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


# -- (a) training: SIGKILL mid-epoch, resume with --ckpt_path last ---------------------------------

CKPT_EVERY, KILL_AT, MAX_STEPS = 6, 8, 16
#: 24 examples in batches of 2 = 12 batches an epoch: the checkpoint (step 6) and the kill (during
#: step 9) are mid-epoch 0, and the resumed run crosses into epoch 1 (steps 13-16), so both the
#: position inside an epoch and the next epoch's order must come out right.
N_EXAMPLES, BATCH = 24, 2


def write_pairs(world: Path, path: Path, n: int) -> Path:
    """Caption pairs: chosen = a scene's caption, rejected = another scene's (a hallucination)."""
    from mmalign.records import read_records

    recs = [r for r in read_records(world / "train/sft.jsonl", "sft", data_root=world)
            if r.meta.get("task") == "detailed_caption"]
    rows = [{"id": f"p{i}", "images": recs[i].images, "prompt": recs[i].messages[:-1],
             "chosen": recs[i].messages[-1]["content"][0]["text"],
             "rejected": recs[i + 1].messages[-1]["content"][0]["text"]} for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def fit_args(method: str, world: Path, model: Path, root: Path, pairs: Path | None, *extra: str) -> list[str]:
    common = ["--trainer.default_root_dir", str(root), "--trainer.max_steps", str(MAX_STEPS),
              "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
              "--model.init_args.policy.init_args.path", str(model),
              "--model.init_args.export.dir", str(root / "model"),
              "--data.init_args.data_root", str(world), "--data.init_args.batch_size", str(BATCH),
              "--data.init_args.limit", str(N_EXAMPLES)]
    if method == "sft":  # tiny.yaml keeps its task_weights: the weighted (with replacement) sampler
        specific = ["--config", str(ROOT / "configs/sft/tiny.yaml"),
                    "--data.init_args.train_file", str(world / "train/sft.jsonl"),
                    "--data.init_args.val_file", str(world / "val/sft.jsonl")]
    else:  # plain DPO, reference on the fly: the shuffled (permutation) sampler. LoRA with a
        # large dropout makes every step draw random numbers, so the RNG states must resume too.
        specific = ["--config", str(ROOT / "configs/dpo/dpo.yaml"),
                    "--model.init_args.policy.init_args.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.3}),
                    "--model.init_args.reference", "on_the_fly", "--model.init_args.probe_file", "null",
                    "--data.init_args.train_file", str(pairs), "--data.init_args.val_file", str(pairs)]
    return ["-m", "mmalign.cli", "fit", *specific, *common, *extra]


def callbacks(*more: dict) -> list[str]:
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": CKPT_EVERY, "save_last": True, "save_top_k": 1, "monitor": None}}
    return ["--trainer.callbacks", json.dumps([ckpt, *more])]


def train_losses(root: Path) -> dict[int, float]:
    """``step -> train/loss`` from the run's CSV log; a step logged twice (before the kill and again
    after the resume) keeps its last value, the one the finished run stands on."""
    with open(root / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {model_dir}"
    return out


@pytest.mark.parametrize("method", ["sft", "dpo-lora"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(method, world, model_dirs, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", N_EXAMPLES) if method != "sft" else None
    model = model_dirs["llava"]
    ref, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    t0 = time.monotonic()
    run(fit_args(method, world, model, ref, pairs, *callbacks()), tmp_path / "ref.log")
    t_ref = time.monotonic() - t0

    marker = tmp_path / "paused.json"
    pause = {"class_path": "tests.test_faults.PauseAt", "init_args": {"step": KILL_AT, "marker": str(marker)}}
    proc = start(fit_args(method, world, model, run_dir, pairs, *callbacks(pause)), tmp_path / "killed.log")
    wait_for(marker, proc, tmp_path / "killed.log")
    sigkill(proc)
    where = json.loads(marker.read_text())
    assert where == {"global_step": KILL_AT, "batch_idx": KILL_AT, "epoch": 0}  # killed mid-epoch 0
    assert not (run_dir / "model").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == CKPT_EVERY and ckpt["epoch"] == 0  # the last checkpoint is mid-epoch too
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": CKPT_EVERY, "epoch": 0, "seed": 0}]
    assert "RNGState" in ckpt["callbacks"]

    t0 = time.monotonic()
    run(fit_args(method, world, model, run_dir, pairs, *callbacks(), "--ckpt_path", "last"), tmp_path / "resumed.log")
    t_resume = time.monotonic() - t0

    expected, got = train_losses(ref), train_losses(run_dir)
    after = sorted(s for s in expected if s >= CKPT_EVERY)
    assert len(after) == MAX_STEPS - CKPT_EVERY, after  # every step the resumed run trained was logged
    assert [got.get(s) for s in after] == pytest.approx([expected[s] for s in after], rel=1e-6, abs=1e-7)
    w_ref, w_run = weights(ref / "model"), weights(run_dir / "model")
    assert w_ref.keys() == w_run.keys()
    for k in w_ref:
        torch.testing.assert_close(w_run[k], w_ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    print(f"{method}: uninterrupted {t_ref:.0f}s, resume {t_resume:.0f}s")


def draws() -> tuple:
    import random

    import numpy as np

    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_rng_state_survives_a_checkpoint_and_waits_for_the_first_step(tmp_path):
    """RNGState puts the saved RNGs back at the first training step (or the first real
    validation), not at load time: sanity checks and fit-start probes of the resumed run come
    between, and must not shift what the training steps draw."""
    import random
    from types import SimpleNamespace

    import numpy as np

    from mmalign.cli import RNGState

    def seed(n: int) -> None:
        torch.manual_seed(n)
        random.seed(n)
        np.random.seed(n)

    seed(1)
    saved = RNGState().state_dict()
    expected = draws()
    # Lightning loads checkpoints with weights_only=True: the state must survive that.
    torch.save({"callbacks": {"RNGState": saved}}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RNGState"]

    cb = RNGState()
    seed(2)
    cb.load_state_dict(loaded)
    assert draws() != expected  # not applied at load time
    cb.on_validation_start(SimpleNamespace(sanity_checking=True), None)
    assert draws() != expected  # nor by the sanity check
    cb.on_train_batch_start(None, None, None, 0)
    assert draws() == expected
    cb.on_train_batch_start(None, None, None, 1)  # once only
    assert draws() != expected

    cb.load_state_dict(loaded)  # a validation replayed right after the checkpoint comes first
    cb.on_validation_start(SimpleNamespace(sanity_checking=False), None)
    assert draws() == expected


# -- (b) data stages: SIGKILL mid-write ------------------------------------------------------------

def scenes_args(out: Path, seed: int, n_train: int, *extra: str) -> list[str]:
    return ["--out", str(out), "--seed", str(seed), "--n-train", str(n_train), "--n-val", "8", "--n-test", "8",
            "--no-progress", *extra]


def scenes_config(args: list[str]) -> dict:
    from data_pipelines.scenes import build_config, parse_args

    return build_config(parse_args(args))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path; the manifest without its creation time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == MANIFEST:
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "created"}).encode()
            out[str(p.relative_to(folder))] = data
    return out


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def assert_not_complete(out: Path, config: dict) -> None:
    """Nothing at ``out`` passes for a complete output: not the stage's own check, not a
    downstream stage's input check."""
    assert read_manifest(out) is None
    assert not is_up_to_date(out, config, [])
    with pytest.raises(FileNotFoundError):
        input_hash(out)


def kill_while_rendering(args: list[str], out: Path, log: Path) -> Path:
    """Start the data stage, SIGKILL it once its temporary folder holds 50 train images; return
    that folder (left behind, as a killed process leaves it)."""
    proc = start(["-m", "data_pipelines.scenes", *args], log)
    tmp = out.with_name(f"{out.name}.tmp-{proc.pid}")
    wait_for(tmp / "images" / "train" / "000049.png", proc, log)
    sigkill(proc)
    assert not (tmp / MANIFEST).exists() and not (tmp / "train" / "sft.jsonl").exists()  # really mid-write
    return tmp


def test_data_stage_killed_mid_write_is_never_taken_as_complete(tmp_path):
    # 3000 scenes take several seconds to render: the kill lands well inside the writing.
    n = 3000
    ref, out = tmp_path / "ref" / "data", tmp_path / "run" / "data"
    args = scenes_args(out, 1, n)
    config = scenes_config(args)
    run(["-m", "data_pipelines.scenes", *scenes_args(ref, 1, n)], tmp_path / "ref.log")

    # First run killed: no output at all, and nothing that looks like one.
    tmp = kill_while_rendering(args, out, tmp_path / "killed.log")
    assert not out.exists()
    assert_not_complete(out, config)
    assert_not_complete(tmp, config)  # the half-written folder itself is not complete either

    # The re-run completes, clears the dead run's folder and writes what an uninterrupted run writes.
    run(["-m", "data_pipelines.scenes", *args], tmp_path / "rerun.log")
    assert is_up_to_date(out, config, []) and siblings(out) == []
    expected = tree(ref)
    assert tree(out) == expected

    # A forced re-run with another seed, killed mid-write, leaves the complete output untouched.
    other = scenes_args(out, 2, n, "--force")
    kill_while_rendering(other, out, tmp_path / "killed2.log")
    assert tree(out) == expected and is_up_to_date(out, config, [])
    assert not is_up_to_date(out, scenes_config(other), [])


KILL_POINTS = {
    # every file written, the manifest not yet
    "before_manifest": "orig = stage.atomic_write_text\n"
                       "def patched(path, *a, **k):\n"
                       "    if Path(path).name == stage.MANIFEST: die()\n"
                       "    return orig(path, *a, **k)\n"
                       "stage.atomic_write_text = patched\n",
    # the manifest written in the temporary folder, the folder not yet swapped in
    "before_swap": "stage.StageOutput._swap_into_place = lambda self: die()\n",
    # the old output renamed to its trash name, the new one not yet renamed into place
    # (StageOutput is the only caller of os.rename in a stage run: old -> trash, then tmp -> out)
    "between_renames": "orig = os.rename\n"
                       "calls = []\n"
                       "def patched(a, b):\n"
                       "    calls.append(a)\n"
                       "    if len(calls) == 2: die()\n"
                       "    return orig(a, b)\n"
                       "os.rename = patched\n",
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_data_stage_killed_inside_the_commit(point, tmp_path):
    """SIGKILL at each step of StageOutput's commit (manifest write, swap, between the swap's two
    renames), over an existing complete output: ``out`` is always the old complete output or
    absent, never the new one half-made; the re-run completes and cleans up."""
    out = tmp_path / "data"
    old_args, new_args = scenes_args(out, 1, 12), scenes_args(out, 2, 12)
    from data_pipelines.scenes import main

    assert main(old_args) == 0
    old = tree(out)
    script = ("import os, signal, sys\nfrom pathlib import Path\nimport mmalign.stage as stage\n"
              "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n" + KILL_POINTS[point] +
              "from data_pipelines.scenes import main\nmain(sys.argv[1:])\nsys.exit('not killed')\n")
    proc = start(["-c", script, *new_args], tmp_path / "killed.log")
    assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()

    new_config = scenes_config(new_args)
    assert not is_up_to_date(out, new_config, [])
    if point == "between_renames":
        assert not out.exists()  # briefly absent, never partial
        assert_not_complete(out, new_config)
    else:
        assert tree(out) == old and is_up_to_date(out, scenes_config(old_args), [])
    assert siblings(out)  # the dead run's folders are still there...

    assert main(new_args) == 0
    assert is_up_to_date(out, new_config, []) and siblings(out) == []  # ...until the next run clears them
    assert read_manifest(out)["seed"] == 2


def test_killed_during_export_then_resumed_exports(world, model_dirs, tmp_path):
    """A run killed while exporting, resumed with --ckpt_path last from a checkpoint already at
    max_steps (Lightning then skips the training loop), still exports: the export hangs on
    on_fit_end, not on_train_end."""
    from mmalign.cli import cli_main
    from tests.test_sft_cli import fit_args

    cb = json.dumps([{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 2, "save_last": True}}])
    args = fit_args(world, model_dirs["llava"], tmp_path, "--trainer.max_steps", "4", "--trainer.callbacks", cb)
    cli_main(args)
    # What a SIGKILL inside the export leaves (StageOutput's swap never ran): the final
    # checkpoint, a dead run's temporary folder, no model.
    (tmp_path / "model").rename(tmp_path / "model.tmp-999999")
    resumed = cli_main([*args, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    assert read_manifest(tmp_path / "model") is not None
