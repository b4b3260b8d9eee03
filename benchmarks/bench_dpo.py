"""DPO training throughput and peak memory: mmalign's DPOModule against TRL's DPOTrainer.

    make bench
    python benchmarks/bench_dpo.py --steps 20 --batch-size 8 --threads 1    # the defaults

Same tiny LLaVA, same pairs in the same order, same batch size, same machine, one run. Every
variant runs in its own fresh subprocess (so peak resident memory, ``ru_maxrss``, is that
variant's alone) and does ``--warmup`` untimed optimizer steps, then ``--steps`` timed ones:

    trl                          TRL DPOTrainer, reference model on the fly (its default)
    trl_precomputed              TRL with precompute_ref_log_probs=True (refused for vision data by TRL 1.16)
    mmalign_concat               DPOModule, layout "concat" (2B full rows, like TRL), reference on the fly
    mmalign_shared               DPOModule, layout "shared_prompt" (image+prompt once per pair), on the fly
    mmalign_shared_precomputed   DPOModule(reference="precomputed"), shared_prompt; the one-pass
                                 precompute (data_pipelines.ref_logps.reference_logps) timed separately
    trl_trainer_loop             TRL default through DPOTrainer.train() itself (its own loop; a check
                                 that the shared loop below does not undersell TRL)

How each step is timed. The first five variants run one loop, written once below (``_timed_loop``):
fetch the next batch from the library's own data path (TRL: ``trainer.get_train_dataloader()``,
its collator; mmalign: a DataLoader over ``PreferenceDataset`` with ``PreferenceCollator``; image
decoding and collation are inside the timed step on both sides), the library's loss
(``DPOTrainer.compute_loss`` / ``DPOModule.compute_loss``, each module called directly, no
Lightning or HF Trainer loop), ``backward``, gradient clipping at 1.0, and the AdamW step that
TRL's Trainer builds by default (``Trainer.get_optimizer_cls_and_kwargs``: fused AdamW), constant
``--lr``. The two libraries are configured to compute the same quantity: float32, no gradient
checkpointing and no bf16 autocast (TRL defaults both on; mmalign's HFPolicy defaults both off),
dropout off, sigmoid loss with beta 0.1 averaged over pairs, no truncation (TRL ``max_length=None``,
mmalign ``max_length`` above every pair, checked), sequential sampling. Every variant records its
per-step losses: from the same start on the same batches they must track TRL's. ``--threads``
defaults to 1: on a small machine shared with other jobs, two OpenMP threads per process stall on
each other and the timings stop meaning anything.

The loss check (``loss_agreement``) perturbs the policy away from the reference (so the loss is
not trivially log 2) and computes one batch's loss through TRL's own ``compute_loss`` and through
DPOModule in each layout; they must agree to 1e-4.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "trl": "TRL DPOTrainer, reference on the fly (TRL default)",
    "trl_precomputed": "TRL DPOTrainer, precompute_ref_log_probs=True",
    "mmalign_concat": "mmalign DPOModule, concat layout, reference on the fly",
    "mmalign_shared": "mmalign DPOModule, shared_prompt layout, reference on the fly",
    "mmalign_shared_precomputed": "mmalign DPOModule, shared_prompt layout, precomputed reference",
    "trl_trainer_loop": "TRL default through DPOTrainer.train() (its own loop)",
}
BASELINE = "trl"
TOLERANCE = 1e-4
TARGET = 1.5  # the issue: mmalign >= 1.5x TRL default pairs/s


# ------------------------------------------------------------------------------------------------
# data


def make_pairs(responses: Path, out: Path, limit: int = 0) -> Path:
    """Preference records from sampled responses: chosen = the record's ``reference`` answer,
    rejected = the sampled ``response`` (pairs where the two are equal are skipped)."""
    rows = []
    with open(responses, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("reference") and r["reference"].strip() != r["response"].strip():
                rows.append({"id": r["id"], "images": r["images"], "prompt": r["prompt"],
                             "chosen": r["reference"], "rejected": r["response"]})
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{responses}: no record with a reference answer different from its response")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def read_pairs(path: Path, data_root: Path | None, n: int) -> list:
    """``n`` preference records, in file order; the file is cycled when it holds fewer."""
    from mmalign.records import read_records

    recs = read_records(path, "preference", data_root=data_root)
    if not recs:
        raise ValueError(f"{path}: no preference records")
    return [recs[i % len(recs)] for i in range(n)]


def trl_dataset(records: list):
    """The same pairs as a ``datasets.Dataset`` in TRL's conversational vision preference format."""
    from datasets import Dataset

    from mmalign.records import load_image

    return Dataset.from_list([{"images": [load_image(p, r.id) for p in r.images], "prompt": r.prompt,
                               "chosen": r.chosen, "rejected": r.rejected} for r in records])


# ------------------------------------------------------------------------------------------------
# the two libraries, set up to compute the same quantity


def trl_config(out_dir: str, batch_size: int, lr: float, beta: float = 0.1, **overrides: Any):
    """A DPOConfig computing what DPOModule(loss_type="sigmoid") computes: float32, no gradient
    checkpointing, no truncation, sequential batches, constant lr; DPO sigmoid loss, mean over pairs."""
    from trl import DPOConfig

    kw: dict[str, Any] = {
        "output_dir": out_dir, "per_device_train_batch_size": batch_size, "learning_rate": lr, "beta": beta,
        "loss_type": ["sigmoid"], "max_length": None, "bf16": False, "fp16": False,
        "activation_checkpointing": False, "disable_dropout": True, "precompute_ref_log_probs": False,
        "train_sampling_strategy": "sequential", "lr_scheduler_type": "constant", "warmup_steps": 0,
        "max_grad_norm": 1.0, "weight_decay": 0.0, "dataloader_num_workers": 0, "report_to": [],
        "save_strategy": "no", "logging_steps": 10**9, "use_cpu": True, "seed": 0, "disable_tqdm": True,
    }
    kw.update(overrides)
    return DPOConfig(**kw)


def load_model(path: str | Path):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)


def trl_trainer(model_path: str | Path, records: list, batch_size: int, lr: float, out_dir: str,
                model=None, ref_model=None, **overrides: Any):
    """TRL's DPOTrainer on ``records``; with ``ref_model=None`` TRL loads the reference itself."""
    from trl import DPOTrainer

    from models.processors import load_processor

    return DPOTrainer(model=model if model is not None else load_model(model_path), ref_model=ref_model,
                      args=trl_config(out_dir, batch_size, lr, **overrides), train_dataset=trl_dataset(records),
                      processing_class=load_processor(str(model_path)))


def adamw(params, args):
    """The optimizer TRL's Trainer builds from ``args`` (a DPOConfig; ``optim`` defaults to fused
    AdamW on torch >= 2.8), over ``params``: the same class and settings for both libraries."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls([p for p in params if p.requires_grad], **kwargs)


def perturb_(model, scale: float = 0.02, seed: int = 0) -> None:
    """Move every weight by seeded Gaussian noise: a policy that differs from its reference."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# ------------------------------------------------------------------------------------------------
# loss agreement


def loss_agreement(model_path: str | Path, records: list, max_length: int = 4096, beta: float = 0.1,
                   noise: float = 0.02, seed: int = 0) -> dict[str, Any]:
    """One batch (all of ``records``), DPO sigmoid loss with ``beta``: TRL's ``compute_loss`` vs
    DPOModule in both layouts and with precomputed reference log-probs.

    The policy is the checkpoint plus seeded noise (``perturb_``); the reference is the checkpoint.
    Returns every loss, the policy's summed chosen/rejected log-probs on each side, and
    ``max_abs_diff``, the largest |mmalign - TRL| over the losses."""
    import torch

    from data_pipelines.ref_logps import reference_logps
    from mmalign.collators import PreferenceCollator
    from mmalign.data import PreferenceDataset
    from mmalign.methods.dpo import DPOModule
    from models.policy import HFPolicy

    n = len(records)
    policy = HFPolicy(str(model_path))
    with policy.reference():  # the reference copy is taken now, from the unperturbed checkpoint
        pass
    perturb_(policy.model, noise, seed)
    out: dict[str, Any] = {"pairs": n, "beta": beta, "noise": noise}

    with tempfile.TemporaryDirectory() as d:
        model = load_model(model_path)
        model.load_state_dict(policy.model.state_dict())
        trainer = trl_trainer(model_path, records, n, 1e-6, d, model=model, ref_model=load_model(model_path),
                              beta=beta)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        with torch.no_grad():
            out["trl"] = float(trainer.compute_loss(trainer.model, batch))
        m = trainer._metrics["train"]
        out["trl_logps"] = [m["logps/chosen"][-1], m["logps/rejected"][-1]]

    examples = [PreferenceDataset(records)[i] for i in range(n)]
    module = DPOModule(policy, beta=beta, loss_type="sigmoid")
    module.train()
    for layout in ("concat", "shared_prompt"):
        collator = PreferenceCollator(policy.processor, max_length=max_length, layout=layout, on_overlength="error")
        with torch.no_grad():
            o, stats = module.compute_loss(collator(examples))
        out[f"mmalign_{layout}"] = float(o.loss)
        out[f"mmalign_{layout}_logps"] = [float(stats["logp_chosen"]), float(stats["logp_rejected"])]

    # Precomputed reference: the one-pass stage function, its numbers passed in the batch meta.
    scored, missing = reference_logps(policy, records, n, max_length, "shared_prompt", progress=False)
    assert not missing, missing
    examples = [{**ex, "meta": {**ex["meta"], "ref_chosen_logp": scored[ex["meta"]["id"]][0],
                                "ref_rejected_logp": scored[ex["meta"]["id"]][1]}} for ex in examples]
    pre = DPOModule(policy, beta=beta, loss_type="sigmoid", reference="precomputed")
    pre.train()
    with torch.no_grad():
        o, _ = pre.compute_loss(PreferenceCollator(policy.processor, max_length=max_length)(examples))
    out["mmalign_shared_prompt_precomputed"] = float(o.loss)
    mine = [k for k in out if k.startswith("mmalign_") and not k.endswith("_logps")]
    out["max_abs_diff"] = max(abs(out[k] - out["trl"]) for k in mine)
    out["tolerance"] = TOLERANCE
    out["agree"] = out["max_abs_diff"] <= TOLERANCE
    return out


# ------------------------------------------------------------------------------------------------
# one variant, in its own process


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_loop(batches, loss_fn, params: list, opt, warmup: int, steps: int) -> dict[str, Any]:
    """``warmup + steps`` optimizer steps; each step's wall time covers fetching and collating
    its batch, the loss, backward, clipping and the AdamW step."""
    import torch

    it = iter(batches)
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {"step_s": times, "losses": losses}


def _mmalign_variant(spec: dict, layout: str, reference: str) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from mmalign.collators import PreferenceCollator
    from mmalign.data import PreferenceDataset
    from mmalign.methods.dpo import DPOModule
    from models.policy import HFPolicy

    pairs = spec["ref_pairs"] if reference == "precomputed" else spec["pairs"]
    records = read_pairs(Path(pairs), spec["data_root"], spec["n"])
    policy = HFPolicy(spec["model"])
    module = DPOModule(policy, optim=DPOModule.optim_defaults(lr=spec["lr"]), beta=0.1, loss_type="sigmoid", reference=reference)
    module.train()
    collator = PreferenceCollator(policy.processor, max_length=spec["max_length"], layout=layout, on_overlength="error")
    loader = DataLoader(PreferenceDataset(records), batch_size=spec["batch_size"], shuffle=False, num_workers=0,
                        collate_fn=collator)
    params = list(policy.trainable_parameters())
    with tempfile.TemporaryDirectory() as d:
        # Building a DPOConfig resets accelerate's state: only here, where no TRL trainer lives.
        opt = adamw(params, trl_config(d, spec["batch_size"], spec["lr"]))
    res = _timed_loop(loader, lambda b: module.compute_loss(b)[0].loss, params, opt, spec["warmup"], spec["steps"])
    return {**res, "driver": "module.compute_loss called directly (no Lightning loop)"}


def _trl_variant(spec: dict, work: str, **overrides: Any) -> dict[str, Any]:
    records = read_pairs(Path(spec["pairs"]), spec["data_root"], spec["n"])
    trainer = trl_trainer(spec["model"], records, spec["batch_size"], spec["lr"], work, **overrides)
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    res = _timed_loop(trainer.get_train_dataloader(), lambda b: trainer.compute_loss(trainer.model, b), params,
                      adamw(params, trainer.args), spec["warmup"], spec["steps"])
    return {**res, "driver": "DPOTrainer.compute_loss called directly (no HF Trainer loop)"}


def _trl_trainer_loop(spec: dict, work: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    records = read_pairs(Path(spec["pairs"]), spec["data_root"], spec["n"])
    total = spec["warmup"] + spec["steps"]
    trainer = trl_trainer(spec["model"], records, spec["batch_size"], spec["lr"], work, max_steps=total)
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    trainer.add_callback(StepEnds())
    trainer.train()
    # Step k's time: from the end of step k-1 (or train begin) to the end of step k, so the
    # batch fetch, which HF's loop does before on_step_begin, is inside it.
    times = [b - a for a, b in itertools.pairwise(ends)]
    return {"step_s": times, "losses": [], "driver": "DPOTrainer.train() (HF Trainer loop), step-end callbacks"}


def _precompute(spec: dict) -> dict[str, Any]:
    """The one reference pass over the unique pairs, written as records with ref log-probs."""
    from data_pipelines.ref_logps import reference_logps
    from models.policy import HFPolicy

    records = read_pairs(Path(spec["pairs"]), spec["data_root"], spec["n"])
    unique = list({r.id: r for r in records}.values())
    policy = HFPolicy(spec["model"]).eval()
    t0 = time.perf_counter()
    scored, missing = reference_logps(policy, unique, spec["batch_size"], spec["max_length"], "shared_prompt",
                                      progress=False)
    seconds = time.perf_counter() - t0
    if missing:
        raise ValueError(f"precompute dropped pairs: {missing}")
    with open(spec["pairs"], encoding="utf-8") as f:
        raw = {o["id"]: o for o in map(json.loads, filter(str.strip, f))}
    with open(spec["ref_pairs"], "w", encoding="utf-8") as f:
        for r in unique:
            c, rej, _, _ = scored[r.id]
            f.write(json.dumps({**raw[r.id], "ref_chosen_logp": c, "ref_rejected_logp": rej}) + "\n")
    return {"pairs": len(unique), "seconds": seconds, "pairs_per_s": len(unique) / seconds,
            "driver": "data_pipelines.ref_logps.reference_logps (shared_prompt, no grad)"}


def worker(name: str, spec: dict) -> dict[str, Any]:
    """Run one variant (or the precompute pass or the loss check) in this fresh process."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    # Import both libraries in every variant, so the post-import baseline is the same everywhere.
    import datasets  # noqa: F401
    import trl  # noqa: F401

    import mmalign.methods.dpo  # noqa: F401
    import models.policy  # noqa: F401

    base = _rss_mib()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if name == "loss_check":
            records = read_pairs(Path(spec["pairs"]), spec["data_root"], spec["batch_size"])
            res: dict[str, Any] = loss_agreement(spec["model"], records, spec["max_length"])
        elif name == "precompute":
            res = _precompute(spec)
        elif name == "trl":
            res = _trl_variant(spec, work)
        elif name == "trl_precomputed":
            try:
                res = _trl_variant(spec, work, precompute_ref_log_probs=True)
            except (ValueError, NotImplementedError) as e:
                res = {"unsupported": f"{type(e).__name__}: {e}"}
        elif name == "trl_trainer_loop":
            res = _trl_trainer_loop(spec, work)
        elif name.startswith("mmalign_"):
            layout = "concat" if name == "mmalign_concat" else "shared_prompt"
            res = _mmalign_variant(spec, layout, "precomputed" if name.endswith("precomputed") else "on_the_fly")
        else:
            raise ValueError(f"unknown variant {name!r}")
    res.update(threads=torch.get_num_threads(), rss_after_imports_mib=base, peak_rss_mib=_peak_rss_mib(),
               wall_s=time.perf_counter() - t0)
    res["peak_rss_over_imports_mib"] = res["peak_rss_mib"] - base
    if "step_s" in res:
        timed = res["step_s"][spec["warmup"]:]
        res["timed_steps"] = len(timed)
        res["s_per_step"] = sum(timed) / len(timed)
        res["s_per_step_median"] = statistics.median(timed)
        res["pairs_per_s"] = spec["batch_size"] * len(timed) / sum(timed)
    return res


def run_worker(name: str, spec: dict, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        spec_file, result_file = Path(d) / "spec.json", Path(d) / "result.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_file),
               "--result", str(result_file)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if proc.returncode != 0 or not result_file.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            return {"error": f"worker exited {proc.returncode}:\n{tail}"}
        return json.loads(result_file.read_text())


# ------------------------------------------------------------------------------------------------
# report


def machine_info(threads: int) -> dict[str, Any]:
    import accelerate
    import datasets
    import lightning
    import torch
    import transformers
    import trl

    from mmalign.machine import machine_base

    return {
        **machine_base(), "torch_threads": threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "datasets": datasets.__version__,
        "accelerate": accelerate.__version__, "lightning": lightning.__version__,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, dict]) -> list[str]:
    base = results.get(BASELINE, {}).get("pairs_per_s")
    rows = ["| variant | pairs/s | s/step (mean) | s/step (median) | peak RSS MiB | Δ over imports MiB | vs TRL default |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "pairs_per_s" in r:
            ratio = f"{r['pairs_per_s'] / base:.2f}×" if base else "-"
            rows.append(f"| {name} | {r['pairs_per_s']:.2f} | {r['s_per_step']:.3f} | {r['s_per_step_median']:.3f} | "
                        f"{r['peak_rss_mib']:.0f} | "
                        f"{r['peak_rss_over_imports_mib']:.0f} | {ratio} |")
        else:
            rows.append(f"| {name} | - | - | - | - | - | {'not supported' if 'unsupported' in r else 'failed'} |")
    return rows


def loss_tracking(results: dict[str, dict]) -> dict[str, float]:
    """max |loss_k - TRL loss_k| over the steps, per variant: same start, same batches."""
    ref = results.get(BASELINE, {}).get("losses") or []
    return {name: max(abs(a - b) for a, b in zip(r["losses"], ref))
            for name, r in results.items() if name != BASELINE and r.get("losses") and ref}


def markdown(report: dict) -> str:
    m, a, c = report["machine"], report["args"], report.get("loss_check", {})
    res = report["results"]
    machine = (f"Machine: {m['cpu']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
               f"{m['memory_gib']} GiB; torch {m['torch']} (threads {m['torch_threads']}), transformers "
               f"{m['transformers']}, trl {m['trl']}, datasets {m['datasets']}, python {m['python']}; "
               f"repo {m['git_commit']}.")
    setup = (f"Model `{a['model']}`; {report['n_pairs']} pairs from {report['pairs_file']}, in file order; "
             f"batch {a['batch_size']} pairs; {a['warmup']} warm-up + {a['steps']} timed optimizer steps per "
             f"variant (batch fetch + forward + backward + clip + AdamW, constant lr {a['lr']}); each variant in "
             "a fresh subprocess; peak RSS = ru_maxrss of that process (imports, model, data and training).")
    lines = [f"# DPO throughput: mmalign vs TRL ({report['date']})", "", f"`{report['command']}`", "", machine,
             f"Load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}.", "", setup,
             "", *table(res), "",
             "Target (issue): mmalign >= 1.5x TRL's pairs/s. "
             + "; ".join(f"{k} {r['ratio_vs_trl']:.2f}x ({'meets' if r['ratio_vs_trl'] >= TARGET else 'misses'})"
                         for k, r in res.items() if k.startswith("mmalign") and "ratio_vs_trl" in r) + ".",
             ""]
    pre = report.get("precompute", {})
    if "seconds" in pre:
        lines.append(f"mmalign reference precompute (one pass, outside the timed steps): {pre['pairs']} pairs in "
                     f"{pre['seconds']:.2f} s ({pre['pairs_per_s']:.1f} pairs/s), peak RSS {pre['peak_rss_mib']:.0f} "
                     f"MiB; {pre['driver']}.")
    tp = res.get("trl_precomputed", {})
    if "unsupported" in tp:
        lines.append(f"TRL precompute_ref_log_probs=True with vision data, TRL {m['trl']}: {tp['unsupported']}")
    lines += ["", "Drivers:", *(f"- {k}: {r['driver']}" for k, r in res.items() if "driver" in r), ""]
    track = report.get("loss_tracking", {})
    if track:
        per = ", ".join(f"{k} {v:.1e}" for k, v in track.items())
        lines += [f"Per-step training loss vs TRL's on the same batches, max |diff| over all steps: {per}.", ""]
    if c:
        lines += ["## Loss agreement", "",
                  (f"One batch of {c.get('pairs')} pairs, DPO sigmoid, beta {c.get('beta')}; policy = checkpoint + "
                   f"N(0, {c.get('noise')}^2) weight noise, reference = checkpoint."), ""]
        if "trl" in c:
            trl_lp = c["trl_logps"]
            lines += ["| computed by | loss | policy logp chosen / rejected (batch mean) |", "|---|---:|---:|",
                      f"| TRL DPOTrainer.compute_loss | {c['trl']:.6f} | {trl_lp[0]:.4f} / {trl_lp[1]:.4f} |"]
            for k in ("concat", "shared_prompt"):
                lp = c[f"mmalign_{k}_logps"]
                lines.append(f"| mmalign DPOModule ({k}) | {c[f'mmalign_{k}']:.6f} | {lp[0]:.4f} / {lp[1]:.4f} |")
            pre_loss = c["mmalign_shared_prompt_precomputed"]
            verdict = "agree" if c["agree"] else "DISAGREE"
            lines += [f"| mmalign DPOModule (shared_prompt, precomputed reference) | {pre_loss:.6f} | |", "",
                      f"max |mmalign - TRL| = {c['max_abs_diff']:.2e} (tolerance {c['tolerance']:.0e}): **{verdict}**"]
        else:
            lines.append(f"loss check failed: {c.get('error')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before the timed ones")
    ap.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    ap.add_argument("--pairs", type=Path, default=None,
                    help="preference JSONL (default: built from --responses: chosen = reference, rejected = response)")
    ap.add_argument("--responses", type=Path, default=ROOT / "runs/demo/sample/responses.jsonl",
                    help="sampled responses to build pairs from when --pairs is not given")
    ap.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft/model", help="LLaVA-style checkpoint")
    ap.add_argument("--data-root", type=Path, default=ROOT / "runs/demo/data", help="image paths are relative to this")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads in every variant (1: steady on a small shared machine)")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="constant learning rate, both libraries (high enough that the per-step losses move off "
                         "log 2, so tracking them against TRL's checks the whole update, not just the first loss)")
    ap.add_argument("--max-length", type=int, default=4096,
                    help="mmalign collator max_length; must exceed every pair (TRL runs with max_length=None)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--no-loss-check", action="store_true", help="skip the TRL-vs-mmalign loss agreement check")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per variant subprocess")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results",
                    help="folder for dpo-<date>.md and dpo-<date>.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec.read_text())
        args.result.write_text(json.dumps(worker(args.worker, spec)))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        ap.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    n = (args.warmup + args.steps) * args.batch_size
    date = dt.datetime.now().strftime("%Y-%m-%d")
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as d:
        pairs = args.pairs or make_pairs(args.responses, Path(d) / "pairs.jsonl", limit=n)
        spec = {"model": str(args.model), "pairs": str(pairs), "ref_pairs": str(Path(d) / "ref_pairs.jsonl"),
                "data_root": str(args.data_root), "n": n, "batch_size": args.batch_size, "warmup": args.warmup,
                "steps": args.steps, "threads": args.threads, "lr": args.lr, "max_length": args.max_length}
        print(f"{len(variants)} variants x ({args.warmup} + {args.steps}) steps of {args.batch_size} pairs, "
              f"{args.threads} threads; load average {load_start}", flush=True)
        report: dict[str, Any] = {"date": date, "command": " ".join(["python", "benchmarks/bench_dpo.py", *(argv or sys.argv[1:])]),
                                  "load_start": load_start,
                                  "pairs_file": f"`{args.pairs}`" if args.pairs else
                                  f"`{args.responses}` (chosen = reference, rejected = response)",
                                  "n_pairs": n, "machine": machine_info(args.threads),
                                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                           if k not in ("worker", "spec", "result")},
                                  "variants": {v: VARIANTS[v] for v in variants}, "results": {}}
        if not args.no_loss_check:
            report["loss_check"] = c = run_worker("loss_check", spec, args.timeout)
            print(f"loss check: TRL {c.get('trl', float('nan')):.6f}, mmalign concat "
                  f"{c.get('mmalign_concat', float('nan')):.6f}, shared_prompt {c.get('mmalign_shared_prompt', float('nan')):.6f}"
                  f" -> max |diff| {c.get('max_abs_diff', float('nan')):.2e} {'ok' if c.get('agree') else 'FAILED'}",
                  flush=True)
        if "mmalign_shared_precomputed" in variants:
            report["precompute"] = pre = run_worker("precompute", spec, args.timeout)
            print(f"precompute: {_fmt(pre.get('seconds'), '.2f')} s", flush=True)
        for v in variants:
            r = run_worker(v, spec, args.timeout)
            report["results"][v] = r
            print(f"{v:28s} {_fmt(r.get('pairs_per_s'), '8.2f')} pairs/s  {_fmt(r.get('peak_rss_mib'), '6.0f')} MiB"
                  + (f"  ({r.get('unsupported') or r.get('error')})" if "pairs_per_s" not in r else ""), flush=True)
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    base = report["results"].get(BASELINE, {}).get("pairs_per_s")
    for r in report["results"].values():
        if base and "pairs_per_s" in r:
            r["ratio_vs_trl"] = r["pairs_per_s"] / base
    ratios = [r["ratio_vs_trl"] for k, r in report["results"].items() if k.startswith("mmalign") and "ratio_vs_trl" in r]
    report["best_mmalign_ratio"] = max(ratios) if ratios else 0.0
    report["loss_tracking"] = loss_tracking(report["results"])

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dpo-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print("\n".join(["", *table(report["results"]), ""]))
    print(f"-> {stem}.md, {stem}.json")
    ok = report.get("loss_check", {}).get("agree", True) and all("error" not in r for r in report["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
