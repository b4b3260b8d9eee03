"""Readers of the published POPE, COCO-instances and AMBER files, on fixtures in their exact layouts.

The fixtures under ``tests/fixtures/real/`` copy entries of the real files: the first 8 lines of
POPE's ``output/coco/coco_pope_random.json``; the full COCO 2014 category list with 4 val2014
images and hand-written annotations consistent with those POPE lines; 12 queries of AMBER's
``query_all.json`` with their ``annotations.json`` entries (generative ids 1-2, attribute,
existence and relation questions), part of ``relation.json`` and all of ``safe_words.txt``.
Malformed copies are written to ``tmp_path``; every error must name the file and the line or
entry. Expected values are read off the fixture files by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmalign.eval.formats import (
    AmberAnnotation,
    AmberQuery,
    FormatError,
    PopeQuestion,
    read_amber_annotations,
    read_amber_queries,
    read_amber_relation,
    read_amber_safe_words,
    read_coco_instances,
    read_pope_questions,
)
from mmalign.records import RecordError

FIXTURES = Path(__file__).parent / "fixtures" / "real"
IMAGES = FIXTURES / "images"
POPE = FIXTURES / "pope" / "coco_pope_random.json"
COCO = FIXTURES / "coco" / "instances_val2014.json"
AMBER_Q = FIXTURES / "amber" / "query_all.json"
AMBER_A = FIXTURES / "amber" / "annotations.json"


def raises_at(prefix: str, message: str):
    """pytest.raises for a FormatError whose message starts with ``prefix`` and contains ``message``."""
    return pytest.raises(FormatError, match="^" + re.escape(prefix) + ".*" + re.escape(message))


# --------------------------------------------------------------------------------------------
# POPE


def test_pope_fixture():
    """8 lines: ids 0-7; lines 1-6 ask about COCO_val2014_000000548882.jpg (dining table, sandwich,
    bottle: yes; tv, orange, zebra: no), lines 7-8 about ...008211.jpg (motorcycle, chair: yes).
    ``image_id`` is not a modelled field, so it is kept in meta; every image exists."""
    qs = read_pope_questions(POPE, image_root=IMAGES)
    assert [q.question_id for q in qs] == list(range(8))
    assert [q.label for q in qs] == [True, True, True, False, False, False, True, True]
    assert qs[0] == PopeQuestion(0, "COCO_val2014_000000548882.jpg", "Is there a dining table in the image?",
                                 True, {"image_id": 548882})
    assert qs[6].image == "COCO_val2014_000000008211.jpg"
    assert qs[6].text == "Is there a motorcycle in the image?"


def test_pope_blank_lines_and_label_case(tmp_path):
    """Blank lines are skipped but still counted: the bad label on physical line 3 is reported as
    line 3. "YES"/" No " are yes/no in any case; "maybe" is not."""
    p = tmp_path / "q.json"
    p.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "YES"}\n'
                 "\n"
                 '{"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": " No "}\n')
    assert [q.label for q in read_pope_questions(p)] == [True, False]
    p.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n'
                 "\n"
                 '{"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with raises_at(f"{p}:3:", "'label' must be \"yes\" or \"no\", got 'maybe'"):
        read_pope_questions(p)


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 1, "image": "a.jpg", "text": "Is there', "malformed JSON"),
    ('["not", "an", "object"]', "a question must be a JSON object, got list"),
    ('{"image": "a.jpg", "text": "t", "label": "yes"}', "missing field 'question_id'"),
    ('{"question_id": 1.5, "image": "a.jpg", "text": "t", "label": "yes"}', "'question_id' must be an integer"),
    ('{"question_id": true, "image": "a.jpg", "text": "t", "label": "yes"}', "'question_id' must be an integer"),
    ('{"question_id": 1, "text": "t", "label": "yes"}', "missing field 'image'"),
    ('{"question_id": 1, "image": 7, "text": "t", "label": "yes"}', "'image' must be a string, got int"),
    ('{"question_id": 1, "image": "a.jpg", "text": "", "label": "yes"}', "'text' is empty"),
    ('{"question_id": 1, "image": "a.jpg", "text": "t"}', "missing field 'label'"),
    ('{"question_id": 1, "image": "a.jpg", "text": "t", "label": true}', "'label' must be \"yes\" or \"no\""),
])
def test_pope_bad_line_names_file_and_line(tmp_path, line, message):
    """A good line 1, then the bad line: the error is ``<file>:2: <what is wrong>``."""
    p = tmp_path / "coco_pope_random.json"
    p.write_text('{"question_id": 0, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}\n' + line + "\n")
    with raises_at(f"{p}:2:", message):
        read_pope_questions(p)


def test_pope_duplicate_id_missing_image_empty_and_missing_file(tmp_path):
    """Line 2 repeats question_id 0 of line 1; with ``image_root`` an image that is not there is
    an error on its line; a file of blank lines has no questions; a missing file is named."""
    p = tmp_path / "q.json"
    p.write_text('{"question_id": 0, "image": "a.jpg", "text": "t", "label": "no"}\n'
                 '{"question_id": 0, "image": "a.jpg", "text": "t", "label": "no"}\n')
    with raises_at(f"{p}:2:", "duplicate question_id 0 (first at line 1)"):
        read_pope_questions(p)
    p.write_text('{"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "text": "t", "label": "no"}\n'
                 '{"question_id": 1, "image": "nowhere.jpg", "text": "t", "label": "no"}\n')
    with raises_at(f"{p}:2:", "image 'nowhere.jpg' not found under"):
        read_pope_questions(p, image_root=IMAGES)
    p.write_text('{"question_id": 0, "image": "../../etc/passwd", "text": "t", "label": "no"}\n')
    with raises_at(f"{p}:1:", "escapes the data root"):
        read_pope_questions(p, image_root=IMAGES)
    p.write_text("\n\n")
    with raises_at(str(p), "no questions"):
        read_pope_questions(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_pope_questions(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------
# COCO


def test_coco_fixture():
    """4 images. Annotations: 548882 -> dining table, sandwich (twice), bottle; 8211 ->
    motorcycle, chair, bicycle, person; 180261 -> bench, surfboard, person (a crowd annotation,
    kept as CHAIR keeps it); 393254 has none (empty set, image still listed). 80 categories,
    id 1 person ... id 90 toothbrush (ids 12, 26, ... unused, as published)."""
    coco = read_coco_instances(COCO, image_root=IMAGES)
    assert sorted(coco.images) == [8211, 180261, 393254, 548882]
    assert coco.images[548882].categories == {"dining table", "sandwich", "bottle"}
    assert coco.images[8211].categories == {"motorcycle", "chair", "bicycle", "person"}
    assert coco.images[180261].categories == {"bench", "surfboard", "person"}
    assert coco.images[393254].categories == frozenset()
    assert coco.images[8211].file_name == "COCO_val2014_000000008211.jpg"
    assert len(coco.categories) == 80
    assert (coco.categories[1], coco.categories[67], coco.categories[90]) == ("person", "dining table", "toothbrush")
    assert 12 not in coco.categories
    assert coco.by_file_name("COCO_val2014_000000180261.jpg").image_id == 180261
    assert coco.by_file_name("COCO_val2014_000000000001.jpg") is None


def test_pope_labels_agree_with_coco_ground_truth():
    """POPE's "yes" means the asked object is annotated in the image: for every fixture question,
    the object in "Is there a/an <object> in the image?" is in the COCO image's categories exactly
    when the label is yes (dining table, sandwich, bottle yes; tv, orange, zebra no; ...)."""
    coco = read_coco_instances(COCO)
    for q in read_pope_questions(POPE):
        obj = re.fullmatch(r"Is there an? (.+) in the image\?", q.text).group(1)
        assert (obj in coco.by_file_name(q.image).categories) == q.label, q


def _coco_copy(tmp_path: Path, edit) -> Path:
    obj = json.loads(COCO.read_text())
    edit(obj)
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(obj))
    return p


@pytest.mark.parametrize("edit, where, message", [
    (lambda o: o["annotations"].append({"image_id": 8211, "category_id": 99, "id": 1}),
     "annotations[11]", "unknown category_id 99"),
    (lambda o: o["annotations"].append({"image_id": 5, "category_id": 1, "id": 1}),
     "annotations[11]", "unknown image_id 5"),
    (lambda o: o["annotations"][3].pop("category_id"), "annotations[3]", "missing field 'category_id'"),
    (lambda o: o["annotations"][0].update(image_id="548882"), "annotations[0]", "'image_id' must be an integer"),
    (lambda o: o["images"].append(dict(o["images"][0], file_name="x.jpg")), "images[4]", "duplicate image id 548882"),
    (lambda o: o["images"].append(dict(o["images"][0], id=1)), "images[4]", "duplicate image file_name"),
    (lambda o: o["images"][2].pop("file_name"), "images[2]", "missing field 'file_name'"),
    (lambda o: o["categories"].append({"id": 1, "name": "human"}), "categories[80]", "duplicate category id 1"),
    (lambda o: o["categories"].append({"id": 91, "name": "person"}), "categories[80]",
     "duplicate category name 'person' (also category id 1)"),
    (lambda o: o.pop("categories"), "missing top-level key 'categories'", ""),
    (lambda o: o.update(annotations={}), "'annotations'", "must be a JSON list"),
])
def test_coco_bad_entry_names_file_and_entry(tmp_path, edit, where, message):
    """One edit of the fixture per case: the error is ``<file>: <entry>: <what is wrong>``. The
    fixture has 11 annotations, 4 images and 80 categories, so an appended one is [11], [4], [80]."""
    p = _coco_copy(tmp_path, edit)
    with raises_at(f"{p}: {where}", message):
        read_coco_instances(p)


def test_coco_malformed_json_missing_image_and_top_level(tmp_path):
    """Malformed JSON gives ``file:line:``; with ``image_root`` a missing file is named with its
    entry and id; a top level that is a list is refused."""
    p = tmp_path / "instances.json"
    p.write_text('{"images": [],\n "annotations": [,]}')
    with raises_at(f"{p}:2:", "malformed JSON"):
        read_coco_instances(p)
    p = _coco_copy(tmp_path, lambda o: o["images"][1].update(file_name="gone.jpg"))
    with raises_at(f"{p}: images[1] id=8211:", "image 'gone.jpg' not found"):
        read_coco_instances(p, image_root=IMAGES)
    p.write_text("[]")
    with raises_at(f"{p}:", "the top level must be an object"):
        read_coco_instances(p)


# --------------------------------------------------------------------------------------------
# AMBER


def test_amber_queries_fixture():
    """12 queries in file order: ids 1-2 "Describe this image." (generative), then yes/no ones;
    every named image exists."""
    qs = read_amber_queries(AMBER_Q, image_root=IMAGES)
    assert [q.id for q in qs] == [1, 2, 1005, 1006, 1013, 1014, 1017, 1018, 9418, 9419, 15193, 15194]
    assert qs[0] == AmberQuery(1, "AMBER_1.jpg", "Describe this image.")
    assert qs[2].query == "Is the sky sunny in this image?"
    assert qs[-1] == AmberQuery(15194, "AMBER_987.jpg", "Is there direct contact between the sign and grass?")


def test_amber_annotations_fixture():
    """Generative id 2 keeps "ship" twice, as published; attribute ids carry their subtype;
    9418 (discriminative-hallucination) is existence; 15193 (discriminative-relation, yes) and
    15194 (published type "relation", no) are both the relation dimension; every query has an
    annotation."""
    anns = read_amber_annotations(AMBER_A)
    assert list(anns) == [q.id for q in read_amber_queries(AMBER_Q)]
    a1 = anns[1]
    assert a1 == AmberAnnotation(1, "generative", None, None,
                                 ("sky", "forest", "grass", "person", "lake", "mountain", "road"),
                                 ("cloud", "sun", "bird", "dog", "flower"), None)
    assert a1.generative
    assert anns[2].truth_objects.count("ship") == 2
    got = {i: (a.dimension, a.subtype, a.label) for i, a in anns.items() if not a.generative}
    assert got == {
        1005: ("attribute", "state", True), 1006: ("attribute", "state", False),
        1013: ("attribute", "number", True), 1014: ("attribute", "number", False),
        1017: ("attribute", "action", True), 1018: ("attribute", "action", False),
        9418: ("existence", None, False), 9419: ("existence", None, False),
        15193: ("relation", None, True), 15194: ("relation", None, False),
    }
    assert anns[15194].type == "relation"
    assert all(a.truth_objects == () and a.hallu_objects == () for a in anns.values() if not a.generative)


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


GEN = {"id": 1, "type": "generative", "truth": ["sky"], "hallu": ["sun"]}


@pytest.mark.parametrize("entries, where, message", [
    ([GEN, {"id": 2, "type": "discriminative-color", "truth": "yes"}], "[1] id=2", "unknown type"),
    ([GEN, {"id": 2, "type": "generative", "truth": ["sky"]}], "[1] id=2", "missing field 'hallu'"),
    ([GEN, {"id": 2, "type": "generative", "truth": "sky", "hallu": []}], "[1] id=2", "'truth' must be a list"),
    ([GEN, {"id": 2, "type": "generative", "truth": ["sky", 3], "hallu": []}], "[1] id=2", "'truth'[1]"),
    ([GEN, {"id": 2, "type": "discriminative-hallucination", "truth": "maybe"}], "[1] id=2",
     "'truth' must be \"yes\" or \"no\""),
    ([GEN, {"id": 2, "type": "relation"}], "[1] id=2", "missing field 'truth'"),
    ([GEN, dict(GEN)], "[1]", "duplicate id 1 (first at [0])"),
    ([GEN, {"type": "generative", "truth": [], "hallu": []}], "[1]", "missing field 'id'"),
    ([GEN, {"id": "2", "type": "relation", "truth": "no"}], "[1]", "'id' must be an integer"),
    ([GEN, "relation"], "[1]", "an entry must be an object"),
])
def test_amber_bad_annotation_names_file_and_entry(tmp_path, entries, where, message):
    """The error is ``<file>: [<position>] id=<id>: <what is wrong>`` (no id when it is the id
    that is wrong)."""
    p = _write(tmp_path, "annotations.json", entries)
    with raises_at(f"{p}: {where}", message):
        read_amber_annotations(p)


@pytest.mark.parametrize("entries, where, message", [
    ([{"id": 1, "image": "AMBER_1.jpg"}], "[0] id=1", "missing field 'query'"),
    ([{"id": 1, "image": "AMBER_1.jpg", "query": "q"}, {"id": 1, "image": "AMBER_2.jpg", "query": "q"}],
     "[1]", "duplicate id 1 (first at [0])"),
    ([{"id": 1, "image": ["AMBER_1.jpg"], "query": "q"}], "[0] id=1", "'image' must be a string"),
    ({"1": {"image": "AMBER_1.jpg", "query": "q"}}, "", "the top level must be a JSON list, got dict"),
    ([], "", "no entries in the file"),
])
def test_amber_bad_query_names_file_and_entry(tmp_path, entries, where, message):
    p = _write(tmp_path, "query_all.json", entries)
    with raises_at(f"{p}{': ' + where if where else ''}", message):
        read_amber_queries(p)


def test_amber_query_missing_image_and_extra_fields(tmp_path):
    """With ``image_root`` a missing image is an error on its entry; an extra field is kept in
    meta, not dropped."""
    p = _write(tmp_path, "q.json", [{"id": 7, "image": "AMBER_404.jpg", "query": "q"}])
    with raises_at(f"{p}: [0] id=7:", "image 'AMBER_404.jpg' not found"):
        read_amber_queries(p, image_root=IMAGES)
    p = _write(tmp_path, "q.json", [{"id": 7, "image": "AMBER_1.jpg", "query": "q", "source": "x"}])
    assert read_amber_queries(p)[0].meta == {"source": "x"}


def test_amber_relation_and_safe_words(tmp_path):
    """relation.json: "television" -> ("TV", "screen") as written, "sky" -> (); safe_words.txt: the
    9 published words in order. A relation value that is not a list is an error naming the file
    and the word."""
    rel = read_amber_relation(FIXTURES / "amber" / "relation.json")
    assert rel["television"] == ("TV", "screen")
    assert rel["sky"] == ()
    assert rel["forest"] == ("tree", "leave", "bush")
    assert read_amber_safe_words(FIXTURES / "amber" / "safe_words.txt") == (
        "orange", "snack", "line", "camera", "light", "shoe", "sign", "range", "individual")
    p = _write(tmp_path, "relation.json", {"car": "window"})
    with raises_at(f"{p}:", "'car' must be a list of object words"):
        read_amber_relation(p)


def test_format_errors_are_record_errors():
    """Callers that already catch the project's RecordError catch these too."""
    assert issubclass(FormatError, RecordError)
