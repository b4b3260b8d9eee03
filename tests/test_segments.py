"""Sub-sentence segmentation (FGAIF's unit of feedback) and the segment -> last-token mapping.

The ``fine`` rule's expectations (the first half) are worked out by hand from ``mmalign/segments.py``: sentences
end after ``. ! ? ;`` runs (not a decimal point) and at line breaks; inside a sentence a
segment ends after ":", after "," when the next word (past an "and"/"but") starts a new unit
and the piece before has two or more words, and before a bare "and"/"but" followed by such a
word. Segments keep their punctuation; connectives open the next segment.
"""

from __future__ import annotations

import random

import pytest

from mmalign import world as W
from mmalign.segments import (
    DEFAULT_SEGMENTATION,
    Segment,
    char_to_token_end,
    check_same_segmentation,
    check_segmentation,
    recorded_segmentation,
    released_subsentence_starts,
    split_segments,
)


def texts(t: str, segmentation: str = "fine") -> list[str]:
    return [s.text for s in split_segments(t, segmentation)]


def _check_offsets(t: str, segmentation: str = "fine") -> None:
    """text == t[start:end], stripped, in order, indices 0..n-1, and every non-blank character
    of ``t`` lies in exactly one segment (the segments tile the text)."""
    segs = split_segments(t, segmentation)
    covered = set()
    prev_end = 0
    for k, s in enumerate(segs):
        assert isinstance(s, Segment) and s.index == k
        assert s.text == t[s.start:s.end] and s.text == s.text.strip() and s.text
        assert s.start >= prev_end
        prev_end = s.end
        covered.update(range(s.start, s.end))
    assert {i for i, ch in enumerate(t) if not ch.isspace()} <= covered


def test_list_splits_into_one_segment_per_object_phrase():
    # ", a" -> cut after the comma ("a" opens an object phrase; "a red circle" has 3 words);
    # " and a" -> cut before "and". The colon ends the head.
    t = "There are three objects: a red circle, a blue square and a star."
    assert texts(t) == ["There are three objects:", "a red circle,", "a blue square", "and a star."]
    _check_offsets(t)
    segs = split_segments(t, "fine")
    # offsets by hand: "There are three objects:" is 24 characters; then a space
    assert (segs[0].start, segs[0].end) == (0, 24)
    assert (segs[1].start, segs[1].end) == (25, 38)
    assert t[segs[3].start:segs[3].end] == "and a star."


def test_and_splits_clauses_and_relations_but_not_adjectives():
    # "and left" -> "left" is a relation word: a new predicate of the same subject
    assert texts("The red circle is above the blue square and left of the green star.") == [
        "The red circle is above the blue square", "and left of the green star."]
    # "and blue" -> an adjective: no cut; "large, red" -> "red" starts no unit: no cut
    assert texts("There are red and blue circles.") == ["There are red and blue circles."]
    assert texts("A large, red circle is here.") == ["A large, red circle is here."]
    # "but it" -> a new clause
    assert texts("The circle is red but it is small.") == ["The circle is red", "but it is small."]
    # ", and a" -> one cut, after the comma; "and" opens the next segment
    assert texts("A red circle, and a star.") == ["A red circle,", "and a star."]


def test_commas_need_two_words_before_them():
    # "Yes," is one word: no cut, although "there" opens a clause
    assert texts("Yes, there is a red circle.") == ["Yes, there is a red circle."]
    # "The circle is red," has four words and "it" opens a clause: cut
    assert texts("The circle is red, it is large.") == ["The circle is red,", "it is large."]


def test_sentences_decimals_and_trailing_text():
    t = "There is a star! Is it red? It is 3.5 units wide; the end"
    assert texts(t) == ["There is a star!", "Is it red?", "It is 3.5 units wide;", "the end"]
    _check_offsets(t)
    assert texts("A circle\nA star") == ["A circle", "A star"]
    assert texts("Really?! Yes...") == ["Really?!", "Yes..."]


def test_punctuation_only_pieces_join_the_segment_before():
    # "Hi." then " ." (no word) -> joined: "Hi. ."; leading "..." joins the first word's piece
    assert texts("Hi. . A star") == ["Hi. .", "A star"]
    assert texts("... a star.") == ["... a star."]
    _check_offsets("... a star. , ; ok")


def test_empty_and_blank_text():
    assert split_segments("") == []
    assert split_segments("  \n\t ") == []
    with pytest.raises(TypeError, match="needs a string"):
        split_segments(None)  # type: ignore[arg-type]


def test_reference_captions_tile_and_put_each_object_in_its_own_segment():
    """On 30 sampled scenes: offsets round-trip, and the detailed caption has 1 (head) + one
    segment per object + one per relation sentence (each relation sentence has no "and")."""
    for seed in range(30):
        rng = random.Random(seed)
        scene = W.sample_scene(rng, n_objects=rng.randint(1, 4))
        cap = W.detailed_caption(scene)
        _check_offsets(cap)
        _check_offsets(W.short_caption(scene))
        assert len(split_segments(cap, "fine")) == 1 + len(scene.objects) + len(W.caption_relations(scene))


def test_char_to_token_end_with_hand_made_offsets():
    # "a red circle, and a star." ; byte-level BPE style: leading spaces inside tokens,
    # a BOS special token with an empty span (0, 0)
    text = "a red circle, and a star."
    offsets = [(0, 0), (0, 1), (1, 5), (5, 12), (12, 13), (13, 17), (17, 19), (19, 24), (24, 25)]
    assert [text[a:b] for a, b in offsets[1:]] == ["a", " red", " circle", ",", " and", " a", " star", "."]
    s0, s1 = split_segments(text, "fine")
    assert (s0.end, s1.end) == (13, 25)
    assert char_to_token_end(offsets, s0.end) == 4  # the "," token
    assert char_to_token_end(offsets, s1.end) == 8  # the "." token
    assert char_to_token_end(offsets, 12) == 3  # "circle": " and" starts at 13, not before 12
    # trimmed offsets (the space not in the token) give the same answers
    trimmed = [(0, 0), (0, 1), (2, 5), (6, 12), (12, 13), (14, 17), (18, 19), (20, 24), (24, 25)]
    assert char_to_token_end(trimmed, 13) == 4 and char_to_token_end(trimmed, 25) == 8
    # a token that runs past char_end still holds the last character: ".\n" at (24, 26)
    assert char_to_token_end([(0, 24), (24, 26)], 25) == 1
    with pytest.raises(ValueError, match="no token starts before character 0"):
        char_to_token_end(offsets, 0)
    with pytest.raises(ValueError, match="no token"):
        char_to_token_end([(0, 0)], 5)


# ---------------------------------------------------------------------------------------------
# the released rule (Fine-Grained RLHF's get_subsentence_starts, copied by FGAIF): per spaCy
# sentence, white-space words; cut after a word ending in , ; ! ? when more than 5 words remain
# and the piece so far has >= 5 words; a short piece that is not the first joins the one before.
# Word counts below are done by hand, words numbered from 0.


def test_released_is_the_default():
    assert DEFAULT_SEGMENTATION == "released"
    t = "The large red circle sits, near the small blue square today."
    assert [s.text for s in split_segments(t)] == texts(t, "released")


def test_released_cuts_after_a_comma_with_five_words_before_and_six_after():
    # The(0) large(1) red(2) circle(3) sits,(4) | near(5) the small blue square today.(10): n = 11,
    # j = 5: "sits," ends in ",", n - j = 6 > 5, the piece 0..4 has 5 words -> cut
    t = "The large red circle sits, near the small blue square today."
    segs = split_segments(t, "released")
    assert [s.text for s in segs] == ["The large red circle sits,", "near the small blue square today."]
    # offsets by hand: "The large red circle sits," = 3+1+5+1+3+1+6+1+5 = 26 characters; a space; the rest 33
    assert [(s.index, s.start, s.end) for s in segs] == [(0, 0, 26), (1, 27, 60)]
    assert len(t) == 60
    _check_offsets(t, "released")


def test_released_needs_more_than_five_words_after_the_cut():
    # n = 10, j = 5: n - j = 5 words remain, not more than 5 -> no cut (the release's
    # `tok_id + MIN_SUBSENT_WORDS < len(tokens)`)
    assert texts("The large red circle sits, near the small blue square.", "released") == [
        "The large red circle sits, near the small blue square."]


def test_released_first_piece_needs_five_words():
    # A red circle,(2) | a blue square and a star.: j = 3, 6 words remain but the first piece has 3 -> no cut
    assert texts("A red circle, a blue square and a big star.", "released") == [
        "A red circle, a blue square and a big star."]
    # the world's caption head: There are two objects: a red circle,(6) | a blue square and a star. (n = 13):
    # j = 7: 6 words remain, 7 before -> cut; the colon is no cut point
    assert texts("There are two objects: a red circle, a blue square and a star.", "released") == [
        "There are two objects: a red circle,", "a blue square and a star."]


def test_released_short_later_piece_joins_the_piece_before():
    # The red circle is large,(4) the star,(6) it is above the blue square now.(13): n = 14.
    # j = 5: 9 remain, 5 before -> cut (starts 0, 5). j = 7: 7 remain, piece 5..6 has 2 words and
    # starts after 0 -> the start 5 moves to 7: "the star," joins the first piece.
    t = "The red circle is large, the star, it is above the blue square now."
    assert released_subsentence_starts(t.split()) == [0, 7]
    assert texts(t, "released") == ["The red circle is large, the star,", "it is above the blue square now."]
    _check_offsets(t, "released")


def test_released_never_cuts_at_colon_and_but_or_full_stop_inside_a_sentence():
    # no word ends in , ; ! ? -> one segment, however long
    assert texts("There are exactly three objects in this image: a red circle and a blue square and a star.",
                 "released") == ["There are exactly three objects in this image: a red circle and a blue square and a star."]
    assert texts("The red circle is above the blue square but the green star is left of it.", "released") == [
        "The red circle is above the blue square but the green star is left of it."]
    assert texts("It is 3.5 units wide.", "released") == ["It is 3.5 units wide."]


def test_released_semicolon_cuts_inside_a_sentence():
    # the sentencizer does not end sentences at ";": The red circle is very large;(5) | the blue square
    # is small and round. (n = 13): j = 6, 7 remain, 6 before -> cut
    assert texts("The red circle is very large; the blue square is small and round.", "released") == [
        "The red circle is very large;", "the blue square is small and round."]


def test_released_word_rule_on_word_lists():
    w = ["a", "b", "c", "d", "e,", "f", "g", "h", "i", "j", "k"]                 # n = 11, comma after word 4
    assert released_subsentence_starts(w) == [0, 5]      # 5 before, 6 after
    assert released_subsentence_starts(w[:-1]) == [0]    # 5 after: not enough
    assert released_subsentence_starts(["a", "b", "c", "d,", "e", "f", "g", "h", "i", "j"]) == [0]  # 4 before, first piece
    assert released_subsentence_starts(["a", "b", "c", "d", "e!", "f", "g", "h", "i", "j", "k"]) == [0, 5]
    assert released_subsentence_starts(["a", "b", "c", "d", "e:", "f", "g", "h", "i", "j", "k"]) == [0]
    assert released_subsentence_starts([]) == []
    assert released_subsentence_starts(["one"]) == [0]


def test_released_sentence_boundaries_and_offsets():
    t = "There is a star. It is red!  Is it big?"
    segs = split_segments(t, "released")
    assert [(s.start, s.end, s.text) for s in segs] == [(0, 16, "There is a star."), (17, 27, "It is red!"),
                                                        (29, 39, "Is it big?")]
    _check_offsets(t, "released")
    # punctuation-only words stay where spaCy's sentence puts them; every character is covered
    _check_offsets("Hi. . A star", "released")
    _check_offsets("  leading blank. and trailing  ", "released")
    assert split_segments("  \n ", "released") == []


def test_released_reference_captions_tile():
    for seed in range(30):
        rng = random.Random(seed)
        scene = W.sample_scene(rng, n_objects=rng.randint(1, 4))
        _check_offsets(W.detailed_caption(scene), "released")
        _check_offsets(W.short_caption(scene), "released")


def test_released_with_a_spacy_pipeline_folder(tmp_path):
    """``released:<folder>`` loads that pipeline: here a sentencizer that ends sentences only at
    ';', so the two full-stop sentences below become one (and, 8 words, no comma: one segment)."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer", config={"punct_chars": [";"]})
    nlp.to_disk(tmp_path / "semi")
    t = "There is a star. It is a red star."
    assert texts(t, "released") == ["There is a star.", "It is a red star."]
    assert texts(t, f"released:{tmp_path / 'semi'}") == [t]
    with pytest.raises(OSError, match="released:.*nowhere"):
        split_segments(t, f"released:{tmp_path / 'nowhere'}")


def test_segmentation_specs_and_agreement():
    assert check_segmentation("fine") == "fine" and check_segmentation("released:en_core_web_sm")
    for bad in ("coarse", "released:", "", None, "fine:x"):
        with pytest.raises(ValueError, match="segmentation must be one of"):
            check_segmentation(bad)
    with pytest.raises(ValueError, match="segmentation must be"):
        split_segments("a b", "sentence")
    assert recorded_segmentation({"segmentation": "released"}) == "released"
    assert recorded_segmentation({}) == "fine"   # written before the key existed
    assert recorded_segmentation(None) == "fine"
    check_same_segmentation("released", "released", "x")
    with pytest.raises(ValueError, match=r"rm used segmentation 'fine' but this run uses 'released'"):
        check_same_segmentation("released", "fine", "rm")
    with pytest.warns(UserWarning, match="used segmentation 'fine'"):
        check_same_segmentation("released", "fine", "rm", strict=False)
    with pytest.warns(UserWarning, match="released:en_core_web_sm"):
        check_same_segmentation("released", "released:en_core_web_sm", "rm")
