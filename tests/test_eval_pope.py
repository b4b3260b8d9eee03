"""POPE split builders: random / popular / adversarial really sample what they claim."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mmalign.eval.pope import STRATEGIES, ObjectStats, build_pope, pick_negatives

# Hand-made annotations. Frequencies (images containing): dog 4, fork 5, knife 3, cup 1, cat 1.
# Co-occurrence with fork: knife 3, cup 1, dog 0, cat 0.
GT = {
    "1.jpg": {"fork", "knife"}, "2.jpg": {"fork", "knife"}, "3.jpg": {"fork", "knife"},
    "4.jpg": {"fork", "cup"}, "5.jpg": {"dog"}, "6.jpg": {"dog"}, "7.jpg": {"dog"}, "8.jpg": {"dog", "cat"},
    "q.jpg": {"fork"},
}


def by_image(qs, image, label):
    return [q.meta["target"] for q in qs if q.image == image and q.label is label]


def test_stats_by_hand():
    st = ObjectStats.from_images(GT.values())
    assert st.freq["fork"] == 5 and st.freq["dog"] == 4 and st.freq["knife"] == 3
    assert st.cooc[("fork", "knife")] == st.cooc[("knife", "fork")] == 3
    assert st.cooccurrence({"fork"}, "cup") == 1 and st.cooccurrence({"fork"}, "dog") == 0


def test_adversarial_picks_cooccurring_and_popular_picks_frequent():
    """For q.jpg (only a fork) with k=1: the adversarial negative is the object that co-occurs
    with forks most (knife, 3 images), the popular one the most frequent absent object (dog, 4)."""
    adv = build_pope(GT, "adversarial", per_image=1)
    pop = build_pope(GT, "popular", per_image=1)
    assert by_image(adv, "q.jpg", False) == ["knife"]
    assert by_image(pop, "q.jpg", False) == ["dog"]
    # 5.jpg (a dog, which co-occurs only with a cat): adversarial says cat, popular says fork.
    assert by_image(adv, "5.jpg", False) == ["cat"]
    assert by_image(pop, "5.jpg", False) == ["fork"]


def test_random_is_uniform_over_absent_objects():
    """q.jpg has 4 absent objects; over 400 seeds each should be drawn about 100 times."""
    counts = Counter(by_image(build_pope(GT, "random", per_image=1, seed=s), "q.jpg", False)[0] for s in range(400))
    assert set(counts) == {"knife", "cup", "dog", "cat"}
    assert all(60 < c < 140 for c in counts.values()), counts


def test_splits_share_positives_and_are_balanced():
    splits = {s: build_pope(GT, s, per_image=3) for s in STRATEGIES}
    pos = {s: sorted((q.image, q.text) for q in qs if q.label) for s, qs in splits.items()}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
    for qs in splits.values():
        assert sum(q.label for q in qs) * 2 == len(qs)
        for q in qs:
            assert (q.meta["target"] in GT[q.image]) is q.label  # labels are the truth
            assert q.text == f"Is there {'an' if q.meta['target'][0] in 'aeiou' else 'a'} {q.meta['target']} in the image?"
    # min(k, present, absent): 1.jpg has 2 objects -> 2 yes + 2 no.
    assert len([q for q in splits["random"] if q.image == "1.jpg"]) == 4


def test_no_question_when_nothing_is_absent():
    assert build_pope({"a": {"x", "y"}}, "random", vocabulary={"x", "y"}) == []


def test_stats_from_another_set_and_vocabulary():
    # Rank by training statistics in which "cat" is everywhere: popular then picks cat.
    train = ObjectStats.from_images([{"cat"}] * 10)
    qs = build_pope({"img": {"dog"}}, "popular", per_image=1, stats=train, vocabulary={"dog", "cat", "cow"})
    assert by_image(qs, "img", False) == ["cat"]


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown POPE split 'hard'"):
        build_pope(GT, "hard")


def test_ties_are_broken_by_seed_not_by_name():
    picks = {pick_negatives(["a", "b", "c", "d"], 1, random.Random(s), score=lambda x: 0)[0] for s in range(50)}
    assert picks == {"a", "b", "c", "d"}
    assert pick_negatives(["a", "b", "c"], 2, random.Random(0), score={"a": 1, "b": 3, "c": 2}.get) == ["b", "c"]
