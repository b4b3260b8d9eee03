"""Reward models (MM-RLHF critique RM, scalar BT RM): hand-derived losses, the score position,
training through the real CLI, export / load round trip, the score_rm stage and its errors."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from mmalign.cli import check_config, cli_main
from mmalign.losses.reward import (
    bradley_terry_loss,
    gather_at,
    last_label_index,
    reward_centering,
    tie_loss,
)
from mmalign.ops import IGNORE_INDEX
from mmalign.records import RecordError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# pure losses


def test_bradley_terry_by_hand():
    # pair 0: c - r = 2 -> -log sigma(2) = log(1 + e^-2) = 0.126928; pair 1: c - r = 0 -> log 2 = 0.693147
    # mean = (0.126928 + 0.693147) / 2 = 0.410038; accuracy: pair 0 right, pair 1 a tie (wrong) -> 0.5
    c = torch.tensor([2.0, 0.0], requires_grad=True)
    r = torch.tensor([0.0, 0.0])
    loss, acc = bradley_terry_loss(c, r)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)
    assert acc.item() == 0.5 and not acc.requires_grad
    # d loss / d c_b = -sigma(-(c_b - r_b)) / B: -sigma(-2)/2 = -0.059601, -sigma(0)/2 = -0.25
    loss.backward()
    assert c.grad.tolist() == pytest.approx([-0.059601, -0.25], abs=1e-6)


def test_bradley_terry_margin_by_hand():
    # margin 1: pair 0 -> -log sigma(2 - 1) = log(1 + e^-1) = 0.313262; pair 1 -> -log sigma(-1) = 1.313262
    # mean 0.813262; the margin does not change the ranking accuracy (still 0.5)
    loss, acc = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), margin=1.0)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert acc.item() == 0.5
    per_pair = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([2.0, 0.0]))
    # pair 0 -> log 2 = 0.693147, pair 1 -> log 2: mean 0.693147
    assert per_pair[0].item() == pytest.approx(math.log(2), abs=1e-6)


def test_bradley_terry_is_stable_and_checks_shapes():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)  # softplus(400) = 400, no overflow to inf
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))


def test_tie_loss_by_hand():
    # c - r = 1.5 and 0.5 -> squares 2.25 and 0.25 -> mean 1.25; d/dc_b = 2 (c_b - r_b) / B = [1.5, 0.5]
    c = torch.tensor([2.0, 0.5], requires_grad=True)
    r = torch.tensor([0.5, 0.0])
    loss = tie_loss(c, r)
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert c.grad.tolist() == pytest.approx([1.5, 0.5])
    assert tie_loss(r, c.detach()).item() == pytest.approx(1.25)  # symmetric: "chosen" means nothing in a tie
    with pytest.raises(ValueError, match="empty"):
        tie_loss(torch.zeros(0), torch.zeros(0))


def test_reward_centering_by_hand():
    # (1 + 1)^2 = 4 and (-1 + 1)^2 = 0 -> mean 2
    assert reward_centering(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])).item() == 2.0


def test_gather_at_and_last_label_index():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    out = gather_at(hidden, torch.tensor([3, 1]))
    assert out.tolist() == [hidden[0, 3].tolist(), hidden[1, 1].tolist()]
    with pytest.raises(ValueError, match="out of range"):
        gather_at(hidden, torch.tensor([4, 0]))
    x = IGNORE_INDEX
    labels = torch.tensor([[x, 5, 6, x, x], [x, x, 7, 8, 9], [4, x, x, x, x]])
    assert last_label_index(labels).tolist() == [2, 4, 0]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        last_label_index(torch.tensor([[x, 5], [x, x]]))


def test_critique_quality_by_hand():
    from data_pipelines.score_rm import (
        absent_objects,
        critique_quality,
        ranking_accuracy,
    )

    ref = "There is no star in the image. There is no blue circle in the image. The red square is correct."
    assert absent_objects(ref) == {"star"}  # "blue circle" is a wrong colour, not an absent object
    gen = "There is no star in the image. There is no cross in the image."
    q = critique_quality([gen, "There is no hallucination in the answer."],
                         [ref, "There is no hallucination in the answer."], n_boot=50)
    # item 0: G = {star, cross}, R = {star}: TP 1; item 1: nothing named. precision 1/2, recall 1/1
    assert q["object_precision"][0] == 0.5 and q["object_recall"][0] == 1.0
    assert q["object_f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert q["all_clear_accuracy"][0] == 1.0 and q["exact_match"][0] == 0.5
    # 3 pairs, 2 prompts: p1 has 1 of 2 right, p2 has its tie wrong -> 1/3
    acc = ranking_accuracy([1.0, 0.0, 2.0], [0.0, 1.0, 2.0], ["p1", "p1", "p2"], n_boot=50)
    assert acc["accuracy"][0] == pytest.approx(1 / 3) and acc["ties"] == 1 and acc["prompts"] == 2


# ---------------------------------------------------------------------------------------------
# a small pairs file from the test world: chosen = the reference caption, rejected = the caption
# with one object hallucination injected, critiques by the scene-graph oracle


def _pairs_file(world: Path, out: Path, n: int = 12) -> Path:
    from mmalign.scene_io import load_scenes
    from mmalign.feedback import FeedbackItem
    from mmalign.inject import inject
    from mmalign.oracle import WorldOracle

    scenes = load_scenes(world)
    oracle = WorldOracle(scenes)
    rng = random.Random(0)
    rows = []
    for line in (world / "train/sft.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["task"] != "detailed_caption":
            continue
        image = str((world / r["images"][0]).resolve())
        chosen = r["messages"][-1]["content"][0]["text"]
        try:
            rejected = inject(chosen, scenes[image], "object", rng).text
        except ValueError:
            continue
        crit = {}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            fb = oracle.feedback(FeedbackItem(id=f"{r['id']}-{side}", prompt="", response=text, image=image),
                                 scenes[image])
            crit[side] = fb.critique
        rows.append({"id": f"{r['id']}-0-1", "images": r["images"], "prompt": r["messages"][:-1],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
                     "score_chosen": 1.0, "score_rejected": 0.5, "prompt_id": r["id"],
                     "critique_chosen": crit["chosen"], "critique_rejected": crit["rejected"],
                     "source_chosen": "sample", "source_rejected": "inject:object"})
        if len(rows) == n:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return out


@pytest.fixture(scope="module")
def pairs(world, tmp_path_factory) -> Path:
    return _pairs_file(world, tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def rm_args(config: str, world: Path, model: Path, pairs: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / config),
            "--trainer.default_root_dir", str(root),
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.init_args.policy.init_args.path", str(model),
            "--model.init_args.export.dir", str(root / "model"),
            "--data.init_args.train_file", str(pairs), "--data.init_args.val_file", str(pairs),
            "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "2", *extra]


@pytest.fixture(scope="module")
def critique_rm(world, model_dirs, pairs, tmp_path_factory):
    """A critique RM trained 3 steps through the real CLI and exported."""
    root = tmp_path_factory.mktemp("rm-critique")
    cli = cli_main(rm_args("configs/rm/critique.yaml", world, model_dirs["llava"], pairs, root,
                           "--trainer.max_steps", "3"))
    return cli, root


# ---------------------------------------------------------------------------------------------
# examples and the score position


def _processor(model_dir: Path):
    from models.processors import load_processor

    return load_processor(str(model_dir))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_score_position_is_the_end_of_the_critique(world, model_dirs, pairs, family):
    from mmalign.methods.reward import RewardPairCollator, RewardPairDataset
    from mmalign.records import read_records

    proc = _processor(model_dirs[family])
    tok = proc.tokenizer
    recs = read_records(pairs, "preference", data_root=world)
    ds = RewardPairDataset(recs[:2], "critique")
    batch = RewardPairCollator(proc, max_length=4096)([ds[0], ds[1]])
    assert batch["pairs"]["n"] == 2 and batch["input_ids"].shape[0] == 4
    idx = last_label_index(batch["labels"])
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    expected = [recs[0].meta["critique_chosen"], recs[1].meta["critique_chosen"],
                recs[0].meta["critique_rejected"], recs[1].meta["critique_rejected"]]
    for row, critique in enumerate(expected):
        i = int(idx[row])
        span = labels[row] != IGNORE_INDEX
        labelled_text = tok.decode(ids[row][span], skip_special_tokens=True).strip()
        assert labelled_text == critique  # labels = the critique turn, rows in order chosen..., rejected...
        assert span[: i + 1].any() and not span[i + 1:].any()  # i is the last labelled position
        # the critique's tokens end at or just before i: the end-of-turn token(s) close the row
        upto = tok.decode(ids[row, : i + 1], skip_special_tokens=True).rstrip()
        assert upto.endswith(critique)
        assert int(attn[row, i]) == 1 and (i + 1 == ids.shape[1] or int(attn[row, i + 1:].sum()) == 0)


def test_scalar_rows_score_the_answer_end(world, model_dirs, pairs):
    from mmalign.methods.reward import RewardPairCollator, RewardPairDataset
    from mmalign.records import read_records

    proc = _processor(model_dirs["llava"])
    recs = read_records(pairs, "preference", data_root=world)
    batch = RewardPairCollator(proc)([RewardPairDataset(recs[:1], "scalar")[0]])
    idx = last_label_index(batch["labels"])
    answer = recs[0].rejected[0]["content"][0]["text"]
    assert proc.tokenizer.decode(batch["input_ids"][1, : int(idx[1]) + 1], skip_special_tokens=True).rstrip().endswith(answer)


def test_over_long_pairs_are_dropped_whole(world, model_dirs, pairs):
    from mmalign.methods.reward import RewardPairCollator, RewardPairDataset
    from mmalign.records import read_records

    proc = _processor(model_dirs["llava"])
    recs = read_records(pairs, "preference", data_root=world)
    ds = RewardPairDataset(recs[:3], "critique")
    full = RewardPairCollator(proc, max_length=4096)([ds[0], ds[1], ds[2]])
    lengths = full["attention_mask"].sum(1)
    per_pair = torch.maximum(lengths[:3], lengths[3:])
    limit = int(per_pair.min())  # only the shortest pair(s) fit
    coll = RewardPairCollator(proc, max_length=limit)
    batch = coll([ds[0], ds[1], ds[2]])
    kept = int((per_pair <= limit).sum())
    assert batch["pairs"]["n"] == kept and batch["input_ids"].shape[0] == 2 * kept and coll.dropped == 3 - kept
    assert RewardPairCollator(proc, max_length=8)([ds[0]]) is None


def test_missing_reference_critique_names_the_record(world, pairs, tmp_path):
    from mmalign.methods.reward import RewardPairDataset
    from mmalign.records import read_records

    rows = [json.loads(x) for x in pairs.read_text().splitlines()[:2]]
    del rows[1]["critique_rejected"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_records(bad, "preference", data_root=world)
    with pytest.raises(RecordError, match=r"bad\.jsonl:2 .*critique_rejected"):
        RewardPairDataset(recs, "critique")
    RewardPairDataset(recs, "scalar")  # the scalar RM needs no critique


def test_module_options_are_checked(model_dirs):
    from mmalign.methods.reward import RewardModule
    from models.policy import HFPolicy

    policy = HFPolicy(str(model_dirs["llava"]))
    with pytest.raises(ValueError, match="scalar mode"):
        RewardModule(policy, mode="scalar", lm_weight=1.0)
    with pytest.raises(ValueError, match="question"):
        RewardModule(policy, critique_prompt="Critique: {answer}")
    with pytest.raises(ValueError, match="bt_weight"):
        RewardModule(policy, bt_weight=float("nan"))
    m = RewardModule(policy, mode="scalar", head="mlp")
    assert m.lm_weight == 0.0 and m.head(torch.zeros(3, policy.hidden_size)).shape == (3,)


def _tie_rows(pairs: Path) -> list[dict]:
    """Three pairs of the test file; the second marked as a tie (MM-RLHF's ``is_tie``)."""
    rows = [json.loads(x) for x in pairs.read_text().splitlines()[:3]]
    rows[1]["is_tie"] = True
    return rows


def test_tie_loss_in_the_module_step_by_hand(world, model_dirs, pairs):
    """The module's loss on a batch of 2 untied pairs and 1 tie, from the scores it reads:
    bt_weight * (mean_{0,2} softplus(-(c - r)) + tie_weight * (c_1 - r_1)^2)."""
    from mmalign.methods.reward import RewardModule, RewardPairCollator, RewardPairDataset
    from mmalign.records import read_records
    from mmalign.rewards.critique import score_rows
    from models.policy import HFPolicy

    f = pairs.parent / "with-tie.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _tie_rows(pairs)))
    recs = read_records(f, "preference", data_root=world)
    torch.manual_seed(0)
    module = RewardModule(HFPolicy(str(model_dirs["llava"])), mode="scalar", bt_weight=2.0, tie_weight=0.5).eval()
    ds = RewardPairDataset(recs, "scalar")
    batch = RewardPairCollator(module.policy.processor, max_length=4096)([ds[i] for i in range(3)])
    assert batch["pairs"]["is_tie"].tolist() == [False, True, False]
    with torch.no_grad():
        _, s = score_rows(module.policy, module.head, batch)
        c, r = s[:3].tolist(), s[3:].tolist()
        bt = (math.log1p(math.exp(-(c[0] - r[0]))) + math.log1p(math.exp(-(c[2] - r[2])))) / 2
        want = 2.0 * (bt + 0.5 * (c[1] - r[1]) ** 2)
        got = module._step(batch, "train").item()
    assert got == pytest.approx(want, rel=1e-5)


def test_margin_is_floored_at_zero(model_dirs):
    """margin_scale 2: a record whose scores agree (1.0 over 0.5) asks for a lead of 2 * 0.5 = 1; one
    whose scores disagree with its preference (0.2 over 0.7) asks for none (0), not for -1."""
    from mmalign.methods.reward import RewardModule
    from models.policy import HFPolicy

    m = RewardModule(HFPolicy(str(model_dirs["llava"])), mode="scalar", margin_scale=2.0)
    pairs = {"score_chosen": torch.tensor([1.0, 0.2, 3.0]), "score_rejected": torch.tensor([0.5, 0.7, 0.0]),
             "meta": [{}, {}, {}]}
    untied = torch.tensor([True, True, False])
    assert m._margin(pairs, untied).tolist() == pytest.approx([1.0, 0.0])


def test_ties_file_and_bad_tie_flags(world, model_dirs, pairs, tmp_path):
    from mmalign.methods.reward import RewardDataModule, RewardPairDataset
    from mmalign.records import read_records

    rows = _tie_rows(pairs)
    ties = tmp_path / "ties.jsonl"
    ties.write_text(json.dumps(rows[1]) + "\n")
    plain = tmp_path / "pairs.jsonl"
    plain.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[2]) + "\n")
    dm = RewardDataModule(train_file=str(plain), ties_file=str(ties), data_root=str(world))
    dm.connect(_processor(model_dirs["llava"]), "critique")
    dm.setup("fit")
    assert [dm.train_set[i]["is_tie"] for i in range(len(dm.train_set))] == [False, False, True]
    # a pairs file given as the ties file: an error naming the record
    dm = RewardDataModule(train_file=str(plain), ties_file=str(plain), data_root=str(world))
    dm.connect(_processor(model_dirs["llava"]), "critique")
    with pytest.raises(RecordError, match=r"pairs\.jsonl:1 .*'is_tie': true"):
        dm.setup("fit")
    # is_tie must be a JSON boolean
    rows[1]["is_tie"] = "yes"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"bad\.jsonl:2 .*is_tie"):
        RewardPairDataset(read_records(bad, "preference", data_root=world), "scalar")


# ---------------------------------------------------------------------------------------------
# training through the CLI, export, load


@pytest.mark.parametrize("config", ["configs/rm/critique.yaml", "configs/rm/scalar.yaml",
                                    "configs/rm/llava-1.5-7b-lora.yaml"])
def test_configs_parse(config):
    import yaml

    from mmalign.rewards.critique import CRITIQUE_PROMPT, MMRLHF_CRITIQUE_PROMPT

    check_config(str(ROOT / config))
    assert (ROOT / config).read_text().startswith("# Run")
    args = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    # the real-model config asks MM-RLHF's evaluator prompt, verbatim; the tiny ones the world's
    want = MMRLHF_CRITIQUE_PROMPT if "7b" in config else CRITIQUE_PROMPT
    assert args.get("critique_prompt", CRITIQUE_PROMPT) == want


def test_scalar_fast_dev_run_qwen2_vl(world, model_dirs, pairs, tmp_path):
    cli = cli_main(rm_args("configs/rm/scalar.yaml", world, model_dirs["qwen2_vl"], pairs, tmp_path,
                           "--trainer.fast_dev_run", "2"))
    assert cli.trainer.global_step == 2
    m = cli.trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and "train/lm_loss" not in m and "train/accuracy" in m
    assert not (tmp_path / "model").exists()  # a smoke run never exports


def test_critique_rm_trains_exports_and_loads(critique_rm, world, pairs):
    from mmalign.rewards.critique import RewardItem, RewardScorer, load_reward_model
    from mmalign.records import read_records

    cli, root = critique_rm
    assert cli.trainer.global_step == 3
    m = cli.trainer.callback_metrics
    for k in ("train/loss", "train/lm_loss", "train/bt_loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert torch.isfinite(m[k]), k
    # the optimiser trains the head too, at its own learning rate (head_lr)
    opt = cli.trainer.optimizers[0]
    head_params = {id(p) for p in cli.model.head.parameters()}
    assert any(id(p) in head_params for g in opt.param_groups for p in g["params"])
    out = root / "model"
    cfg = json.loads((out / "reward_config.json").read_text())
    assert cfg["mode"] == "critique" and cfg["policy_class"] == "models.policy.HFPolicy"
    assert (out / "reward_head.safetensors").is_file() and (out / "manifest.json").is_file()

    loaded = load_reward_model(out)
    recs = read_records(pairs, "preference", data_root=world)[:3]
    items = [RewardItem(r.images, r.prompt, r.chosen[0]["content"][0]["text"], critique=r.meta["critique_chosen"],
                        id=r.id) for r in recs]
    got = RewardScorer(loaded, batch_size=2).scores(items)
    # the same items scored by the trained module itself
    from mmalign.rewards.critique import RewardModel

    trained = RewardModel(cli.model.policy, cli.model.head, "critique", cfg["critique_prompt"])
    want = RewardScorer(trained, batch_size=3).scores(items)
    assert got == pytest.approx(want, abs=1e-5)
    # generated critiques, then scores: finite, one per item, greedy = deterministic
    first = RewardScorer(loaded, batch_size=2, max_new_tokens=12)(items)
    again = RewardScorer(loaded, batch_size=3, max_new_tokens=12)(items)
    assert [s.critique for s in first] == [s.critique for s in again]
    assert [s.score for s in first] == pytest.approx([s.score for s in again], abs=1e-5)


def test_nan_scores_are_refused(critique_rm, world, pairs):
    from mmalign.rewards.critique import RewardItem, RewardScorer, load_reward_model
    from mmalign.records import read_records

    _, root = critique_rm
    model = load_reward_model(root / "model")
    with torch.no_grad():
        model.head.score.weight.fill_(float("nan"))
    r = read_records(pairs, "preference", data_root=world)[0]
    item = RewardItem(r.images, r.prompt, "There is one object.", critique="There is no star in the image.",
                      id="pairs.jsonl:1 id=x")
    with pytest.raises(ValueError, match=r"non-finite.*pairs\.jsonl:1 id=x"):
        RewardScorer(model).scores([item])


def test_num_critic_averages_the_scores_after_sampled_critiques(critique_rm, world, pairs):
    """MM-RLHF's --num_critic: k sampled critiques per item, the item's score = their mean score."""
    from mmalign.records import read_records
    from mmalign.rewards.critique import RewardItem, RewardScorer, load_reward_model

    _, root = critique_rm
    model = load_reward_model(root / "model")
    recs = read_records(pairs, "preference", data_root=world)[:2]
    items = [RewardItem(r.images, r.prompt, r.chosen[0]["content"][0]["text"], id=r.id) for r in recs]
    scorer = RewardScorer(model, batch_size=2, max_new_tokens=10, num_critic=3, temperature=1.0, seed=5)
    got = scorer(items)
    for it, s in zip(items, got):
        assert len(s.critiques) == 3 and len(s.critique_scores) == 3 and s.critique == s.critiques[0]
        assert s.score == pytest.approx(sum(s.critique_scores) / 3, abs=1e-6)
        # each score is the one read after that critique alone
        alone = RewardScorer(model).scores([RewardItem(it.images, it.prompt, it.answer, c, it.id)
                                            for c in s.critiques])
        assert alone == pytest.approx(s.critique_scores, abs=1e-5)
    again = RewardScorer(model, batch_size=2, max_new_tokens=10, num_critic=3, temperature=1.0, seed=5)(items)
    assert [s.critiques for s in again] == [s.critiques for s in got]  # seeded: repeatable
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    scorer.critique_samples(items)
    assert torch.rand(1) == before  # sampling ran in a forked RNG: the caller's stream is untouched
    with pytest.raises(ValueError, match="greedy critiques are identical"):
        RewardScorer(model, num_critic=2)


# ---------------------------------------------------------------------------------------------
# the score_rm stage


def test_score_rm_writes_scores_and_report(critique_rm, world, pairs, tmp_path, capsys):
    from data_pipelines.score_rm import main

    _, root = critique_rm
    out = tmp_path / "scored"
    args = ["--rm", str(root / "model"), "--pairs", str(pairs), "--data-root", str(world), "--out", str(out),
            "--max-new-tokens", "12", "--batch-size", "4", "--with-reference-critique", "--n-boot", "50",
            "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    src = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(rows) == len(src)
    for row, s in zip(rows, src):
        assert {k: row[k] for k in s} == s  # the input record, unchanged
        assert row["reward_margin"] == pytest.approx(row["reward_chosen"] - row["reward_rejected"])
        assert isinstance(row["rm_critique_chosen"], str)
    rep = json.loads((out / "report.json").read_text())
    acc = rep["ranking"]["accuracy"]
    assert 0 <= acc[0] <= 1 and rep["ranking"]["pairs"] == len(src)
    assert rep["items"] == 2 * len(src)  # every response is distinct here
    assert "ranking_reference_critique" in rep and "object_recall" in rep["critique_quality"]
    assert "Ranking accuracy" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": len(src), "responses": 2 * len(src)}
    capsys.readouterr()
    assert main(args) == 0 and "up to date" in capsys.readouterr().out


def test_score_rm_num_critic(critique_rm, world, pairs, tmp_path):
    from data_pipelines.score_rm import main

    _, root = critique_rm
    small = tmp_path / "small.jsonl"
    small.write_text("".join(pairs.read_text().splitlines(keepends=True)[:2]))
    base = ["--rm", str(root / "model"), "--pairs", str(small), "--data-root", str(world), "--max-new-tokens", "8",
            "--n-boot", "20", "--no-progress"]
    with pytest.raises(SystemExit):  # greedy copies are refused
        main([*base, "--out", str(tmp_path / "o0"), "--num-critic", "2"])
    out = tmp_path / "o1"
    assert main([*base, "--out", str(out), "--num-critic", "2", "--temperature", "1.0", "--sample-seed", "3"]) == 0
    for row in (json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()):
        for side in ("chosen", "rejected"):
            cs, sc = row[f"rm_critiques_{side}"], row[f"rm_critique_scores_{side}"]
            assert len(cs) == len(sc) == 2 and row[f"rm_critique_{side}"] == cs[0]
            assert row[f"reward_{side}"] == pytest.approx((sc[0] + sc[1]) / 2)
    rep = json.loads((out / "report.json").read_text())
    assert rep["sampling"] == {"num_critic": 2, "temperature": 1.0, "top_p": 1.0, "sample_seed": 3}
    assert "2 critique(s) per response" in (out / "report.md").read_text()


def test_score_rm_scores_shared_responses_once(critique_rm, world, pairs, tmp_path):
    from data_pipelines.score_rm import main

    _, root = critique_rm
    rows = [json.loads(x) for x in pairs.read_text().splitlines()[:3]]
    # a second pair of the first prompt: the same chosen response against a new rejected one
    new = [{"role": "assistant", "content": [{"type": "text", "text": "There is one object: a small red star."}]}]
    extra = dict(rows[0], id=rows[0]["id"] + "-dup", rejected=new)
    shared = tmp_path / "shared.jsonl"
    shared.write_text("".join(json.dumps(r) + "\n" for r in [*rows, extra]))
    out = tmp_path / "scored"
    assert main(["--rm", str(root / "model"), "--pairs", str(shared), "--data-root", str(world), "--out", str(out),
                 "--critique", "reference", "--n-boot", "20", "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["items"] == 7  # 4 pairs, 8 sides, 7 distinct responses
    got = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert got[3]["reward_chosen"] == got[0]["reward_chosen"]
    assert got[3]["reward_rejected"] != got[0]["reward_rejected"]


def test_score_rm_errors_name_the_input(critique_rm, world, pairs, tmp_path):
    from data_pipelines.score_rm import main

    _, root = critique_rm
    lines = pairs.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + "{not json\n")
    base = ["--rm", str(root / "model"), "--data-root", str(world), "--n-boot", "20", "--no-progress"]
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: malformed JSON"):
        main([*base, "--pairs", str(bad), "--out", str(tmp_path / "o1")])
    nocrit = tmp_path / "nocrit.jsonl"
    row = json.loads(lines[1])
    del row["critique_chosen"]
    nocrit.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"nocrit\.jsonl:2 id=.*\(chosen\).*reference critique"):
        main([*base, "--pairs", str(nocrit), "--out", str(tmp_path / "o2"), "--critique", "reference"])
    # a NaN head: the stage stops, naming records, and writes nothing
    broken = tmp_path / "broken"
    shutil.copytree(root / "model", broken)
    from safetensors.torch import load_file, save_file

    head = load_file(str(broken / "reward_head.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in head.items()}, str(broken / "reward_head.safetensors"))
    out = tmp_path / "o3"
    with pytest.raises(ValueError, match=r"non-finite.*pairs\.jsonl:1 id="):
        main(["--rm", str(broken), "--pairs", str(pairs), "--data-root", str(world), "--out", str(out),
              "--critique", "reference", "--no-progress"])
    assert not out.exists()
    with pytest.raises(SystemExit):
        main([*base, "--pairs", str(pairs), "--out", str(tmp_path / "o4"), "--rm", str(tmp_path)])
