"""Object mentions: CHAIR's COCO synonyms, plurals, longest match, whole words and the errors.

Every expectation below is worked out by hand from the rules in ``mmalign/eval/vocab.py``'s
docstring and CHAIR's ``synonyms.txt``; the derivation is in each test's docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.eval.vocab import (
    COCO_SYNONYMS,
    ObjectMention,
    ObjectVocabulary,
    VocabularyError,
)

FIXTURES = Path(__file__).parent / "fixtures" / "real"


@pytest.fixture(scope="module")
def coco() -> ObjectVocabulary:
    return ObjectVocabulary.coco()


def cats(vocab: ObjectVocabulary, text: str) -> list[str]:
    return [m.category for m in vocab.extract(text)]


def test_coco_table_has_the_80_category_names_of_instances_json(coco):
    """The keys are exactly the ``name`` fields of the 80 categories in ``instances_val2014.json``,
    in category-id order (the fixture carries the full published category list)."""
    inst = json.loads((FIXTURES / "coco" / "instances_val2014.json").read_text())
    names = [c["name"] for c in sorted(inst["categories"], key=lambda c: c["id"])]
    assert len(names) == 80
    assert list(COCO_SYNONYMS) == names
    assert coco.categories == tuple(names)
    assert coco.name == "coco"


def test_synonyms_and_plurals_with_offsets(coco):
    """"Two men and a woman on motorbikes": "men" (irregular plural of man, a person synonym) at
    4-7, "woman" at 14-19, "motorbikes" (-s plural of motorbike, a motorcycle synonym) at 23-33."""
    text = "Two men and a woman on motorbikes"
    assert coco.extract(text) == [
        ObjectMention("person", "men", 4, 7),
        ObjectMention("person", "woman", 14, 19),
        ObjectMention("motorcycle", "motorbikes", 23, 33),
    ]


def test_surface_is_the_text_as_written_and_matching_ignores_case(coco):
    """"A DOG and a Cat on the Sofa": dog, cat, couch (sofa is CHAIR's couch synonym); surfaces keep
    the original case and ``text[start:end] == surface`` for each."""
    text = "A DOG and a Cat on the Sofa"
    found = coco.extract(text)
    assert [(m.category, m.surface) for m in found] == [("dog", "DOG"), ("cat", "Cat"), ("couch", "Sofa")]
    assert all(text[m.start:m.end] == m.surface for m in found)


def test_longest_match_first(coco):
    """"hot dog" is one hot dog (no dog), "teddy bear" one teddy bear (no bear), "stove top oven"
    one oven (three words; CHAIR's two-word joining would count stove and oven); plurals and
    hyphens on multi-word forms still match; a full stop breaks a phrase ("hot. Dog" is a dog)."""
    assert cats(coco, "A hot dog next to a teddy bear.") == ["hot dog", "teddy bear"]
    assert cats(coco, "two hot dogs and three Teddy-Bears") == ["hot dog", "teddy bear"]
    assert cats(coco, "a stove top oven") == ["oven"]
    assert cats(coco, "It was hot. Dogs ran.") == ["dog"]
    assert cats(coco, "wine glasses on the dining tables") == ["wine glass", "dining table"]


def test_whole_words_only(coco):
    """No COCO form is a whole word of these, so nothing matches: "cathedral" holds "cat",
    "skiing" holds "ski", "bust" holds "bus", "dogma" holds "dog", "carpet" holds "car"."""
    assert coco.extract("The cathedral, skiing, a bust, dogma and a carpet.") == []


def test_irregular_and_unchanged_plurals():
    """Each plural maps to the singular named as its own category (``from_names``): mice/mouse,
    knives/knife, leaves/leaf, geese/goose, teeth/tooth, feet/foot, people/person,
    children/child, women/woman, oxen/ox; sheep, fish and skis are unchanged."""
    singulars = ["mouse", "knife", "leaf", "goose", "tooth", "foot", "person", "child", "woman", "ox",
                 "sheep", "fish", "skis"]
    vocab = ObjectVocabulary.from_names(singulars)
    text = "mice knives leaves geese teeth feet people children women oxen sheep fish skis"
    assert cats(vocab, text) == singulars


def test_regular_plural_rules(coco):
    """-es: buses -> bus, benches -> bench, sandwiches -> sandwich; -ies: puppies -> puppy (dog),
    ponies -> pony (horse); -ves: knives -> knife; "-men" compounds: policemen -> policeman
    (person); grandchildren -> grandchild (person)."""
    text = "buses, benches, sandwiches, puppies, ponies, knives, policemen, grandchildren"
    assert cats(coco, text) == ["bus", "bench", "sandwich", "dog", "horse", "knife", "person", "person"]


def test_exact_form_beats_a_depluralised_one():
    """With both "glass" and "glasses" (different categories), "glasses" is the exact form and
    wins; "glass" is its own."""
    vocab = ObjectVocabulary({"glass": [], "eyewear": ["glasses"]})
    assert cats(vocab, "a glass and glasses") == ["glass", "eyewear"]


def test_chair_baby_adult_animal_rule(coco):
    """CHAIR: "baby bird" is a bird, not a person ("baby" is a person synonym) plus a bird; so is
    "adult giraffe"; here also any animal form ("baby goats" -> sheep, goat being CHAIR's sheep
    synonym). "baby animals" and "adult cub" are no COCO object, and their "baby"/"adult" is not
    a person. A lone "baby" still is a person."""
    assert cats(coco, "a baby bird and an adult giraffe") == ["bird", "giraffe"]
    assert cats(coco, "two baby goats") == ["sheep"]
    assert cats(coco, "baby animals and an adult cub") == []
    assert cats(coco, "a baby in a crib") == ["person"]


def test_chair_passenger_and_train_track_rules(coco):
    """CHAIR: "passenger jet" is an airplane, not a person plus a jet; "passenger train" a train;
    "train tracks" are not a train. So "A passenger train on the train tracks" has one train and no
    person; "a passenger waits" is a person."""
    assert cats(coco, "A passenger jet lands") == ["airplane"]
    assert cats(coco, "A passenger train on the train tracks") == ["train"]
    assert cats(coco, "a passenger waits") == ["person"]


def test_chair_toilet_seat_rules(coco):
    """CHAIR: "toilet seat" is a toilet (not a toilet and a chair); when a text mentions a toilet,
    a separate "seat" is not a chair either ("the seat next to the toilet" -> toilet only); without
    a toilet "seat" is a chair. "bow tie" is one tie."""
    assert cats(coco, "a toilet seat") == ["toilet"]
    assert cats(coco, "the seat next to the toilet") == ["toilet"]
    assert cats(coco, "the seat next to the urinal") == ["toilet"]
    assert cats(coco, "a seat by the window") == ["chair"]
    assert cats(coco, "a man in a bow tie") == ["person", "tie"]


def test_reference_script_quirks_are_fixed_and_negation_is_ignored(coco):
    """The reference CHAIR never counts these (pattern's singularize: bus -> "bu", ties -> "ty";
    synonyms.txt's " motor bike" and " cheesecake" keep a leading space); here each is a mention.
    Negation is not read on COCO, as in the reference: "no dog" is a dog mention."""
    assert cats(coco, "Two buses and a bus.") == ["bus", "bus"]
    assert cats(coco, "Three ties.") == ["tie"]
    assert cats(coco, "A motor bike beside a cheesecake.") == ["motorcycle", "cake"]
    assert cats(coco, "There is no dog.") == ["dog"]


def test_possessive_and_hyphen(coco):
    """An apostrophe ends a word ("man's" holds "man"); "hot-dog" is the hot dog form with a
    hyphen between its words."""
    assert cats(coco, "the man's hot-dog") == ["person", "hot dog"]


def test_normalize(coco):
    """The whole string must be one form: "Dining Tables" -> dining table (table plural, case
    ignored); "people" -> person; "TV" -> tv; "baby bird" -> bird (a CHAIR phrase); "hot" is no
    form, "dining table chair" is two forms, "" has no words, "train track" is a no-object phrase:
    all None."""
    assert coco.normalize("Dining Tables") == "dining table"
    assert coco.normalize("people") == "person"
    assert coco.normalize("TV") == "tv"
    assert coco.normalize("baby bird") == "bird"
    for name in ("hot", "dining table chair", "", "train track"):
        assert coco.normalize(name) is None


def test_canonical_name_is_always_a_form():
    """``{"couch": ["sofa"]}``: both "couch" and "sofa" are couch; forms() lists the name first."""
    vocab = ObjectVocabulary({"couch": ["sofa"]}, name="furniture")
    assert cats(vocab, "a couch and a sofa") == ["couch", "couch"]
    assert vocab.forms("couch") == ("couch", "sofa")
    assert vocab.name == "furniture"


def test_from_names_amber_words():
    """AMBER's truth list for image 2 repeats "ship": one category. "ships" is its plural, "sky"
    and "bridge" are whole words; "skyline" is not "sky"."""
    vocab = ObjectVocabulary.from_names(["sky", "man", "ship", "ship", "bridge"], name="amber")
    assert vocab.categories == ("sky", "man", "ship", "bridge")
    assert cats(vocab, "Two ships under a bridge; the skyline") == ["ship", "bridge"]


def test_ambiguous_form_is_an_error_naming_both_categories():
    """"pup" is given for dog and for seal: the error names both. Forms compare case-insensitively,
    so categories "Dog" and "dog" collide too; so does a phrase claiming another category's form."""
    with pytest.raises(VocabularyError, match=r"'pup' is a form of category 'dog' and of category 'seal'"):
        ObjectVocabulary({"dog": ["pup"], "seal": ["pup"]})
    with pytest.raises(VocabularyError, match=r"'dog' is a form of category 'Dog' and of category 'dog'"):
        ObjectVocabulary({"Dog": [], "dog": []})
    with pytest.raises(VocabularyError, match=r"'baby' is a form of category 'person' and of no object"):
        ObjectVocabulary({"person": ["baby"]}, phrases={"baby": None})


def test_bad_tables_are_errors():
    """A bare string as the forms ("sofa" would read as letters), a form with punctuation, an
    empty form, and phrase/drop rules naming unknown categories or forms are all refused."""
    with pytest.raises(VocabularyError, match="forms must be a list"):
        ObjectVocabulary({"couch": "sofa"})
    with pytest.raises(VocabularyError, match="only letters, digits, spaces and hyphens"):
        ObjectVocabulary({"tv": ["t.v."]})
    with pytest.raises(VocabularyError, match="has no words"):
        ObjectVocabulary({"tv": [" "]})
    with pytest.raises(VocabularyError, match="unknown category 'cat'"):
        ObjectVocabulary({"dog": []}, phrases={"baby cat": "cat"})
    with pytest.raises(VocabularyError, match="'seat' is not a form"):
        ObjectVocabulary({"toilet": []}, drop_if_present={"toilet": ["seat"]})


def test_from_json(tmp_path):
    """A valid file loads (named after its stem); each bad file's error starts with its path:
    malformed JSON (with the line), a top level that is not an object, a value that is not a list
    of strings, an ambiguous table, a missing file."""
    good = tmp_path / "animals.json"
    good.write_text(json.dumps({"dog": ["puppy"], "cat": ["kitten"]}))
    vocab = ObjectVocabulary.from_json(good)
    assert vocab.name == "animals"
    assert cats(vocab, "Kittens and a puppy") == ["cat", "dog"]

    cases = {
        "malformed.json": ('{"dog": ["puppy"],\n "cat": [kitten]}', ":2: malformed JSON"),
        "list.json": ('["dog", "cat"]', ": the top level must be an object"),
        "value.json": ('{"dog": "puppy"}', ": category 'dog': synonyms must be a list of strings"),
        "ambiguous.json": ('{"dog": ["pup"], "seal": ["pup"]}', "category 'dog' and of category 'seal'"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_text(content)
        with pytest.raises(VocabularyError) as err:
            ObjectVocabulary.from_json(p)
        assert str(err.value).startswith(str(p)), str(err.value)
        assert message in str(err.value)
    with pytest.raises(VocabularyError, match="cannot read"):
        ObjectVocabulary.from_json(tmp_path / "missing.json")


def test_extract_refuses_non_text(coco):
    with pytest.raises(TypeError):
        coco.extract(None)  # type: ignore[arg-type]
