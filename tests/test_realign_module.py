"""Re-Align's rDPO as a method: visual pair batches (both layouts), the loss through the module
against the pure function, the text-only ablation = DPO, precomputed reference, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.cli import cli_main
from mmalign.data import PreferenceDataModule
from mmalign.methods.dpo import DPOModule
from mmalign.methods.realign import RealignModule
from mmalign.records import read_records

ROOT = Path(__file__).resolve().parents[1]


def write_visual_pairs(world: Path, path: Path, n: int = 8) -> Path:
    """Caption pairs: chosen = the record's caption, rejected = the next caption record's answer,
    rejected image = the next record's image (another scene)."""
    recs = [r for r in read_records(world / "train/sft.jsonl", "sft", data_root=world)
            if r.meta.get("task") == "detailed_caption"]
    rel = lambda p: str(Path(p).relative_to(world))
    rows = [{"id": f"v{i}", "images": [rel(recs[i].images[0])], "rejected_images": [rel(recs[i + 1].images[0])],
             "prompt": recs[i].messages[:-1], "chosen": recs[i].messages[-1]["content"][0]["text"],
             "rejected": recs[i + 1].messages[-1]["content"][0]["text"]} for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def batch_of(policy, world, pairs, layout, n):
    dm = PreferenceDataModule(str(pairs), data_root=str(world), layout=layout, max_length=256)
    dm.connect(policy.processor)
    dm.setup()
    return dm.collator([dm.train_set[i] for i in range(n)])


@pytest.fixture(scope="module")
def llava(model_dirs):
    from models.policy import HFPolicy

    return HFPolicy(str(model_dirs["llava"]))


def test_visual_batches_score_three_completions_the_same_in_both_layouts(world, llava, tmp_path):
    pairs = write_visual_pairs(world, tmp_path / "pairs.jsonl", n=4)
    shared, concat = (batch_of(llava, world, pairs, lay, 4) for lay in ("shared_prompt", "concat"))
    assert shared["visual"] and concat["visual"]
    assert shared["prompt"]["pixel_values"].shape[0] == 8          # 4 original + 4 retrieved images, once each
    assert shared["completion_owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]
    a, b = llava.pair_logprobs(shared), llava.pair_logprobs(concat)
    assert len(a) == len(b) == 6
    for j in range(0, 6, 2):
        assert torch.equal(a[j + 1].sum(1), b[j + 1].sum(1))
        assert torch.allclose((a[j] * a[j + 1]).sum(1), (b[j] * b[j + 1]).sum(1), atol=1e-4)
    # the visual rows are the chosen answer: same tokens as the chosen rows, another image
    assert torch.equal(a[1].sum(1), a[5].sum(1))
    assert not torch.allclose((a[0] * a[1]).sum(1), (a[4] * a[5]).sum(1))


def test_rdpo_through_the_module_matches_the_formula(world, llava, tmp_path):
    pairs = write_visual_pairs(world, tmp_path / "pairs.jsonl", n=4)
    b = batch_of(llava, world, pairs, "shared_prompt", 4)
    with torch.no_grad():
        out, stats = RealignModule(llava, beta=0.1).compute_loss(b)
    # policy = reference: each of the two DPO terms is log 2
    assert out.loss.item() == pytest.approx(2 * math.log(2), abs=1e-5)
    with torch.no_grad():
        text_only = RealignModule(llava, beta=0.1, visual_weight=0.0).compute_loss(b)[0].loss.item()
    assert text_only == pytest.approx(math.log(2), abs=1e-5)
    assert {"visual_loss", "visual_accuracy", "logp_chosen_rejected_image"} <= set(stats)


def test_text_only_rdpo_is_dpo_on_the_same_pairs(world, model_dirs, tmp_path):
    from models.policy import HFPolicy, LoraOptions

    pairs = write_visual_pairs(world, tmp_path / "pairs.jsonl", n=4)
    torch.manual_seed(0)
    lora = HFPolicy(str(model_dirs["llava"]), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = batch_of(lora, world, pairs, "shared_prompt", 4)
    with torch.no_grad():
        rdpo = RealignModule(lora, beta=0.5, visual_weight=0.0).compute_loss(b)[0].loss.item()
        dpo = DPOModule(lora, beta=0.5).compute_loss(b)[0].loss.item()
        both = RealignModule(lora, beta=0.5).compute_loss(b)[0]
    assert rdpo == pytest.approx(dpo, abs=1e-6)
    assert rdpo != pytest.approx(math.log(2), abs=1e-3)
    assert both.loss.item() == pytest.approx(dpo + both.visual.loss.item(), abs=1e-5)


def test_precomputed_reference_covers_the_visual_term(world, model_dirs, llava, tmp_path):
    from data_pipelines.ref_logps import main as ref_main

    pairs = write_visual_pairs(world, tmp_path / "pairs.jsonl", n=4)
    assert ref_main(["--model", str(model_dirs["llava"]), "--pairs", str(pairs), "--data-root", str(world),
                     "--out", str(tmp_path / "ref")]) == 0
    first = json.loads((tmp_path / "ref/pairs.jsonl").read_text().splitlines()[0])
    assert {"ref_chosen_logp", "ref_rejected_logp", "ref_chosen_rejimg_logp", "ref_chosen_rejimg_tokens"} <= set(first)
    b = batch_of(llava, world, tmp_path / "ref/pairs.jsonl", "shared_prompt", 4)
    with torch.no_grad():
        fly = RealignModule(llava, beta=0.1).compute_loss(b)[0].loss.item()
        m = RealignModule(llava, beta=0.1, reference="precomputed")
        pre = m.compute_loss(b)[0].loss.item()
    assert pre == pytest.approx(fly, abs=1e-5) == pytest.approx(2 * math.log(2), abs=1e-5)


def test_pairs_without_rejected_images_are_refused(world, llava, tmp_path):
    recs = [json.loads(x) for x in write_visual_pairs(world, tmp_path / "p.jsonl", n=2).read_text().splitlines()]
    for r in recs:
        r.pop("rejected_images")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    b = batch_of(llava, world, tmp_path / "p.jsonl", "shared_prompt", 2)
    with pytest.raises(ValueError, match=r"p.jsonl:1 id=v0: rDPO needs rejected_images"):
        RealignModule(llava).compute_loss(b)
    recs[1]["rejected_images"] = recs[0]["images"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    with pytest.raises(ValueError, match=r"p.jsonl:1 id=v0: no rejected_images"):
        batch_of(llava, world, tmp_path / "p.jsonl", "shared_prompt", 2)


def test_rdpo_trains_through_the_cli(world, model_dirs, tmp_path):
    pairs = write_visual_pairs(world, tmp_path / "pairs.jsonl", n=8)
    cli = cli_main(["fit", "--config", str(ROOT / "configs/realign/tiny.yaml"),
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "3",
                    "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
                    "--model.init_args.policy.init_args.path", str(model_dirs["llava"]),
                    "--model.init_args.export.dir", str(tmp_path / "model"),
                    "--model.init_args.probe_file", "null",
                    "--data.init_args.train_file", str(pairs), "--data.init_args.val_file", str(pairs),
                    "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4"])
    assert cli.trainer.global_step == 3
    assert cli.model.hparams.visual_weight == 1.0
    assert torch.isfinite(cli.trainer.callback_metrics["train/visual_loss"])
    assert (tmp_path / "model/config.json").is_file()


def test_rejected_images_are_checked_like_images(world, tmp_path):
    from mmalign.records import RecordError

    recs = [json.loads(x) for x in write_visual_pairs(world, tmp_path / "p.jsonl", n=2).read_text().splitlines()]
    recs[1]["rejected_images"] = ["../../etc/passwd"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    with pytest.raises(RecordError, match=r"p.jsonl:2: image path '../../etc/passwd' escapes the data root"):
        read_records(tmp_path / "p.jsonl", "preference", data_root=world)
    recs[1]["rejected_images"] = ["a.png", "b.png"]               # two paths for one image part
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    with pytest.raises(RecordError, match=r"p.jsonl:2 rejected_images: 2 image path"):
        read_records(tmp_path / "p.jsonl", "preference", data_root=world)
    rec = read_records(tmp_path / "p.jsonl", "preference", data_root=world, on_error="skip")[0]
    assert Path(rec.rejected_images[0]).is_file() and Path(rec.rejected_images[0]).is_absolute()
