"""Sub-sentence segmentation (FGAIF's unit of feedback) and the segment -> last-token mapping.

Every expectation below is worked out by hand from the rule in ``mmalign/segments.py``: sentences
end after ``. ! ? ;`` runs (not a decimal point) and at line breaks; inside a sentence a
segment ends after ":", after "," when the next word (past an "and"/"but") starts a new unit
and the piece before has two or more words, and before a bare "and"/"but" followed by such a
word. Segments keep their punctuation; connectives open the next segment.
"""

from __future__ import annotations

import random

import pytest

from mmalign import world as W
from mmalign.segments import Segment, char_to_token_end, split_segments


def texts(t: str) -> list[str]:
    return [s.text for s in split_segments(t)]


def _check_offsets(t: str) -> None:
    """text == t[start:end], stripped, in order, indices 0..n-1, and every non-blank character
    of ``t`` lies in exactly one segment (the segments tile the text)."""
    segs = split_segments(t)
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
    segs = split_segments(t)
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
        assert len(split_segments(cap)) == 1 + len(scene.objects) + len(W.caption_relations(scene))


def test_char_to_token_end_with_hand_made_offsets():
    # "a red circle, and a star." ; byte-level BPE style: leading spaces inside tokens,
    # a BOS special token with an empty span (0, 0)
    text = "a red circle, and a star."
    offsets = [(0, 0), (0, 1), (1, 5), (5, 12), (12, 13), (13, 17), (17, 19), (19, 24), (24, 25)]
    assert [text[a:b] for a, b in offsets[1:]] == ["a", " red", " circle", ",", " and", " a", " star", "."]
    s0, s1 = split_segments(text)
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
