"""Model-backed fine-grained feedback sources on tiny models: the VLM judge (tiny llava), the
zero-shot detector (a tiny random OWL-ViT) and the teacher critic (a tiny Llama)."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign import world as W
from mmalign.feedback import (
    LABELS,
    Feedback,
    FeedbackItem,
    FeedbackSource,
    SegmentFeedback,
    check_feedback,
)
from mmalign.oracle import world_claims
from mmalign.records import RecordError
from models.feedback_sources import (
    DetectorSource,
    TeacherCritic,
    VLMJudgeSource,
    claim_category,
    format_labels,
    load_teacher_prompts,
)


def _scenes(world, n=3):
    lines = (world / "test" / "scenes.jsonl").read_text().splitlines()[:n]
    return [(W.Scene.from_dict(d), str(world / d["image"])) for d in map(json.loads, lines)]


def _items(world):
    """Faithful captions of three scenes, a caption of another scene (hallucinated) and a
    repeat of the first item under another id (same image, same claims)."""
    (s0, i0), (s1, i1), (s2, i2) = _scenes(world)
    prompt = "Describe the image in detail."
    return [
        FeedbackItem("a", prompt, W.detailed_caption(s0), image=i0),
        FeedbackItem("b", prompt, W.detailed_caption(s1), image=i1),
        FeedbackItem("c", prompt, W.detailed_caption(s2), image=i2),
        FeedbackItem("d", prompt, W.detailed_caption(s1), image=i0),
        FeedbackItem("e", prompt, W.detailed_caption(s0), image=i0),
    ]


def _check_segments(items, fb, extract=world_claims, types=None):
    check_feedback(items, fb)
    assert [f.id for f in fb] == [it.id for it in items]
    for it, f in zip(items, fb):
        assert isinstance(f, Feedback) and isinstance(f.segments, list)
        claims = [c for c in extract(it.response) if types is None or c.type in types]
        assert sum(len(s.claims) for s in f.segments) == len(claims)
        for s in f.segments:
            assert isinstance(s, SegmentFeedback)
            assert len(s.verdicts) == len(s.claims)
            assert set(s.labels.values()) <= set(LABELS)
            assert it.response[s.start: s.end] == s.text
        assert isinstance(f.critique, str) and isinstance(f.refinement, str)
        assert 0.0 <= f.scores["faithfulness"] <= 1.0


# -- the VLM judge -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge(model_dirs):
    return VLMJudgeSource(str(model_dirs["llava"]), batch_size=8, progress=False)


def _count_prompts(judge, monkeypatch):
    asked = []
    real = judge.policy.generate

    def spy(batch, **kw):
        asked.append(batch["input_ids"].shape[0])
        return real(batch, **kw)

    monkeypatch.setattr(judge.policy, "generate", spy)
    return asked


def test_judge_feedback_is_well_formed_and_deduplicated(judge, world, monkeypatch):
    items = _items(world)
    assert isinstance(judge, FeedbackSource) and judge.name == "judge"
    asked = _count_prompts(judge, monkeypatch)
    fb = judge.annotate(items)
    _check_segments(items, fb)
    n_claims = [len(world_claims(it.response)) for it in items]
    assert all(n_claims[:3])
    unique = {(it.image, c.question) for it in items for c in world_claims(it.response)}
    assert sum(asked) == len(unique) < sum(n_claims)  # "e" repeats "a"; shared questions asked once
    for f, n in zip(fb, n_claims):
        answers = f.meta["answers"]
        assert len(answers) == n and all(isinstance(a, str) for a in answers)
        verdicts = [v for s in f.segments for v in s.verdicts]
        assert sorted(map(str, verdicts)) == sorted(str(W.parse_yes_no(a)) for a in answers)
        assert f.meta["unparsed"] == sum(W.parse_yes_no(a) is None for a in answers)
        parsed = [v for v in verdicts if v is not None]
        assert f.scores["faithfulness"] == pytest.approx(sum(parsed) / len(parsed) if parsed else 1.0)
    assert fb[4].meta["answers"] == fb[0].meta["answers"]


def test_judge_verdicts_labels_and_scores_follow_the_answers(judge, world, monkeypatch):
    """Scripted answers: object questions "Yes.", attribute questions "no", relation questions
    unparseable."""
    items = _items(world)[:3]
    kind = {c.question: c.type for it in items for c in world_claims(it.response)}
    reply = {"object": "Yes.", "attribute": "no", "relation": "I think so"}

    def scripted(pairs):
        return [reply[kind[q]] for _, q in pairs]

    monkeypatch.setattr(judge, "_generate", scripted)
    fb = judge.annotate(items)
    _check_segments(items, fb)
    for it, f in zip(items, fb):
        claims = world_claims(it.response)
        answers = [reply[c.type] for c in claims]
        expected = [{"object": True, "attribute": False, "relation": None}[c.type] for c in claims]
        assert f.meta["answers"] == answers
        assert [v for s in f.segments for v in s.verdicts] == expected
        assert f.meta["unparsed"] == expected.count(None)
        n_yes, n_no = expected.count(True), expected.count(False)
        assert f.scores["faithfulness"] == pytest.approx(n_yes / (n_yes + n_no))
        for s in f.segments:
            for t in ("object", "attribute", "relation"):
                vs = [v for c, v in zip(s.claims, s.verdicts) if c.type == t]
                assert s.labels[t] == ("hallucinated" if False in vs else "correct" if True in vs else "n/a")
        assert any(s.labels["object"] == "correct" for s in f.segments)
    assert any(s.labels["attribute"] == "hallucinated" for f in fb for s in f.segments)
    assert any(f.meta["unparsed"] for f in fb)
    assert all(f.critique != "The answer makes no claim that can be checked against the image." for f in fb)


@pytest.fixture
def noisy_judge(judge):
    """The judge with larger random weights, so that its answers differ from prompt to prompt
    (the freshly initialised tiny model answers every question the same)."""
    saved = {k: v.clone() for k, v in judge.policy.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in judge.policy.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / p.shape[-1] ** 0.5)
    yield judge
    judge.policy.model.load_state_dict(saved)


def test_judge_answers_do_not_depend_on_batch_size(noisy_judge, world, monkeypatch):
    judge = noisy_judge
    items = _items(world)[:3]
    pairs = [(it.image, c.question) for it in items for c in world_claims(it.response)]
    assert len(pairs) > 8
    monkeypatch.setattr(judge, "batch_size", 8)
    by8 = judge.ask(pairs)
    monkeypatch.setattr(judge, "batch_size", 1)
    by1 = judge.ask(pairs)
    assert by1 == by8 and len(by8) == len(pairs)
    assert len(set(by8)) > 3  # the answers do depend on the image and the question


def test_judge_errors_and_empty_claims(judge, world, monkeypatch):
    image = _scenes(world, 1)[0][1]
    with pytest.raises(RecordError, match="'no-image'"):
        judge.annotate([FeedbackItem("ok", "q", "There is a red star.", image=image),
                        FeedbackItem("no-image", "q", "There is a red star.")])
    with pytest.raises(RecordError, match="'gone'.*not found"):
        judge.annotate([FeedbackItem("gone", "q", "There is a red star.", image=image + ".missing")])
    asked = _count_prompts(judge, monkeypatch)
    items = [FeedbackItem("empty", "Describe.", "I cannot tell.", image=image)]
    assert world_claims(items[0].response) == []
    (f,) = judge.annotate(items)
    assert asked == []
    assert f.scores == {"faithfulness": 1.0} and f.meta["answers"] == [] and f.meta["unparsed"] == 0
    assert all(not s.verdicts for s in f.segments)
    assert judge.annotate([]) == []
    with pytest.raises(ValueError, match="claims must be one of"):
        VLMJudgeSource("unused", claims="voc")


# -- the detector ------------------------------------------------------------------------------


def _clip_tokenizer(max_length):
    """A CLIP tokenizer without merges: every word is spelled out in byte-level characters.
    OWL-ViT reads the query mask from ``input_ids[..., 0] > 0`` and pools at the argmax id, so
    bos must not be id 0 and eos (= pad) must be the largest id."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@pytest.fixture(scope="module")
def owlvit_dir(tmp_path_factory):
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor
    from transformers.models.owlvit.image_processing_pil_owlvit import (
        OwlViTImageProcessorPil,
    )

    tok = _clip_tokenizer(48)
    cfg = OwlViTConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "max_position_embeddings": 48, "bos_token_id": tok.bos_token_id,
                         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 32, "patch_size": 8},
        projection_dim=32)
    torch.manual_seed(0)
    model = OwlViTForObjectDetection(cfg)
    images = OwlViTImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    out = tmp_path_factory.mktemp("owlvit")
    model.save_pretrained(out)
    OwlViTProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


def test_detector_checks_objects_only(owlvit_dir, world):
    items = _items(world)
    det = DetectorSource(str(owlvit_dir), threshold=0.5, batch_size=2)
    assert isinstance(det, FeedbackSource) and det.name == "detector"
    fb = det.annotate(items)
    _check_segments(items, fb, types=("object",))
    for it, f in zip(items, fb):
        objects = [c for c in world_claims(it.response) if c.type == "object"]
        assert objects and f.meta["detections"]
        assert all(0.0 <= p <= 1.0 for p in f.meta["detections"].values())
        for s in f.segments:
            assert s.labels.get("attribute", "n/a") == "n/a" and s.labels.get("relation", "n/a") == "n/a"
            assert all(v in (True, False) for v in s.verdicts)
            for c, v in zip(s.claims, s.verdicts):
                assert c.type == "object"
                assert v == (f.meta["detections"][claim_category(c)] >= 0.5)
    # the same image and categories give the same scores whatever the batch
    assert fb[4].meta["detections"] == pytest.approx(fb[0].meta["detections"], abs=1e-5)
    # threshold 0 finds everything
    every = DetectorSource(str(owlvit_dir), threshold=0.0).annotate(items[:1])[0]
    assert every.scores["faithfulness"] == 1.0
    with pytest.raises(RecordError, match="'x'"):
        det.annotate([FeedbackItem("x", "q", "There is a red star.")])


@pytest.fixture(scope="module")
def grounding_dino_dir(tmp_path_factory):
    """A tiny random Grounding-DINO (Swin backbone, 1-layer BERT) with a word-level BERT vocab."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    out = tmp_path_factory.mktemp("grounding_dino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", *W.SHAPES]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, image_size=64,
                                   patch_size=4, out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=2,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False,
        use_pretrained_backbone=False)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(cfg).save_pretrained(out)
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=images, tokenizer=BertTokenizer(str(out / "vocab.txt"))).save_pretrained(out)
    return out


def test_detector_grounding_dino_scores_each_category(grounding_dino_dir, world):
    items = _items(world)[:3]
    det = DetectorSource(str(grounding_dino_dir), threshold=0.5)
    assert det.query_template == "a {}"
    fb = det.annotate(items)
    _check_segments(items, fb, types=("object",))
    for f in fb:
        assert all(0.0 <= p <= 1.0 for p in f.meta["detections"].values())
        for s in f.segments:
            assert s.labels["attribute"] == s.labels["relation"] == "n/a"
            assert s.verdicts == [f.meta["detections"][claim_category(c)] >= 0.5 for c in s.claims]
    # per category, not one score for the whole text
    assert any(len(set(f.meta["detections"].values())) > 1 for f in fb)


# -- the teacher critic -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(model_dirs, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dirs["llava"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_teacher_rewrites_critique_and_refinement(teacher_dir, world):
    items = _items(world)[:2]
    segs = [SegmentFeedback(index=0, start=0, end=5, text="Hello", labels={"object": "correct"}, claims=[],
                            verdicts=[])]
    fb = Feedback(id="a", scores={"faithfulness": 1.0}, critique="old", refinement="old", segments=segs)
    teacher = TeacherCritic(str(teacher_dir), max_new_tokens=6)
    crit_prompt, ref_prompt = teacher.prompt_texts(items[0], fb)
    assert items[0].response in crit_prompt and '"Hello" -- object: correct' in ref_prompt
    new = teacher.rewrite(items[0], fb)
    assert isinstance(new.critique, str) and isinstance(new.refinement, str)
    assert new.scores == fb.scores and new.segments == segs and new.meta["teacher"] == str(teacher_dir)
    assert fb.critique == "old"  # the input is not changed
    with pytest.raises(ValueError, match="no segments|Feedback.segments"):
        teacher.rewrite(items[0], Feedback(id="a", scores={}))
    assert format_labels([]) == "(no segments)"


def test_teacher_prompt_file_errors(tmp_path):
    assert set(load_teacher_prompts("configs/feedback/teacher.yaml")) == {"critique_prompt", "refinement_prompt"}
    bad = tmp_path / "t.yaml"
    bad.write_text("critique_prompt: 'Q: {question}'\n")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['refinement_prompt'\]"):
        load_teacher_prompts(bad)
    bad.write_text("critique_prompt: 'Q: {question}'\nrefinement_prompt: 'R: {answer}'\n")
    with pytest.raises(ValueError, match=r"refinement_prompt has unknown field\(s\) \['answer'\]"):
        load_teacher_prompts(bad)
    bad.write_text("critique_prompt: 'Q: {question'\nrefinement_prompt: 'R'\n")
    with pytest.raises(ValueError, match="critique_prompt: not a valid format string"):
        load_teacher_prompts(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        TeacherCritic("unused", prompt_file=str(tmp_path / "nope.yaml"))


# -- the judge in look-up mode (TIFA-style) ---------------------------------------------------


def _truthful_lookup_answers(world):
    """Answers a perfect VQA model would give to every look-up question about the test scenes:
    computed from the scene graphs with the world's own look-up writers."""
    import random

    scenes = {str(world / d["image"]): W.Scene.from_dict(d)
              for d in map(json.loads, (world / "test" / "scenes.jsonl").read_text().splitlines())}

    def answer(image, question):
        scene, rng = scenes[image], random.Random(0)
        for shape in W.SHAPES:
            if question == W.LOOKUP_COLOR_TEMPLATE.format(s=shape):
                return W.lookup_color_question(scene, rng, shape).answer
        for i, o in enumerate(scene.objects):
            if question == W.LOOKUP_SIZE_TEMPLATE.format(n=o.name()):
                return W.lookup_size_question(scene, rng, i).answer
            for j, p in enumerate(scene.objects):
                if i != j and question == W.LOOKUP_RELATION_TEMPLATE.format(a=o.name(), b=p.name()):
                    return W.lookup_relation_question(scene, rng, (i, j)).answer
        return "I cannot tell."  # asked about an object the scene does not hold

    return scenes, answer


def test_lookup_judge_with_truthful_answers_agrees_with_the_oracle(world, model_dirs, monkeypatch):
    """With a VQA model that answers every content question truthfully, the look-up judge's
    verdict on every claim is the oracle's (verify_world_claim), hallucinations included."""
    from mmalign.oracle import verify_world_claim

    judge = VLMJudgeSource(str(model_dirs["llava"]), questions="lookup", batch_size=8, progress=False)
    scenes, answer = _truthful_lookup_answers(world)
    monkeypatch.setattr(judge, "_generate", lambda pairs: [answer(i, q) for i, q in pairs])
    items = _items(world)
    fb = judge.annotate(items)
    _check_segments(items, fb)
    n_false = 0
    for it, f in zip(items, fb):
        claims = world_claims(it.response)
        got = [v for s in f.segments for v in s.verdicts]
        truth = [verify_world_claim(c, scenes[str(it.image)]) for c in claims]
        # segments group claims by position: compare as multisets per item
        assert sorted(map(str, got)) == sorted(map(str, truth))
        n_false += truth.count(False)
    assert n_false > 0  # item "d" describes another scene: the check must see its hallucinations


def test_lookup_judge_asks_content_questions_once_each(world, model_dirs, monkeypatch):
    judge = VLMJudgeSource(str(model_dirs["llava"]), questions="lookup", batch_size=8, progress=False)
    asked = []
    monkeypatch.setattr(judge, "_generate", lambda pairs: asked.extend(pairs) or ["There is no star."] * len(pairs))
    fb = judge.annotate(_items(world))
    assert asked and len(asked) == len(set(asked))
    assert all(q.startswith(("What color is the", "What size is the", "Where is the")) for _, q in asked)
    # "There is no star." to everything: every object claim is false, attributes and relations unverifiable
    for f in fb:
        for s in f.segments:
            for c, v in zip(s.claims, s.verdicts):
                assert v is (False if c.type == "object" else None)
    with pytest.raises(ValueError, match="lookup"):
        VLMJudgeSource(str(model_dirs["llava"]), questions="lookup", claims="coco")
    with pytest.raises(ValueError, match="questions"):
        VLMJudgeSource(str(model_dirs["llava"]), questions="maybe")


def test_caption_judge_describes_each_image_once_and_checks_claims_against_it(world, model_dirs, monkeypatch):
    """A judge whose description is the scene's true caption gives the oracle's object and
    attribute verdicts; one description per distinct image, however many claims."""
    from mmalign.oracle import verify_world_claim

    judge = VLMJudgeSource(str(model_dirs["llava"]), questions="caption", batch_size=8, progress=False)
    scenes = {str(world / d["image"]): W.Scene.from_dict(d)
              for d in map(json.loads, (world / "test" / "scenes.jsonl").read_text().splitlines())}
    asked = []

    def describe(pairs):
        asked.extend(pairs)
        return [W.detailed_caption(scenes[i]) for i, _ in pairs]

    monkeypatch.setattr(judge, "_generate", describe)
    items = _items(world)
    fb = judge.annotate(items)
    _check_segments(items, fb)
    assert sorted(asked) == sorted({(str(it.image), "Describe the image in detail.") for it in items})
    for it, f in zip(items, fb):
        for s in f.segments:
            for c, v in zip(s.claims, s.verdicts):
                if c.type != "relation":
                    assert v == verify_world_claim(c, scenes[str(it.image)])
    assert any(v is False for s in fb[3].segments for v in s.verdicts)  # another scene's caption
