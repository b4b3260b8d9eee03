"""FGAIF fine-grained reward models: the segment encoding, the loss and class weights by hand, the
data checks, training through the real CLI (separate and shared), export / load, scoring, and the
fg_rm_eval stage."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.cli import check_config, cli_main
from mmalign.records import RecordError

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("object", "attribute", "relation")


# ---------------------------------------------------------------------------------------------
# fixture data: reference captions and copies with one injected hallucination per type, labelled
# per segment by the scene-graph oracle, written as the feedback stage writes feedback.jsonl


def _feedback_file(world: Path, split: str, out: Path, source: str = "oracle", inject_kinds=TYPES,
                   segmentation: str = "released") -> Path:
    from mmalign.feedback import FeedbackItem, feedback_to_json
    from mmalign.inject import inject
    from mmalign.oracle import WorldOracle
    from mmalign.scene_io import load_scenes

    scenes = load_scenes(world)
    oracle = WorldOracle(scenes, segmentation=segmentation)
    rng = random.Random(0)
    rows = []
    for line in (world / split / "sft.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["task"] != "detailed_caption":
            continue
        image = str((world / r["images"][0]).resolve())
        ref = r["messages"][-1]["content"][0]["text"]
        texts = [ref]
        for kind in inject_kinds:
            try:
                texts.append(inject(ref, scenes[image], kind, rng).text)
            except ValueError:
                pass
        for j, text in enumerate(texts):
            fb = oracle.feedback(FeedbackItem(id=f"{r['id']}-{j}", prompt="", response=text, image=image), scenes[image])
            rows.append({"id": f"{r['id']}-{j}", "images": r["images"], "prompt": r["messages"][:-1],
                         "response": text, "annotations": {"source": source, "segmentation": segmentation,
                                                           **feedback_to_json(fb)}})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return out


@pytest.fixture(scope="module")
def fb(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fg-feedback")
    return {"train": _feedback_file(world, "train", root / "train/feedback.jsonl"),
            "val": _feedback_file(world, "val", root / "val/feedback.jsonl")}


def fit_args(world: Path, model: Path, fb: dict, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/fg_rm/tiny.yaml"),
            "--trainer.default_root_dir", str(root),
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.init_args.policy.init_args.path", str(model),
            "--model.init_args.export.dir", str(root / "model"),
            "--data.init_args.train_file", str(fb["train"]), "--data.init_args.val_file", str(fb["val"]),
            "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4", *extra]


@pytest.fixture(scope="module")
def object_rm(world, model_dirs, fb, tmp_path_factory):
    """FGAIF's object reward model, trained 2 steps through the real CLI and exported."""
    root = tmp_path_factory.mktemp("fg-rm-object")
    cli = cli_main(fit_args(world, model_dirs["llava"], fb, root, "--trainer.max_steps", "2"))
    return cli, root


def _processor(model_dir: Path):
    from models.processors import load_processor

    return load_processor(str(model_dir))


def _prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# ---------------------------------------------------------------------------------------------
# the encoding


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_each_segment_label_sits_on_its_last_token(model_dirs, family):
    from mmalign.ops import IGNORE_INDEX
    from mmalign.rewards.fine_grained import encode_segments, make_head, segment_logits
    from mmalign.segments import split_segments
    from models.policy import HFPolicy

    proc = _processor(model_dirs[family])
    tok = proc.tokenizer
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    r0 = "There is one object: a large blue cross."
    r1 = "A red circle is left of a blue square and a star, and it is small."
    # hand-checked: the segments and the token that ends each (the tiny byte-level BPE keeps the
    # leading space on a word token, so " square" ends segment 0 of r1, and "and" opens segment 1)
    # (the fine segmentation: three segments in r1; the released one cuts neither response)
    assert [s.text for s in split_segments(r0, "fine")] == ["There is one object:", "a large blue cross."]
    assert [s.text for s in split_segments(r1, "fine")] == ["A red circle is left of a blue square", "and a star,",
                                                     "and it is small."]
    pieces = [[":", "."], [" square", ",", "."]]
    exs = [{"images": [img], "prompt": _prompt("Describe the image."), "response": r0,
            "labels": [[0, 2], [1, 1]], "meta": {"id": "a"}},
           {"images": [img], "prompt": _prompt("Give a detailed description of the image, please."), "response": r1,
            "labels": [[1, 2], [0, 2], [2, 0]], "meta": {"id": "b"}}]
    b = encode_segments(proc, exs, segmentation="fine")
    p_mask, ids, mask = b["prompt"]["attention_mask"], b["response_ids"], b["response_mask"]
    assert b["segment_index"].shape == (2, 3) and b["segment_labels"].shape == (2, 3, 2)
    assert p_mask[0, 0] == 0 and p_mask[:, -1].all() and p_mask[1].all()  # prompts left-padded
    for i, (r, want) in enumerate(zip((r0, r1), pieces)):
        n = len(want)
        got = [tok.decode([int(ids[i, j])]) for j in b["segment_index"][i, :n]]
        assert got == want
        assert b["segment_valid"][i].tolist() == [True] * n + [False] * (3 - n)
        assert b["segment_labels"][i, :n].tolist() == exs[i]["labels"]
        assert (b["segment_labels"][i, n:] == IGNORE_INDEX).all()
        # the response row: its own tokens, then eos, then right padding
        resp = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[i, :len(resp)].tolist() == resp
        assert mask[i, :len(resp)].all() and not mask[i, len(resp):].any()
        # decoding up to a segment's end token ends with the segment's text
        for k, seg in enumerate(split_segments(r, "fine")):
            j = int(b["segment_index"][i, k])
            assert tok.decode(ids[i, :j + 1]).endswith(seg.text)
    # The heads read, through Policy.response_forward, the hidden state of the joined row
    # (prompt + response) at prompt width + segment end, with positions counting the real tokens
    # only across the prompt's left padding and the join (a multimodal-RoPE family derives its
    # own from the mask): the same numbers as one plain forward over that row.
    torch.manual_seed(0)
    policy = HFPolicy(str(model_dirs[family])).eval()
    heads = torch.nn.ModuleDict({"object": make_head(policy.hidden_size)})
    width = p_mask.shape[1]
    full = {k: v for k, v in b["prompt"].items() if k != "meta"}
    full["input_ids"] = torch.cat([b["prompt"]["input_ids"], ids], dim=1)
    full["attention_mask"] = joined = torch.cat([p_mask, mask.to(p_mask.dtype)], dim=1)
    for k, v in list(full.items()):
        if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor) and v.shape == p_mask.shape:
            full[k] = torch.cat([v, torch.zeros_like(ids, dtype=v.dtype)], dim=1)   # response tokens: text
    if family != "qwen2_vl":
        full["position_ids"] = (joined.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = segment_logits(policy, heads, b)["object"]
        _, hidden = policy.forward_hidden(full)
        h = torch.gather(hidden, 1, (width + b["segment_index"]).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        want_logits = heads["object"](h)
    valid = b["segment_valid"]
    assert torch.allclose(got[valid], want_logits[valid], atol=1e-5)
    # a cut inside r1's last segment: it is not scored, and counted
    cut = encode_segments(proc, exs, max_response_tokens=len(tok(r1, add_special_tokens=False)["input_ids"]) - 2,
                          segmentation="fine")
    assert cut["segment_valid"][1].tolist() == [True, True, False] and cut["segments_cut"] == 1
    assert (cut["segment_labels"][1, 2] == IGNORE_INDEX).all()


def test_unlocatable_segments_and_empty_responses_name_the_record(model_dirs):
    from mmalign.rewards.fine_grained import encode_segments

    proc = _processor(model_dirs["llava"])
    img = Image.new("RGB", (64, 64))
    base = {"images": [img], "prompt": _prompt("Describe the image."), "meta": {"source": "f.jsonl:7", "id": "x"}}
    with pytest.raises(RecordError, match=r"f\.jsonl:7 id=x: empty response"):
        encode_segments(proc, [{**base, "response": "  "}])
    # "There" is one token: two segments ending inside it have no token of their own
    with pytest.raises(RecordError, match=r"f\.jsonl:7 id=x: segment 1 .*no token of its own"):
        encode_segments(proc, [{**base, "response": "There is one.",
                                    "segments": [{"start": 0, "end": 3}, {"start": 3, "end": 5}]}])
    # scoring a policy's free text (strict=False) reads such a segment at the previous one's token
    loose = encode_segments(proc, [{**base, "response": "There is one.",
                                        "segments": [{"start": 0, "end": 3}, {"start": 3, "end": 5}]}], strict=False)
    assert loose["segment_valid"][0].tolist() == [True, True]
    assert loose["segment_index"][0, 0] == loose["segment_index"][0, 1]


# ---------------------------------------------------------------------------------------------
# loss, class weights, rewards: by hand


def test_loss_is_the_hand_computed_cross_entropy():
    from mmalign.losses.fg import fg_loss

    # a tiny head: H = 2, logits = W h + b
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])           # one row, two segment slots
    logits = head(h)                                        # [[1, 2.5, 2], [0, 0.5, -1]]
    x = -100
    labels = torch.tensor([[[0, 2], [1, x]]])               # (1, 2, K=2): types object, relation

    def ce(z, y):
        return math.log(sum(math.exp(v) for v in z)) - z[y]

    l00, l01 = ce([1, 2.5, 2], 0), ce([0, 0.5, -1], 1)      # object: both slots
    l10 = ce([1, 2.5, 2], 2)                                # relation: slot 1 ignored
    # same head for both types here
    loss, per = fg_loss({"object": logits, "relation": logits}, labels, ["object", "relation"])
    want = ((l00 + l01) / 2 + l10) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    # logsumexp(1, 2.5, 2) = log(2.7183 + 12.1825 + 7.3891) = 3.1041; logsumexp(0, 0.5, -1) = log(3.0166) = 1.1041
    # object: (3.1041 - 1 + 1.1041 - 0.5) / 2 = 1.3541; relation: 3.1041 - 2 = 1.1041; mean 1.2291
    assert loss.item() == pytest.approx(((2.1041 + 0.6041) / 2 + 1.1041) / 2, abs=1e-3)
    assert per["object"]["loss"].item() == pytest.approx((l00 + l01) / 2, abs=1e-6)
    # object: argmax 1 vs label 0 (wrong), argmax 1 vs label 1 (right); relation: 1 vs 2 (wrong)
    assert per["object"]["accuracy"].item() == 0.5 and per["relation"]["accuracy"].item() == 0.0
    assert int(per["object"]["n"]) == 2 and int(per["relation"]["n"]) == 1
    # class weights: PyTorch's weighted mean, sum_i w_{y_i} l_i / sum_i w_{y_i}
    w = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    wl, _ = fg_loss({"object": logits, "relation": logits}, labels, ["object", "relation"], class_weight=w)
    assert wl.item() == pytest.approx(((2 * l00 + 1 * l01) / 3 + l10) / 2, abs=1e-6)
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    # a type with no labelled segment in the batch adds 0
    none, per = fg_loss({"object": logits}, torch.full((1, 2, 1), x), ["object"])
    assert none.item() == 0.0 and math.isnan(per["object"]["loss"].item())


def test_balanced_class_weights_by_hand():
    from mmalign.losses.fg import balanced_class_weights

    # object: 2 hallucinated, 6 correct, 12 n/a (n = 20): 20 / (3 * n_c)
    # relation: no "correct" at all -> weight 0 (never a target)
    w = balanced_class_weights([[2, 6, 12], [1, 0, 9]])
    assert w[0].tolist() == pytest.approx([20 / 6, 20 / 18, 20 / 36])
    assert w[1].tolist() == pytest.approx([10 / 3, 0.0, 10 / 27])
    with pytest.raises(ValueError, match="counts"):
        balanced_class_weights([[1, 2]])


def test_segment_rewards_from_given_probabilities(model_dirs, monkeypatch):
    from mmalign.rewards import SegmentItem, SegmentRewardModel, rewards_from_probs
    from mmalign.rewards.fine_grained import FGRewardModel, make_head
    from models.policy import HFPolicy

    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])  # columns: hallucinated, correct, n/a
    # label: argmax = hallucinated, n/a, correct -> -1, 0, +1
    assert rewards_from_probs(p, "label").tolist() == [-1.0, 0.0, 1.0]
    # expected: -0.7 + 0.2 = -0.5; -0.2 + 0.3 = 0.1; -0.1 + 0.6 = 0.5
    assert rewards_from_probs(p, "expected").tolist() == pytest.approx([-0.5, 0.1, 0.5])
    with pytest.raises(ValueError, match="mode"):
        rewards_from_probs(p, "mean")
    policy = HFPolicy(str(model_dirs["llava"]))
    model = FGRewardModel(policy, torch.nn.ModuleDict({"object": make_head(policy.hidden_size)}))
    assert isinstance(model, SegmentRewardModel)
    monkeypatch.setattr(model, "segment_probs", lambda items, batch_size=16, types=None: [{"object": p}, {"object": p[:0]}])
    items = [SegmentItem([], "q", "a.", "i0"), SegmentItem([], "q", "", "i1")]
    got = model.segment_rewards(items, mode="expected")
    assert got[0]["object"].tolist() == pytest.approx([-0.5, 0.1, 0.5]) and got[1]["object"].shape == (0,)
    assert model.segment_rewards(items)[0]["object"].tolist() == [-1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# data checks


def _dm(path: Path, world: Path, types=("object",), segmentation: str = "released", **kw):
    from mmalign.methods.fg_reward import FGRewardDataModule

    dm = FGRewardDataModule(str(path), data_root=str(world), **kw)
    dm.connect(_processor_cache["llava"], list(types), segmentation)
    return dm


_processor_cache: dict = {}


@pytest.fixture(autouse=True)
def _proc(model_dirs):
    if "llava" not in _processor_cache:
        _processor_cache["llava"] = _processor(model_dirs["llava"])


def test_a_type_without_hallucinated_labels_is_refused(world, fb, tmp_path):
    # the reference captions only, labelled by a source that finds nothing (as the tiny judge does)
    clean = _feedback_file(world, "train", tmp_path / "clean.jsonl", source="judge", inject_kinds=())
    dm = _dm(clean, world, types=("object", "relation"))
    with pytest.raises(ValueError, match=r"clean\.jsonl: no segment is labelled hallucinated for object \(source judge\): "
                                         r"a reward model trained on it would learn a constant"):
        dm.setup("fit")
    ok = _dm(fb["train"], world, types=TYPES)
    ok.setup("fit")
    counts = ok.train_class_counts
    assert counts.shape == (3, 3) and (counts[:, 0] > 0).all()
    assert int(counts[0].sum()) == sum(len(lab) for lab in ok.train_set.labels)


def test_malformed_segments_name_file_and_line(world, fb, tmp_path):
    lines = fb["train"].read_text().splitlines()[:4]
    rows = [json.loads(x) for x in lines]
    segs = rows[1]["annotations"]["segments"]
    segs[-1] = {**segs[-1], "end": segs[-1]["end"] - 1, "text": segs[-1]["text"][:-1]}
    del rows[3]["annotations"]["segments"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=rf"bad\.jsonl:2 id={rows[1]['id']}: segment {len(segs) - 1} is "
                                          r"\(index, start, end, text\)"):
        _dm(bad, world).setup("fit")
    skip = _dm(bad, world, types=("attribute",), on_error="skip")  # line 3 holds an attribute hallucination
    skip.setup("fit")
    assert len(skip.train_set) == 2 and skip.skipped[str(bad)] == 2
    rows[1] = json.loads(lines[1])
    rows[1]["annotations"]["segments"] = rows[1]["annotations"]["segments"] * 2   # one segment too many
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with pytest.raises(RecordError, match=r"bad\.jsonl:2 .*annotated segment\(s\) but split_segments"):
        _dm(bad, world).setup("fit")
    bad.write_text("".join(json.dumps(r) + "\n" for r in [json.loads(lines[0]), rows[3]]))
    with pytest.raises(RecordError, match=r"bad\.jsonl:2 .*no annotations\.segments"):
        _dm(bad, world).setup("fit")


# ---------------------------------------------------------------------------------------------
# training through the CLI, export, load, scoring


def test_config_parses():
    check_config(str(ROOT / "configs/fg_rm/tiny.yaml"))
    assert (ROOT / "configs/fg_rm/tiny.yaml").read_text().startswith("# Run")


def test_object_rm_trains_logs_and_exports(object_rm):
    from mmalign.losses.fg import balanced_class_weights
    from mmalign.rewards import CLASSES, VALUES

    cli, root = object_rm
    assert cli.trainer.global_step == 2
    m = cli.trainer.callback_metrics
    for k in ("train/loss", "train/object/loss", "train/object/accuracy", "val/loss", "val/object/accuracy",
              "val/object/support_hallucinated"):
        assert torch.isfinite(m[k]), k
    assert "val/object/recall" in m  # the val responses hold hallucinated segments
    # the heads are trained, at head_lr
    opt = cli.trainer.optimizers[0]
    head_ids = {id(p) for p in cli.model.heads.parameters()}
    groups = [g for g in opt.param_groups if any(id(p) in head_ids for p in g["params"])]
    assert groups and all(g["initial_lr"] == 0.001 for g in groups)
    # balanced weights from the training labels (the config's class_weights)
    want = balanced_class_weights(cli.datamodule.train_class_counts)
    assert torch.equal(cli.model.class_weight.cpu(), want)
    out = root / "model"
    cfg = json.loads((out / "fg_reward_config.json").read_text())
    assert cfg["types"] == ["object"] and cfg["classes"] == list(CLASSES) and cfg["values"] == VALUES
    assert cfg["policy_class"] == "models.policy.HFPolicy" and cfg["format_version"] == 1
    assert cfg["hidden_size"] == cli.model.policy.hidden_size
    assert cfg["segmentation"] == "released" == cli.model.segmentation   # the config's, recorded for PPO
    assert (out / "fg_reward_head.safetensors").is_file() and (out / "manifest.json").is_file()


def test_export_load_round_trip_gives_identical_probabilities(object_rm, world, fb):
    from mmalign.records import read_records
    from mmalign.rewards import SegmentItem
    from mmalign.rewards.fine_grained import (
        FGRewardModel,
        load_fg_reward_model,
        segment_logits,
    )

    cli, root = object_rm
    loaded = load_fg_reward_model(root / "model")
    assert loaded.types == ["object"] and not loaded.training
    recs = read_records(fb["val"], "annotated", data_root=world)[:5]
    items = [SegmentItem(r.images, r.prompt, r.response, r.id) for r in recs]
    got = loaded.segment_probs(items, batch_size=2)
    trained = FGRewardModel(cli.model.policy, cli.model.heads).eval()
    want = trained.segment_probs(items, batch_size=5)
    for g, w, r in zip(got, want, recs):
        assert g["object"].shape == (len(r.annotations["segments"]), 3)
        assert torch.allclose(g["object"], w["object"], atol=1e-5)
        assert torch.allclose(g["object"].sum(-1), torch.ones(len(g["object"])), atol=1e-5)
    # the module's training forward reads the same rows the scorer does
    ds = cli.datamodule.val_set
    batch = cli.datamodule.collator([ds[i] for i in range(2)])
    with torch.no_grad():
        probs = segment_logits(cli.model.policy, cli.model.heads, batch)["object"].softmax(-1)
    first = loaded.segment_probs([SegmentItem(ds.records[0].images, ds.records[0].prompt, ds.records[0].response)])
    n0 = len(ds.segments[0])
    assert torch.allclose(probs[0, :n0], first[0]["object"], atol=1e-5)


def test_load_errors_name_the_file(object_rm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from mmalign.rewards.fine_grained import load_fg_reward_model

    _, root = object_rm
    bad = tmp_path / "bad"
    shutil.copytree(root / "model", bad)
    heads = load_file(str(bad / "fg_reward_head.safetensors"))
    save_file({"object.weight": heads["object.weight"][:2], "object.bias": heads["object.bias"]},
              str(bad / "fg_reward_head.safetensors"))
    with pytest.raises(ValueError, match=r"fg_reward_head\.safetensors: object\.weight has shape"):
        load_fg_reward_model(bad)
    cfg = json.loads((bad / "fg_reward_config.json").read_text())
    (bad / "fg_reward_config.json").write_text(json.dumps({**cfg, "format_version": 9}))
    with pytest.raises(ValueError, match=r"fg_reward_config\.json: format_version 9"):
        load_fg_reward_model(bad)
    with pytest.raises(FileNotFoundError, match="fg_reward_config.json"):
        load_fg_reward_model(tmp_path)


def test_export_segmentation_is_read_back(object_rm, tmp_path):
    """The segmentation a model scores is its export's; an export without the key predates it and
    used the fine rule; an unknown one is an error naming the file."""
    import shutil

    from mmalign.rewards.fine_grained import FGRewardModel, load_fg_reward_model

    _, root = object_rm
    loaded = load_fg_reward_model(root / "model")
    assert loaded.segmentation == "released"
    # built in code: the default, or what it is told
    assert FGRewardModel(loaded.policy, loaded.heads).segmentation == "released"
    assert FGRewardModel(loaded.policy, loaded.heads, segmentation="fine").segmentation == "fine"
    old = tmp_path / "old"
    shutil.copytree(root / "model", old)
    cfg = json.loads((old / "fg_reward_config.json").read_text())
    del cfg["segmentation"]
    (old / "fg_reward_config.json").write_text(json.dumps(cfg))
    assert load_fg_reward_model(old).segmentation == "fine"
    (old / "fg_reward_config.json").write_text(json.dumps({**cfg, "segmentation": "words"}))
    with pytest.raises(ValueError, match=r"old/fg_reward_config\.json: segmentation must be one of"):
        load_fg_reward_model(old)


def test_labels_cut_another_way_are_refused(world, fb, tmp_path):
    """A model trained on the released segmentation refuses labels written with the fine one (or
    with none recorded: the fine rule predates the key), naming file:line; trained on "fine" it
    takes them."""
    fine = _feedback_file(world, "train", tmp_path / "fine.jsonl", segmentation="fine")
    with pytest.raises(RecordError, match=r"fine\.jsonl:1 id=.*: the feedback labels used segmentation 'fine' but "
                                          r"this run uses 'released'"):
        _dm(fine, world).setup("fit")
    rows = [json.loads(x) for x in fine.read_text().splitlines()]
    for r in rows:
        del r["annotations"]["segmentation"]
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"legacy\.jsonl:1 .*segmentation 'fine'"):
        _dm(legacy, world).setup("fit")
    ok = _dm(fine, world, segmentation="fine")
    ok.setup("fit")
    released = _dm(fb["train"], world)
    released.setup("fit")
    # the same responses, cut two ways: the fine rule gives more segments
    n_fine = sum(len(s) for s in ok.train_set.segments)
    n_released = sum(len(s) for s in released.train_set.segments)
    assert len(ok.train_set) == len(released.train_set) and n_fine > n_released


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batching_and_padding_do_not_change_probabilities(model_dirs, family):
    from mmalign.rewards import SegmentItem
    from mmalign.rewards.fine_grained import FGRewardModel, make_head
    from models.policy import HFPolicy

    torch.manual_seed(0)
    policy = HFPolicy(str(model_dirs[family]))
    heads = torch.nn.ModuleDict({t: make_head(policy.hidden_size) for t in ("object", "relation")})
    # the fine segmentation: 2, 3, 0 and 1 segments, so the batch holds segment padding too
    model = FGRewardModel(policy, heads, segmentation="fine").eval()
    img = Image.new("RGB", (64, 64), (10, 200, 10))
    items = [SegmentItem([img], "Describe the image.", "There is one object: a large blue cross.", "a"),
             SegmentItem([img], "Give a detailed description of the image, please, with every object.",
                    "A red circle is left of a blue square and a star, and it is small.", "b"),
             SegmentItem([img], "Describe.", "", "empty"),
             SegmentItem([img], "What is there?", "Two stars.", "c")]
    together = model.segment_probs(items, batch_size=4)
    alone = [model.segment_probs([it], batch_size=1)[0] for it in items]
    for t_, a_ in zip(together, alone):
        for t in ("object", "relation"):
            assert t_[t].shape == a_[t].shape
            assert torch.allclose(t_[t], a_[t], atol=1e-5)
    assert together[2]["object"].shape == (0, 3) and together[1]["relation"].shape == (3, 3)


def test_shared_model_trains_three_heads_and_scores_in_one_pass(world, model_dirs, fb, tmp_path, monkeypatch):
    from mmalign.rewards import SegmentItem
    from mmalign.rewards.fine_grained import (
        FGRewardModel,
        fg_segment_probs,
        fg_segment_rewards,
        load_fg_reward_model,
    )

    cli = cli_main(fit_args(world, model_dirs["llava"], fb, tmp_path, "--trainer.max_steps", "2",
                            "--model.init_args.types", "[object, attribute, relation]",
                            "--model.init_args.class_weights", "none"))
    m = cli.trainer.callback_metrics
    for t in TYPES:
        assert torch.isfinite(m[f"train/{t}/loss"]) and torch.isfinite(m[f"val/{t}/accuracy"])
    assert torch.equal(cli.model.class_weight.cpu(), torch.ones(3, 3))
    shared = load_fg_reward_model(tmp_path / "model")
    assert shared.types == list(TYPES)
    calls = []
    orig = FGRewardModel.segment_probs

    def counting(self, items, batch_size=16, types=None, progress=False):
        calls.append(tuple(types or ()))
        return orig(self, items, batch_size, types, progress)

    monkeypatch.setattr(FGRewardModel, "segment_probs", counting)
    img = Image.new("RGB", (64, 64))
    items = [SegmentItem([img], "Describe.", "There is one object: a large blue cross.", "a")]
    probs = fg_segment_probs({t: shared for t in TYPES}, items)
    assert calls == [TYPES] and set(probs[0]) == set(TYPES)
    rewards = fg_segment_rewards({t: shared for t in TYPES}, items, mode="label")
    # the released segmentation (the export's): "There is one object: a large blue cross." is one segment
    assert shared.segmentation == "released"
    assert set(rewards[0]["relation"].tolist()) <= {-1.0, 0.0, 1.0} and rewards[0]["object"].shape == (1,)
    shared_fine = FGRewardModel(shared.policy, shared.heads, segmentation="fine")
    with pytest.raises(ValueError, match="trained on different segmentations"):
        fg_segment_probs({"object": shared, "relation": shared_fine}, items)


# ---------------------------------------------------------------------------------------------
# the fg_rm_eval stage


def test_eval_metrics_by_hand():
    from data_pipelines.fg_rm_eval import type_metrics

    # classes 0 = hallucinated, 1 = correct, 2 = n/a
    # response 0: labels H C N, predicted H H N -> tp 1, fp 1; response 1: labels H N, predicted C N -> fn 1
    m = type_metrics([[0, 1, 2], [0, 2]], [[0, 0, 2], [1, 2]], n_boot=200)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["precision"]["value"] == 0.5 and m["recall"]["value"] == 0.5
    assert m["f1"]["value"] == pytest.approx(2 / 4) and m["accuracy"]["value"] == pytest.approx(3 / 5)
    assert m["confusion"]["counts"] == [[1, 1, 0], [1, 0, 0], [0, 0, 2]]
    assert m["support"] == {"hallucinated": 2, "correct": 1, "n/a": 2}
    assert m["predicted"] == {"hallucinated": 2, "correct": 1, "n/a": 2}
    b = m["baselines"]
    # base rate 2/5; always hallucinated: P = 2/5, R = 1, F1 = 2*2 / (2 + 5) = 4/7; random at the base rate: 2/5
    assert b["base_rate"] == pytest.approx(0.4) and b["always_hallucinated"]["recall"] == 1.0
    assert b["always_hallucinated"]["f1"]["value"] == pytest.approx(4 / 7)
    assert b["random_at_base_rate"]["f1"] == pytest.approx(0.4) and b["majority_class_accuracy"] == pytest.approx(0.4)
    assert m["f1_minus_always_hallucinated"]["value"] == pytest.approx(0.5 - 4 / 7)
    lo, hi = m["f1"]["low"], m["f1"]["high"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    # no hallucinated label and no such prediction: precision and recall are undefined (None), not 0
    m = type_metrics([[1, 2]], [[1, 1]], n_boot=50)
    assert m["precision"]["value"] is None and m["recall"]["value"] is None


def test_eval_stage_writes_metrics_and_report(object_rm, world, fb, tmp_path, capsys):
    from data_pipelines.fg_rm_eval import main

    _, root = object_rm
    out = tmp_path / "eval"
    args = ["--models", f"object={root / 'model'}", "--feedback", str(fb["val"]), "--data-root", str(world),
            "--out", str(out), "--n-boot", "50", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| object |" in printed and "F1 always-hallucinated" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in fb["val"].read_text().splitlines()]
    o = metrics["types"]["object"]
    assert metrics["responses"] == len(rows) and list(metrics["types"]) == ["object"]
    assert o["segments"] == sum(len(r["annotations"]["segments"]) for r in rows)
    hal = sum(s["labels"]["object"] == "hallucinated" for r in rows for s in r["annotations"]["segments"])
    assert o["support"]["hallucinated"] == hal and sum(map(sum, o["confusion"]["counts"])) == o["segments"]
    assert o["baselines"]["base_rate"] == pytest.approx(hal / o["segments"])
    assert "## object: confusion" in (out / "report.md").read_text()
    seg = [json.loads(x) for x in (out / "segments.jsonl").read_text().splitlines()]
    assert len(seg) == len(rows) and len(seg[0]["object"]["predictions"]) == len(seg[0]["segments"])
    assert json.loads((out / "manifest.json").read_text())["counts"]["responses"] == len(rows)
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    # a bare folder = every type of that model; a type the model lacks is refused
    assert main([*args[2:], "--models", str(root / "model"), "--force"]) == 0
    with pytest.raises(SystemExit):
        main([*args[2:], "--models", f"relation={root / 'model'}", "--force"])
    assert metrics["segmentation"] == "released"
    assert metrics["segments_per_response"] == pytest.approx(o["segments"] / len(rows))
    # held-out labels cut another way than the model's training labels: refused before any model loads
    fine = _feedback_file(world, "val", tmp_path / "fine/feedback.jsonl", segmentation="fine")
    with pytest.raises(SystemExit):
        main([*args[:2], "--feedback", str(fine), *args[4:], "--force"])
    assert "the held-out labels used segmentation 'fine'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "TYPE=DIR" in capsys.readouterr().out
