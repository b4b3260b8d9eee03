"""DPO / MM-DPO module: pair layouts, the three reference sources, Dynamic Reward Scaling, the
generation-health probe, and training through the real CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.cli import cli_main
from mmalign.collators import PreferenceCollator
from mmalign.data import PreferenceDataModule
from mmalign.health import collapsed, generation_health
from mmalign.methods.dpo import DPOModule
from mmalign.records import read_records

ROOT = Path(__file__).resolve().parents[1]


def write_pairs(world: Path, path: Path, n: int = 12, **extra) -> Path:
    """Caption pairs from the small world: chosen = the record's reference answer, rejected =
    the next caption record's answer (another scene: a hallucinated description of this one)."""
    recs = [r for r in read_records(world / "train/sft.jsonl", "sft", data_root=world)
            if r.meta.get("task") == "detailed_caption"]
    rows = []
    for i in range(n):
        r, other = recs[i], recs[i + 1]
        rows.append({"id": f"p{i}", "images": r.images, "prompt": r.messages[:-1],
                     "chosen": r.messages[-1]["content"][0]["text"],
                     "rejected": other.messages[-1]["content"][0]["text"], **extra})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def batches(policy, world, pairs, layout, batch_size=4):
    dm = PreferenceDataModule(str(pairs), data_root=str(world), batch_size=batch_size, layout=layout, max_length=256)
    dm.connect(policy.processor)
    dm.setup()
    return [b for b in torch.utils.data.DataLoader(dm.train_set, batch_size=batch_size, collate_fn=dm.collator)]


@pytest.fixture(scope="module")
def llava(model_dirs):
    from models.policy import HFPolicy

    torch.manual_seed(0)
    return HFPolicy(str(model_dirs["llava"]))


def test_shared_prompt_and_concat_layouts_give_the_same_logprobs(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl")
    for shared, concat in zip(batches(llava, world, pairs, "shared_prompt"), batches(llava, world, pairs, "concat")):
        a, b = llava.pair_logprobs(shared), llava.pair_logprobs(concat)
        assert [m["id"] for m in shared["meta"]] == [m["id"] for m in concat["meta"]]
        for x, y, mx, my in ((a[0], b[0], a[1], b[1]), (a[2], b[2], a[3], b[3])):
            assert torch.equal(mx.sum(1), my.sum(1))                      # the same tokens are scored
            assert torch.allclose((x * mx).sum(1), (y * my).sum(1), atol=1e-4)
        # the shared layout encodes each image once: B images, not 2B
        assert shared["prompt"]["pixel_values"].shape[0] == concat["pixel_values"].shape[0] // 2


def test_shared_prompt_gradients_match_concat(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=4)
    grads = []
    for layout in ("shared_prompt", "concat"):
        llava.zero_grad()
        (b,) = batches(llava, world, pairs, layout)
        c, cm, r, rm = llava.pair_logprobs(b)
        ((c * cm).sum() - 0.5 * (r * rm).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in llava.parameters() if p.grad is not None]))
    llava.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_a_pair_is_kept_or_dropped_whole(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=4)
    recs = [json.loads(x) for x in pairs.read_text().splitlines()]
    recs[1]["rejected"] = " ".join(["a large red circle"] * 200)       # far over max_length
    pairs.write_text("".join(json.dumps(x) + "\n" for x in recs))
    for layout in ("shared_prompt", "concat"):
        dm = PreferenceDataModule(str(pairs), data_root=str(world), layout=layout, max_length=120)
        dm.connect(llava.processor)
        dm.setup()
        batch = dm.collator([dm.train_set[i] for i in range(4)])
        assert [m["id"] for m in batch["meta"]] == ["p0", "p1", "p2", "p3"]   # cut at the end, as SFT does
        _, cm, _, rm = llava.pair_logprobs(batch)
        assert cm.shape[0] == rm.shape[0] == 4
    coll = PreferenceCollator(llava.processor, max_length=60, layout="concat", on_overlength="error")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1 id=p0: the pair does not fit"):
        coll([dm.train_set[0]])


def test_three_reference_sources_give_the_same_loss(world, model_dirs, tmp_path):
    """Frozen copy (full fine-tuning), adapter disabled (LoRA) and precomputed log-probs are
    the same reference model, so with the same policy log-probs the loss must be the same."""
    from data_pipelines.ref_logps import main as ref_main
    from models.policy import HFPolicy, LoraOptions

    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=8)
    assert ref_main(["--model", str(model_dirs["llava"]), "--pairs", str(pairs), "--data-root", str(world),
                     "--out", str(tmp_path / "ref"), "--batch-size", "3"]) == 0
    pre = tmp_path / "ref/pairs.jsonl"
    torch.manual_seed(0)
    lora = HFPolicy(str(model_dirs["llava"]), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():                         # move the policy away from its reference
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    full = HFPolicy(str(model_dirs["llava"]))
    (b_pre,) = batches(lora, world, pre, "shared_prompt", batch_size=8)
    losses = {}
    for name, ref_policy, mode in (("adapter", lora, "on_the_fly"), ("copy", full, "on_the_fly"),
                                   ("precomputed", lora, "precomputed")):
        m = DPOModule(lora, reference=mode, beta=0.5)
        m._ref_id = None
        if name == "copy":                        # the reference of a full fine-tune: a frozen copy
            m._reference_logps = DPOModule(full, reference="on_the_fly")._reference_logps
        with torch.no_grad():
            losses[name] = m.compute_loss(b_pre)[0].loss.item()
    assert losses["adapter"] != pytest.approx(math.log(2), abs=1e-3)     # the policy really moved
    assert losses["copy"] == pytest.approx(losses["adapter"], abs=1e-5)
    assert losses["precomputed"] == pytest.approx(losses["adapter"], abs=1e-5)


def test_policy_equal_to_reference_gives_log_2(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=4)
    (b,) = batches(llava, world, pairs, "shared_prompt")
    with torch.no_grad():
        out, stats = DPOModule(llava, beta=0.1).compute_loss(b)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-5)


def test_dynamic_reward_scaling_beta_per_pair(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=3)
    recs = [json.loads(x) for x in pairs.read_text().splitlines()]
    for r, d in zip(recs, (0.0, 2.0, -50.0)):
        r["reward_margin"] = d
    pairs.write_text("".join(json.dumps(x) + "\n" for x in recs))
    (b,) = batches(llava, world, pairs, "shared_prompt")
    m = DPOModule(llava, beta=0.1, drs_w=0.5, drs_k=0.5, drs_beta_min=1e-3)
    beta = m.pair_beta(b)
    # by hand: 0.1 * (1 + 0.5 * (1 - e^(-0.5 d))): d=0 -> 0.1; d=2 -> 0.1 * (1 + 0.5 * 0.6321) = 0.131606;
    # d=-50 -> 0.1 * (1 + 0.5 * (1 - e^25)) < 0 -> floored at 1e-3
    assert beta.tolist() == pytest.approx([0.1, 0.1316060, 1e-3], abs=1e-6)
    recs[1].pop("reward_margin")
    pairs.write_text("".join(json.dumps(x) + "\n" for x in recs))
    (b,) = batches(llava, world, pairs, "shared_prompt")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2.*reward_margin"):
        m.pair_beta(b)


def test_released_beta_mode_is_one_batch_beta(world, llava, tmp_path):
    from mmalign.losses.dpo import released_batch_beta

    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=5)  # no reward_margin: the released rule needs none
    (b,) = batches(llava, world, pairs, "shared_prompt", batch_size=5)
    m = DPOModule(llava, beta=0.1, drs_w=0.1, beta_mode="released")
    h = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    torch.manual_seed(3)
    got = m.pair_beta(b, h)
    torch.manual_seed(3)
    assert got.ndim == 0 and got.item() == pytest.approx(released_batch_beta(h, 0.1, 0.1).item())
    assert round(got.item(), 6) in (0.08, 0.105)  # see test_released_batch_beta_by_hand
    out, stats = m.compute_loss(b)
    assert torch.isfinite(out.loss) and stats["beta"].ndim == 0
    with pytest.raises(ValueError, match="beta_mode"):
        DPOModule(llava, beta_mode="batch")


def test_tied_pairs_are_refused(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=2)
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    rows[1]["is_tie"] = True
    pairs.write_text("".join(json.dumps(x) + "\n" for x in rows))
    (b,) = batches(llava, world, pairs, "shared_prompt")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2 .*tied pair"):
        DPOModule(llava).compute_loss(b)


def test_precomputed_reference_refuses_missing_or_foreign_logps(world, llava, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=2, ref_chosen_logp=-1.0, ref_rejected_logp=-2.0,
                        ref_model="other@123")
    (b,) = batches(llava, world, pairs, "shared_prompt")
    m = DPOModule(llava, reference="precomputed")
    m._ref_id = "model@456"
    with pytest.raises(ValueError, match="other@123"):
        m.compute_loss(b)
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=2)
    (b,) = batches(llava, world, pairs, "shared_prompt")
    with pytest.raises(ValueError, match="ref_chosen_logp"):
        m.compute_loss(b)


def test_generation_health_and_collapse_rules():
    ok = generation_health(["a red circle left of a blue square", "two green stars above a small cross"])
    # 8 + 7 = 15 words, "a" three times: 13 distinct unigrams; 7 + 6 = 13 bigrams, all distinct
    assert ok["distinct1"] == pytest.approx(13 / 15) and ok["distinct2"] == 1.0
    assert ok["loop_rate"] == 0 and ok["mean_words"] == 7.5
    assert collapsed(ok, ok) == []
    bad = generation_health(["circle circle circle circle circle circle circle circle", ""])
    why = collapsed(bad, ok)
    assert any("distinct-2" in w for w in why) and any("empty" in w for w in why)


def test_mmdpo_trains_through_the_cli_and_logs_the_probe(world, model_dirs, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=12, reward_margin=1.5)
    cli = cli_main(["fit", "--config", str(ROOT / "configs/dpo/mmdpo.yaml"),
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "4",
                    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
                    "--model.init_args.policy.init_args.path", str(model_dirs["llava"]),
                    "--model.init_args.export.dir", str(tmp_path / "model"),
                    "--model.init_args.probe_file", str(world / "val/sft.jsonl"),
                    "--model.init_args.probe_every", "2", "--model.init_args.probe_size", "4",
                    "--model.init_args.reference", "on_the_fly",
                    "--data.init_args.train_file", str(pairs), "--data.init_args.val_file", str(pairs),
                    "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4"])
    assert cli.trainer.global_step == 4
    assert (tmp_path / "model/config.json").is_file()
    with open(tmp_path / "run/logs/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0])
    for k in ("train/loss", "train/reward_accuracy", "train/margin", "train/logp_chosen", "train/logp_rejected",
              "train/beta", "val/reward_accuracy", "probe/distinct2", "probe/mean_words", "probe/collapsed"):
        assert k in cols, k
    probes = [r for r in rows if r["probe/distinct2"]]
    assert [int(r["step"]) for r in probes] == [0, 2, 4]
    betas = {round(float(r["train/beta"]), 6) for r in rows if r["train/beta"]}
    cfg = cli.model.hparams
    assert cfg.beta_mode == "paper"
    assert betas == {round(cfg.beta * (1 + cfg.drs_w * (1 - math.exp(-cfg.drs_k * 1.5))), 6)}


def test_mmdpo_cli_accepts_the_released_beta_mode(world, model_dirs, tmp_path):
    pairs = write_pairs(world, tmp_path / "pairs.jsonl", n=8)  # no reward_margin: the released rule needs none
    cli = cli_main(["fit", "--config", str(ROOT / "configs/dpo/mmdpo.yaml"),
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
                    "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                    "--trainer.log_every_n_steps", "1",
                    "--model.init_args.policy.init_args.path", str(model_dirs["llava"]),
                    "--model.init_args.export.dir", str(tmp_path / "model"),
                    "--model.init_args.probe_file", "null", "--model.init_args.reference", "on_the_fly",
                    "--model.init_args.beta_mode", "released", "--model.init_args.drs_w", "0.1",
                    "--data.init_args.train_file", str(pairs), "--data.init_args.val_file", "null",
                    "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4"])
    assert cli.trainer.global_step == 2 and cli.model.hparams.beta_mode == "released"
    with open(tmp_path / "run/logs/metrics.csv") as f:
        betas = [float(r["train/beta"]) for r in csv.DictReader(f) if r.get("train/beta")]
    assert betas and all(b >= 1e-3 and math.isfinite(b) for b in betas)
