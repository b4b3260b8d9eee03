"""Re-Align's rejected answer by the paper's rule: masking, constrained infilling, the similarity
acceptance rule, the packaged sentence model, and the ``realign_data`` stage's refill mode end to end.

Expected values are derived by hand from the texts below (which words are object / attribute /
relation words) and from scripted decoding steps; the end-to-end test runs the stage on the
hand-made world of ``tests/test_realign_data.py`` with a tiny (untrained) LLaVA from ``conftest``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmalign import world as W
from mmalign.eval.vocab import ObjectVocabulary
from mmalign.oracle import verify_world_claim, world_claims
from mmalign.records import read_records
from mmalign.refill import (
    MASK,
    ConstrainedInfiller,
    PromptInfiller,
    RefillRequest,
    RefillResult,
    _Slotted,
    _starts_fixed,
    mask_answer,
)
from mmalign.textsim import SentenceSimilarity, first_below

CAPTION = ("There are two objects: a small red circle and a large blue square. "
           "The red circle is left of the blue square.")


# ---------------------------------------------------------------------------------------------
# masking


def test_masking_from_world_claims_masks_object_attribute_and_relation_words():
    m = mask_answer(CAPTION, claims=world_claims(CAPTION))
    assert m.masked() == (f"There are two objects: a {MASK} and a {MASK}. The {MASK} is {MASK} the {MASK}.")
    assert [s.text for s in m.spans] == ["small red circle", "large blue square", "red circle", "left of", "blue square"]
    assert [s.kinds for s in m.spans] == [("attribute", "object")] * 3 + [("relation",), ("attribute", "object")]
    # the fixed pieces end on a word; the whitespace before each slot belongs to the slot
    assert m.fixed == ("There are two objects: a", " and a", ". The", " is", " the", ".")
    assert m.leads == (" ",) * 5
    assert m.fill([s.text for s in m.spans]) == CAPTION
    assert m.n_words == [3, 3, 2, 2, 2]


def test_masking_kinds_pick_which_words():
    claims = world_claims(CAPTION)
    rel = mask_answer(CAPTION, claims=claims, kinds=["relation"])
    assert rel.masked() == CAPTION.replace("left of", MASK)
    attr = mask_answer(CAPTION, claims=claims, kinds=["attribute"])
    assert attr.masked() == (f"There are two objects: a {MASK} circle and a {MASK} square. "
                             f"The {MASK} circle is left of the {MASK} square.")
    obj = mask_answer(CAPTION, claims=claims, kinds=["object"])
    assert obj.masked() == (f"There are two objects: a small red {MASK} and a large blue {MASK}. "
                            f"The red {MASK} is left of the blue {MASK}.")
    with pytest.raises(ValueError, match="unknown mask kinds"):
        mask_answer(CAPTION, kinds=["colour"])


def test_masking_follows_the_claims_not_the_words():
    # a negated mention is no claim, so nothing in "no star" is masked; a count is an attribute word
    text = "There are two red circles. There is no star. The red circle is not above the star."
    m = mask_answer(text, claims=world_claims(text))
    # "two red circles": count + colour (attribute claim) and shape (object claim); "no star": no claim;
    # the negated relation's phrase is "above" ("not" stays); its object "the star" is a positive mention
    assert m.masked() == f"There are {MASK}. There is no star. The {MASK} is not {MASK} the {MASK}."
    assert [s.text for s in m.spans] == ["two red circles", "red circle", "above", "star"]


def test_masking_free_text_by_vocabulary():
    text = "Two brown dogs sit next to a white car on the grass."
    m = mask_answer(text, vocab=ObjectVocabulary.coco())
    # objects: dogs, car (COCO); attributes: brown, white, and "Two" before a masked word; relation: "next to";
    # "on" is no spatial phrase of the list (too common), "grass" no COCO category
    assert m.masked() == f"{MASK} sit {MASK} a {MASK} on the grass."
    assert [s.text for s in m.spans] == ["Two brown dogs", "next to", "white car"]
    # without a vocabulary only the world's shape words are objects
    # ("Two" is masked: it stands directly before the masked "brown")
    assert mask_answer(text).masked() == f"{MASK} dogs sit {MASK} a {MASK} car on the grass."
    # a number word that is not directly before a masked word stays
    assert mask_answer("Two of them are red.", vocab=ObjectVocabulary.coco()).masked() == f"Two of them are {MASK}."
    assert mask_answer("A man reads.", vocab=ObjectVocabulary.coco()).masked() == f"A {MASK} reads."
    assert mask_answer("Nothing here.").spans == ()


def test_fill_keeps_the_fixed_text_and_strips_fills():
    m = mask_answer(CAPTION, claims=world_claims(CAPTION))
    out = m.fill(["  tiny green star ", "x", "y", "right of", "z"])
    assert out == ("There are two objects: a tiny green star and a x. The y is right of the z.")
    with pytest.raises(ValueError, match="2 fills for 5 slots"):
        m.fill(["a", "b"])


# ---------------------------------------------------------------------------------------------
# constrained infilling: the decoding rules, scripted token by token


def test_starts_fixed_needs_a_word_boundary():
    assert _starts_fixed(" and", " and a")
    assert _starts_fixed(".", ". The")
    assert _starts_fixed(" and a", " and a")
    assert not _starts_fixed(" a", " and a")  # " a" is not the word " and"
    assert not _starts_fixed("", " and a")
    assert not _starts_fixed(" and", "")


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dirs["llava"])


def one(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not one token of the tiny tokenizer: {ids}"
    return ids[0]


def test_slot_decoding_rules(tokenizer):
    tok = tokenizer
    m = mask_answer("There is a red circle and a blue square.",
                    claims=world_claims("There is a red circle and a blue square."))
    assert m.fixed == ("There is a", " and a", ".")
    st = _Slotted(m, tok, extra_words=1, max_slot_tokens=16)
    special = {tok.eos_token_id}
    green, star, and_, dot, big = (one(tok, t) for t in (" green", " star", " and", ".", " large"))
    # an empty slot skips the end of sequence, punctuation and the start of the next fixed text
    st.step([tok.eos_token_id, dot, and_, green], special)
    st.step([star], special)
    assert st.slot == 0 and st.words == 2
    st.step([and_, big], special)  # the policy goes on with the fixed " and a": the slot ends
    assert st.fills == ["green star"] and st.stops == ["fixed"] and st.text == "There is a green star and a"
    # slot 2 masked 2 words: at most 3 with extra_words=1; the 4th new word ends it
    for _ in range(3):
        st.step([big], special)
    st.step([big], special)
    assert st.fills[1] == "large large large" and st.stops[1] == "words"
    assert st.done and st.text == "There is a green star and a large large large."


def test_slot_ends_on_punctuation_or_end_of_sequence(tokenizer):
    tok = tokenizer
    m = mask_answer("A red circle is here", claims=world_claims("A red circle is here"))
    assert m.fixed == ("A", " is here")
    red, dot = one(tok, " red"), one(tok, ".")
    st = _Slotted(m, tok, extra_words=1, max_slot_tokens=16)
    st.step([red], {tok.eos_token_id})
    st.step([dot], {tok.eos_token_id})
    assert st.stops == ["punctuation"] and st.text == "A red is here"
    st = _Slotted(m, tok, extra_words=1, max_slot_tokens=16)
    st.step([red], {tok.eos_token_id})
    st.step([tok.eos_token_id], {tok.eos_token_id})
    assert st.stops == ["end"] and st.text == "A red is here"
    st = _Slotted(m, tok, extra_words=1, max_slot_tokens=16)
    st.step([dot, tok.eos_token_id], {tok.eos_token_id})  # no word among the candidates
    assert st.error.startswith("slot 1 ('red circle')") and st.done


@pytest.fixture(scope="module")
def tiny_policy(model_dirs):
    from models.policy import HFPolicy

    return HFPolicy(str(model_dirs["llava"])).eval()


def test_infill_forces_the_fixed_text_exactly(tiny_policy, world):
    scenes = [json.loads(x) for x in (world / "train" / "scenes.jsonl").read_text().splitlines()][:6]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    reqs = []
    for i, s in enumerate(scenes):
        cap = W.detailed_caption(W.Scene.from_dict(s))
        other = scenes[(i + 1) % len(scenes)]["image"]
        reqs.append(RefillRequest(world / other, prompt, mask_answer(cap, claims=world_claims(cap)), f"scene {i}"))
    results = ConstrainedInfiller(tiny_policy, batch_size=4, extra_words=1)(reqs)
    assert len(results) == len(reqs)
    for r, res in zip(reqs, results):
        assert res.ok, res.error
        assert res.text == r.masked.fill(res.fills)  # only the slots changed
        pos = 0
        for piece in r.masked.fixed:  # every fixed piece, in order, verbatim
            pos = res.text.index(piece, pos) + len(piece)
        assert all(f.strip() and len(f.split()) <= n + 1 for f, n in zip(res.fills, r.masked.n_words))
        assert set(res.stops) <= {"fixed", "punctuation", "end", "words", "tokens"}
    # greedy is deterministic and does not depend on the batch it ran in
    again = ConstrainedInfiller(tiny_policy, batch_size=1)(reqs[:2])
    assert [a.text for a in again] == [b.text for b in results[:2]]


def test_prompt_mode_asks_with_the_masked_answer_and_generates(tiny_policy, world):
    scene = json.loads((world / "train" / "scenes.jsonl").read_text().splitlines()[0])
    cap = W.detailed_caption(W.Scene.from_dict(scene))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    req = RefillRequest(world / scene["image"], prompt, mask_answer(cap, claims=world_claims(cap)), "scene 0")
    msgs = PromptInfiller(tiny_policy).messages(req)
    text = msgs[0]["content"][1]["text"]
    assert msgs[0]["content"][0] == {"type": "image"} and req.masked.masked() in text
    assert '"Describe the image in detail."' in text
    got = PromptInfiller(tiny_policy, max_new_tokens=8)([req, req])
    # an untrained policy answers anything: whatever it is, it is a result or a failure with its reason
    assert len(got) == 2 and got[0].text == got[1].text
    assert all(r.ok or r.error for r in got)


def test_prompt_mode_reads_the_answer():
    m = mask_answer(CAPTION, claims=world_claims(CAPTION))
    req = RefillRequest("x.png", [], m)
    got = PromptInfiller._result(req, CAPTION.replace("small red circle", "big green star"))
    assert got.ok and got.kept_fixed and got.fills[0] == "big green star" and got.fills[3] == "left of"
    assert PromptInfiller._result(req, "A cat.").kept_fixed is False
    assert not PromptInfiller._result(req, m.masked()).ok
    assert not PromptInfiller._result(req, "  ").ok


# ---------------------------------------------------------------------------------------------
# similarity and the acceptance rule


def test_first_below_is_strict_and_in_order():
    assert first_below([0.99, 0.96, 0.93, 0.5]) == 2
    assert first_below([0.95, 0.951]) is None  # the threshold itself is not below it
    assert first_below([]) is None
    assert first_below([0.5], max_similarity=0.4) is None


def fake_similarity(vectors: dict[str, list[float]]) -> SentenceSimilarity:
    return SentenceSimilarity(lambda texts: np.array([vectors[t] for t in texts], dtype=np.float32), name="fake")


def test_sentence_similarity_normalises_and_embeds_each_text_once():
    calls = []

    def enc(texts):
        calls.append(list(texts))
        return np.array([{"a": [2, 0], "b": [1, 1], "c": [0, 3]}[t] for t in texts], dtype=np.float32)

    sim = SentenceSimilarity(enc, batch_size=2)
    got = sim.pairwise(["a", "a", "c"], ["b", "a", "a"])
    np.testing.assert_allclose(got, [np.sqrt(0.5), 1.0, 0.0], atol=1e-6)
    assert sorted(t for c in calls for t in c) == ["a", "b", "c"] and max(len(c) for c in calls) == 2
    with pytest.raises(ValueError, match="equal lengths"):
        sim.pairwise(["a"], [])


@pytest.fixture(scope="module")
def packaged_similarity():
    """The packaged all-MiniLM-L6-v2, loaded once, with the hub switched off (it must load offline)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return SentenceSimilarity.load()


def test_the_packaged_all_minilm_model(packaged_similarity):
    sim = packaged_similarity
    swapped = CAPTION.replace("small red circle", "small green circle").replace("The red circle", "The green circle")
    same, swap = sim.pairwise([CAPTION, CAPTION], [CAPTION, swapped])
    assert same == pytest.approx(1.0, abs=1e-4)
    assert swap < 0.95  # a colour swap is far enough to be a rejected answer under the paper's 0.95
    assert sim.embed([CAPTION]).shape == (1, 384)


# ---------------------------------------------------------------------------------------------
# the rule over ranks, with scripted re-fills


class ScriptedInfiller:
    """Re-fills by image: ``texts[image name]`` (None: a failed re-fill)."""

    def __init__(self, texts: dict[str, str | None]):
        self.texts, self.calls = texts, []

    def __call__(self, reqs, progress=False, desc=""):
        self.calls.append([Path(r.image).name for r in reqs])
        out = []
        for r in reqs:
            t = self.texts[Path(r.image).name]
            out.append(RefillResult(t, [t]) if t is not None else RefillResult("", None, ok=False, error="no word"))
        return out


def test_refill_rounds_accept_the_first_completion_below_the_threshold(tmp_path):
    from data_pipelines.realign_data import Item, refill_rounds

    def item(i: str) -> Item:
        return Item(id=i, image=f"images/{i}.png", prompt=[], chosen="chosen", task=None, scene=None, scene_id=None,
                    line=1, where=f"f:{i}")

    items = [item("a"), item("b")]
    table = {"images/a.png": [("images/n1.png", 0.9), ("images/n2.png", 0.8), ("images/n3.png", 0.7)],
             "images/b.png": [("images/n1.png", 0.9), ("images/n4.png", 0.8), ("images/n5.png", 0.7)]}
    infill = ScriptedInfiller({"n1.png": "copy", "n2.png": None, "n3.png": "far", "n4.png": "close", "n5.png": "copy"})
    # cosines to "chosen": copy 1.0, close 0.96, far 0.6
    sim = fake_similarity({"chosen": [1, 0], "copy": [1, 0], "close": [0.96, 0.28], "far": [0.6, 0.8]})
    masks = {"a": None, "b": None}
    accepted, attempts = refill_rounds(items, masks, table, infill, sim, 0.95, tmp_path, progress=False)
    # a: rank 1 too close (1.0), rank 2 failed, rank 3 accepted (0.6); b: nothing below 0.95 in 3 ranks
    assert set(accepted) == {"a"} and accepted["a"].rank == 3 and accepted["a"].similarity == pytest.approx(0.6)
    assert [(x.rank, x.similarity is None) for x in attempts["a"]] == [(1, False), (2, True), (3, False)]
    assert [round(x.similarity, 4) for x in attempts["b"]] == [1.0, 0.96, 1.0]
    assert infill.calls == [["n1.png", "n1.png"], ["n2.png", "n4.png"], ["n3.png", "n5.png"]]
    # a record accepted at rank 1 is not re-filled again
    infill = ScriptedInfiller({"n1.png": "far", "n2.png": "far", "n3.png": "far", "n4.png": "far", "n5.png": "far"})
    accepted, _ = refill_rounds(items, masks, table, infill, sim, 0.95, tmp_path, progress=False)
    assert {k: v.rank for k, v in accepted.items()} == {"a": 1, "b": 1} and len(infill.calls) == 1


# ---------------------------------------------------------------------------------------------
# the stage, end to end on a tiny model


@pytest.fixture
def realign_world(tmp_path):
    from tests.test_realign_data import RECORDS, write_data, write_index

    return write_data(tmp_path, RECORDS), write_index(tmp_path)


def run_refill(data, index, out, model, *extra):
    from data_pipelines import realign_data as R

    return R.main(["--data", str(data), "--index", str(index), "--out", str(out), "--model", str(model),
                   "--no-progress", "--val-fraction", "0", *extra])


def test_stage_refill_end_to_end(realign_world, model_dirs, tmp_path, monkeypatch, packaged_similarity):
    from tests.test_realign_data import SCENES, image_of, jsonl

    monkeypatch.setattr(SentenceSimilarity, "load", classmethod(lambda cls, *a, **k: packaged_similarity))
    data, index = realign_world
    out = tmp_path / "refill"
    assert run_refill(data, index, out, model_dirs["llava"], "--k", "3") == 0
    rep = json.loads((out / "report.json").read_text())
    pairs = jsonl(out / "train" / "pairs.jsonl")
    rejects = jsonl(out / "rejects.jsonl")
    # 3 records (s0, s1, s2 detailed captions): every one is a pair or a reject with a reason
    assert rep["records"]["items"] == 3 and len(pairs) + len(rejects) == 3
    assert all(r["reason"] in ("no re-fill below the similarity threshold", "nothing to mask") for r in rejects)
    rf = rep["refill"]
    assert rf["acceptance"]["accepted"] == len(pairs) and rf["acceptance"]["rate"] == pytest.approx(len(pairs) / 3, abs=1e-4)
    assert sum(rf["accepted_rank"]["histogram"].values()) == len(pairs)
    assert rf["masking"]["from_claims"] == 3 and rf["masking"]["nothing_to_mask"] == 0
    # by the hand-placed angles; s2's neighbours after s2diff are all orthogonal (ties): rank 1 only
    neighbours = {"s0": ["s0same", "s0super", "s1"], "s1": ["s0super", "s0same", "s0"], "s2": ["s2diff"]}
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"][0]["text"], p["rejected"][0]["content"][0]["text"]
        r = p["refill"]
        assert p["rejected_source"] == "refill" and r["similarity"] < 0.95 and rejected != chosen
        # the accepted image is the neighbour of the accepted rank, the text the masked answer re-filled
        if r["rank"] <= len(neighbours[p["scene_id"]]):
            assert p["rejected_images"] == [image_of(neighbours[p["scene_id"]][r["rank"] - 1])]
        assert p["retrieval"]["rank"] == r["rank"] and p["retrieval"]["select"] == "refill"
        m = mask_answer(chosen, claims=world_claims(chosen))
        assert r["masked"] == m.masked() and rejected == m.fill(r["fills"])
        wrong = any(verify_world_claim(c, SCENES[p["scene_id"]]) is False for c in world_claims(rejected))
        assert p["oracle"]["rejected_wrong_on_original"] is wrong
    n_wrong = sum(p["oracle"]["rejected_wrong_on_original"] for p in pairs)
    if pairs:
        assert rf["oracle"]["wrong_on_original"] == pytest.approx(n_wrong / len(pairs), abs=1e-4)
    assert read_records(out / "train" / "pairs.jsonl", kind="preference", data_root=data) or not pairs
    assert (out / "report.md").read_text().startswith("# Re-Align dual-preference data (re-filled")


def test_stage_refill_rejects_with_reason_when_nothing_is_below_the_threshold(realign_world, model_dirs, tmp_path,
                                                                              monkeypatch):
    from tests.test_realign_data import jsonl

    # every text embeds to the same vector: every re-fill has cosine 1 with its chosen answer
    monkeypatch.setattr(SentenceSimilarity, "load",
                        classmethod(lambda cls, *a, **k: SentenceSimilarity(lambda t: np.ones((len(t), 3)), "flat")))
    data, index = realign_world
    from mmalign.records import RecordError

    with pytest.raises(RecordError, match="no pair could be made"):
        run_refill(data, index, tmp_path / "none", model_dirs["llava"], "--k", "2")
    assert not (tmp_path / "none").exists()
    # one record accepted (its chosen answer embeds apart), the others rejected with every attempt listed
    from tests.test_realign_data import SCENES

    s2 = W.detailed_caption(SCENES["s2"])
    monkeypatch.setattr(SentenceSimilarity, "load", classmethod(lambda cls, *a, **k: SentenceSimilarity(
        lambda t: np.array([[1.0, 0.0] if x == s2 else [0.0, 1.0] for x in t]), "split")))
    out = tmp_path / "some"
    assert run_refill(data, index, out, model_dirs["llava"], "--k", "2") == 0
    rejects = jsonl(out / "rejects.jsonl")
    assert sorted(r["id"] for r in rejects) == ["s0-detailed_caption", "s1-detailed_caption"]
    for r in rejects:
        assert r["reason"] == "no re-fill below the similarity threshold" and len(r["attempts"]) == 2
        assert [a["rank"] for a in r["attempts"]] == [1, 2] and all(a["similarity"] == 1.0 for a in r["attempts"])
        assert "sft.jsonl:" in r["error"] and MASK in r["masked"]
    assert [p["id"] for p in jsonl(out / "train" / "pairs.jsonl")] == ["s2-detailed_caption"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["rejects"]["reasons"] == {"no re-fill below the similarity threshold": 2}
    assert rep["refill"]["acceptance"]["rate"] == pytest.approx(1 / 3, abs=1e-4)


def test_stage_refill_arguments(realign_world, tmp_path):
    from data_pipelines import realign_data as R

    data, index = realign_world
    base = ["--data", str(data), "--index", str(index), "--out", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(SystemExit):
        R.main(base)  # refill is the default and needs --model
    with pytest.raises(SystemExit):
        R.main(base + ["--model", str(tmp_path), "--select", "top1"])


def one_hot_similarity() -> SentenceSimilarity:
    """Equal texts cosine 1, different texts cosine 0 (a one-hot per distinct text)."""
    seen: dict[str, int] = {}

    def enc(texts):
        out = np.zeros((len(texts), 4096), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, seen.setdefault(t, len(seen))] = 1.0
        return out

    return SentenceSimilarity(enc, "one-hot")


def test_stage_refill_masks_free_text_where_there_is_no_scene_graph(tmp_path, model_dirs, monkeypatch):
    from tests.test_realign_data import image_of, jsonl, sft, write_data, write_index

    monkeypatch.setattr(SentenceSimilarity, "load", classmethod(lambda cls, *a, **k: one_hot_similarity()))
    free = {**sft("s1", answer="A small dog sits next to a red car."), "id": "free", "scene_id": "nowhere"}
    data = write_data(tmp_path, [sft("s0"), free])
    scenes = data / "train" / "scenes.jsonl"  # s1's image keeps no scene graph
    scenes.write_text("".join(x + "\n" for x in scenes.read_text().splitlines() if '"s1"' not in x))
    out = tmp_path / "refill"
    assert run_refill(data, write_index(tmp_path), out, model_dirs["llava"], "--k", "1") == 0
    rep = json.loads((out / "report.json").read_text())
    pairs = {p["id"]: p for p in jsonl(out / "train" / "pairs.jsonl")}
    assert rep["refill"]["masking"]["from_claims"] == 1 and rep["refill"]["masking"]["from_vocabulary"] == 1
    # every re-fill differs from its chosen answer (cosine 0 < 0.95), so both are accepted at rank 1
    assert set(pairs) == {"s0-detailed_caption", "free"}
    p = pairs["free"]
    assert p["refill"]["masked"] == f"A {MASK} sits {MASK} a {MASK}."  # small dog / next to / red car
    assert p["oracle"] == {"rejected_wrong_on_original": None, "rejected_faithfulness_on_original": None}
    assert p["scene_id"] == "nowhere" and p["rejected_images"] == [image_of("s0super")]
    assert rep["refill"]["oracle"]["with_scene_graph"] == 1
    # injection needs the scene graph that the free record lacks
    from data_pipelines import realign_data as R
    from mmalign.records import RecordError

    with pytest.raises(RecordError, match=r"sft\.jsonl:2: no scene graph"):
        R.main(["--data", str(data), "--index", str(tmp_path / "index"), "--out", str(tmp_path / "inj"),
                "--rejected", "injection", "--no-progress"])
