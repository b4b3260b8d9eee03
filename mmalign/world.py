"""The synthetic scene world: ground truth, text grammar and a caption checker.

Why this exists: no model or data set can be downloaded here, so the default run trains tiny
vision-language models on scenes whose ground truth is known exactly. That makes hallucination
*measurable*: every object, attribute and spatial relation a model mentions can be checked
against the scene graph. This module is the single source of that truth, and it is pure
Python (no Pillow, no numpy, no I/O) so evaluation code can import it cheaply; rendering lives
in ``data_pipelines/scenes.py``.

The world
---------
* A :class:`Scene` holds 1-10 :class:`SceneObject` s (the data stage samples 1-4). Each has a
  ``shape`` (the object category), a ``color`` and a ``size`` (the attributes), and a centre
  ``(x, y)`` in ``[0, 1]`` image coordinates, ``y`` growing downwards as in image space.
* No two objects in a scene share a ``(color, shape)`` pair, so "the red circle" always names
  exactly one object. Size is therefore the one attribute that can be wrong about an object
  whose name is right.
* Relations are derived from positions, never stored: A is "left of" B when
  ``B.x - A.x >= RELATION_MARGIN`` (likewise "above" with ``y``). Pairs closer than the margin on
  an axis get no relation on that axis, so every emitted relation is visually unambiguous.
  :func:`sample_scene` goes further and never places two objects whose offset on an axis lies
  in the ambiguous band ``(ALIGN_EPS, RELATION_MARGIN)``: on each axis a pair is either clearly
  apart or clearly aligned, which also makes a "No" to a relation question visually true.

One grammar
-----------
The same templates write and read text: :func:`detailed_caption`, :func:`short_caption` and the
question generators write; :func:`parse_caption`, :func:`parse_yes_no` and :func:`parse_count`
read. :func:`check_caption` labels each parsed claim against a scene, and
:func:`aggregate_checks` sums many checks into the rates the evaluation reports.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# vocabulary

#: Object categories. Chosen to stay distinguishable when drawn ~11 px wide at 64x64: a square
#: and a diamond differ by 45 degrees, so rendering keeps rotation jitter well below that.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

#: Colour name -> nominal RGB. Hues are far apart so a few units of rendering jitter never make
#: a colour ambiguous (red/orange/yellow are the closest trio, 95+ units apart on green).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 20),
    "purple": (135, 55, 185),
    "orange": (245, 130, 20),
}

SIZES: tuple[str, ...] = ("small", "large")

#: Half-extent (radius of the circumscribed circle) of a rendered object, as a fraction of the
#: image side. 0.09 vs 0.16 -> about 12 px vs 20 px across at 64x64: clearly two sizes.
SIZE_EXTENT: dict[str, float] = {"small": 0.09, "large": 0.16}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
#: Which coordinate a relation is about.
RELATION_AXIS: dict[str, str] = {"left of": "x", "right of": "x", "above": "y", "below": "y"}

#: A relation holds only when the centres differ by at least this much on its axis
#: (0.10 of the image side = 6.4 px at 64x64).
RELATION_MARGIN = 0.10
#: Centres closer than this on an axis count as aligned on it (same column / same row).
ALIGN_EPS = 0.025
#: Minimum empty space between two objects' circumscribed circles when sampling.
MIN_GAP = 0.03
#: Objects keep at least this far from the image border (beyond their extent).
BORDER = 0.02

MAX_OBJECTS = 10

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

TASKS: tuple[str, ...] = (
    "detailed_caption",
    "short_caption",
    "yesno_existence",
    "yesno_attribute",
    "yesno_relation",
    "count",
    "lookup_color",
    "lookup_size",
    "lookup_relation",
)
#: Content questions ("What color is the star?"): answered by reading the image, checked in code.
#: The judge asks these to verify claims (TIFA-style); see :func:`lookup_color_question`.
LOOKUP_TASKS: tuple[str, ...] = ("lookup_color", "lookup_size", "lookup_relation")
YESNO_TASKS: tuple[str, ...] = ("yesno_existence", "yesno_attribute", "yesno_relation")

#: Prompt paraphrases. Several per task so a model must read the prompt, not just the image.
DETAILED_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Give a detailed description of the image.",
    "Describe every object in the image and where it is.",
    "What is in this image? Describe it in detail.",
)
SHORT_PROMPTS: tuple[str, ...] = (
    "Give a short caption for the image.",
    "Briefly describe the image.",
    "Write a short caption.",
    "What objects are in the image? Answer briefly.",
)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows ("an orange star")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def number_word(n: int) -> str:
    """Lower-case English number word for 0-10 (the grammar never needs more)."""
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"number_word supports 0-{len(NUMBER_WORDS) - 1}, got {n}")
    return NUMBER_WORDS[n]


# ---------------------------------------------------------------------------------------------
# scene graph


@dataclass(frozen=True)
class SceneObject:
    """One object: category (``shape``), attributes (``color``, ``size``) and centre.

    ``x`` and ``y`` are the centre in ``[0, 1]`` image coordinates (``y`` down).
    """

    shape: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        for name, v in (("x", self.x), ("y", self.y)):
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"object {self.color} {self.shape}: {name}={v!r} must be a number in [0, 1]")

    def name(self, with_size: bool = False) -> str:
        """'red circle' (unique in its scene) or, with ``with_size``, 'small red circle'."""
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[object]`` (indices into ``Scene.objects``)."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Scene:
    """A scene graph: the objects of one image. Relations are derived, see :meth:`relations`."""

    objects: tuple[SceneObject, ...]
    scene_id: str = ""

    def __post_init__(self) -> None:
        objs = tuple(self.objects)
        object.__setattr__(self, "objects", objs)
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"scene {self.scene_id!r}: needs 1-{MAX_OBJECTS} objects, got {len(objs)}")
        seen: set[tuple[str, str]] = set()
        for o in objs:
            if not isinstance(o, SceneObject):
                raise TypeError(f"scene {self.scene_id!r}: objects must be SceneObject, got {type(o).__name__}")
            key = (o.color, o.shape)
            if key in seen:
                raise ValueError(
                    f"scene {self.scene_id!r}: two objects are both '{o.color} {o.shape}'; "
                    "(color, shape) must be unique so every object has an unambiguous name"
                )
            seen.add(key)

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"scene_id": self.scene_id, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scene":
        """Inverse of :meth:`to_dict`; extra keys (``image``, ``graph_hash``, ...) are ignored."""
        if "objects" not in d:
            raise ValueError(f"scene dict has no 'objects' (keys: {sorted(d)})")
        objs = []
        for i, o in enumerate(d["objects"]):
            try:
                objs.append(SceneObject(shape=o["shape"], color=o["color"], size=o["size"], x=o["x"], y=o["y"]))
            except KeyError as e:
                raise ValueError(f"scene {d.get('scene_id')!r}: object {i} lacks field {e}") from None
        return cls(objects=tuple(objs), scene_id=str(d.get("scene_id", "")))

    # -- derived facts ----------------------------------------------------------------------

    def find(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> list[int]:
        """Indices of objects matching every attribute that is given."""
        return [
            i for i, o in enumerate(self.objects)
            if (color is None or o.color == color) and (shape is None or o.shape == shape)
            and (size is None or o.size == size)
        ]

    def relation_truth(self, i: int, relation: str, j: int) -> bool | None:
        """Is ``objects[i] relation objects[j]`` true (True), clearly false (False) or unclear (None)?

        Clearly false means the opposite relation holds or the two are aligned on that axis
        (offset <= ``ALIGN_EPS``); an offset inside the ambiguous band is None. Sampled scenes
        never contain the band, so for them the answer is always True or False.
        """
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        a, b = self.objects[i], self.objects[j]
        d = (b.x - a.x) if RELATION_AXIS[relation] == "x" else (b.y - a.y)
        if relation in ("right of", "below"):
            d = -d
        if d >= RELATION_MARGIN:
            return True
        if d <= ALIGN_EPS:  # aligned, or the opposite holds (d negative)
            return False
        return None

    def relations(self) -> tuple[Relation, ...]:
        """Every relation that clearly holds, over ordered pairs, in (subject, object, RELATIONS) order."""
        out = []
        for i in range(len(self.objects)):
            for j in range(len(self.objects)):
                if i == j:
                    continue
                for rel in RELATIONS:
                    if self.relation_truth(i, rel, j):
                        out.append(Relation(i, rel, j))
        return tuple(out)

    def reading_order(self) -> list[int]:
        """Object indices in caption order: columns left to right, top to bottom in a column.

        Objects whose x differ by <= ``ALIGN_EPS`` from their left neighbour share a column.
        Why not plain left-to-right: two vertically stacked objects have (almost) the same x, so
        their order would be invisible in the image and a captioner could not learn it.
        """
        by_x = sorted(range(len(self.objects)), key=lambda i: (self.objects[i].x, self.objects[i].y))
        column: dict[int, int] = {}
        col, prev_x = 0, None
        for i in by_x:
            x = self.objects[i].x
            if prev_x is not None and x - prev_x > ALIGN_EPS:
                col += 1
            column[i] = col
            prev_x = x
        return sorted(by_x, key=lambda i: (column[i], self.objects[i].y, self.objects[i].x))

    def canonical(self) -> dict[str, Any]:
        """Position-free description: the objects and the relations among them, sorted."""
        names = [o.name() for o in self.objects]
        return {
            "objects": sorted(o.name(with_size=True) for o in self.objects),
            "relations": sorted([names[r.subject], r.relation, names[r.object]] for r in self.relations()),
        }

    def graph_hash(self) -> str:
        """sha256 of :meth:`canonical`. Equal for scenes with the same objects and relations,
        whatever the exact positions; data splits are kept disjoint by this hash."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# sampling


@dataclass(frozen=True)
class WorldPrior:
    """Which objects appear together, and in which colours: the world's co-occurrence structure.

    Why: real VLMs hallucinate the objects that usually co-occur with what they see (a fork
    beside a plate) and the colours objects usually have, which is what POPE's popular and
    adversarial splits probe. A world whose shapes and colours are drawn uniformly has no such
    prior, so its adversarial split equals its random one and a model that does not see has
    nothing plausible to guess. Here, as with COCO's categories:

    * every scene has a *context* (``contexts``: two groups of three shapes) and each object's
      shape comes from it with probability ``in_context``, weighted by ``shape_weights`` (so some
      shapes are more frequent overall: the popular split), else from another context;
    * each shape has a ``typical_color`` it takes with probability ``typical_color_p``, else a
      colour drawn uniformly from the other five.

    Identity stays ``(color, shape)``, unique in a scene, and every hallucination type stays
    measurable. ``sample_scene(..., prior=None)`` draws uniformly (the earlier world).
    """

    contexts: tuple[tuple[str, ...], ...] = (("circle", "square", "triangle"), ("star", "cross", "diamond"))
    shape_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    in_context: float = 0.85
    typical_color: tuple[tuple[str, str], ...] = (
        ("circle", "red"), ("square", "blue"), ("triangle", "green"),
        ("star", "yellow"), ("cross", "purple"), ("diamond", "orange"),
    )
    typical_color_p: float = 0.5

    def __post_init__(self) -> None:
        flat = [s for c in self.contexts for s in c]
        if sorted(flat) != sorted(SHAPES):
            raise ValueError(f"contexts must partition the shapes {SHAPES}, got {self.contexts}")
        if any(len(c) != len(self.shape_weights) for c in self.contexts):
            raise ValueError("every context needs one weight per shape (shape_weights)")
        if sorted(s for s, _ in self.typical_color) != sorted(SHAPES):
            raise ValueError("typical_color needs one entry per shape")

    def draw_pairs(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        """``n`` distinct (color, shape) pairs for one scene."""
        context = rng.randrange(len(self.contexts))
        typical = dict(self.typical_color)
        pairs: list[tuple[str, str]] = []
        while len(pairs) < n:
            if rng.random() < self.in_context or len(self.contexts) == 1:
                group = self.contexts[context]
            else:
                group = self.contexts[rng.choice([c for c in range(len(self.contexts)) if c != context])]
            shape = rng.choices(group, weights=self.shape_weights)[0]
            if rng.random() < self.typical_color_p:
                color = typical[shape]
            else:
                color = rng.choice([c for c in COLORS if c != typical[shape]])
            if (color, shape) not in pairs:
                pairs.append((color, shape))
        return pairs


#: The default world's prior (the data stage and the vision pretraining stage sample with it).
DEFAULT_PRIOR = WorldPrior()


def _axis_ok(d: float) -> bool:
    """An axis offset is acceptable when clearly aligned or clearly apart (not in the band)."""
    d = abs(d)
    return d <= ALIGN_EPS or d >= RELATION_MARGIN


def sample_scene(
    rng: random.Random,
    scene_id: str = "",
    n_objects: int | None = None,
    min_objects: int = 1,
    max_objects: int = 4,
    max_restarts: int = 200,
    prior: WorldPrior | None = DEFAULT_PRIOR,
) -> Scene:
    """Draw a random scene: distinct (color, shape) pairs, random sizes, non-overlapping
    positions, and no pair offset inside the ambiguous relation band on either axis.

    Which objects: ``prior`` (:class:`WorldPrior`, co-occurring shapes and typical colours), or
    uniformly over every (color, shape) pair when ``prior`` is None.
    Positions are rounded to 4 decimals *before* the checks, so what is stored is exactly what
    was checked. Objects are returned in :meth:`Scene.reading_order`.
    """
    if n_objects is None:
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
        n_objects = rng.randint(min_objects, max_objects)
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    if prior is None:
        pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_objects)
    else:
        pairs = prior.draw_pairs(rng, n_objects)
    sizes = [rng.choice(SIZES) for _ in range(n_objects)]
    # place the large objects first: they are the hard ones to fit
    order = sorted(range(n_objects), key=lambda k: -SIZE_EXTENT[sizes[k]])
    for _ in range(max_restarts):
        placed: dict[int, tuple[float, float]] = {}
        for k in order:
            r = SIZE_EXTENT[sizes[k]]
            lo, hi = r + BORDER, 1.0 - r - BORDER
            for _try in range(100):
                x, y = round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 4)
                ok = True
                for m, (px, py) in placed.items():
                    need = r + SIZE_EXTENT[sizes[m]] + MIN_GAP
                    if (x - px) ** 2 + (y - py) ** 2 < need * need or not (_axis_ok(x - px) and _axis_ok(y - py)):
                        ok = False
                        break
                if ok:
                    placed[k] = (x, y)
                    break
            else:
                break  # could not place object k: restart the whole layout
        if len(placed) == n_objects:
            objs = tuple(
                SceneObject(shape=pairs[k][1], color=pairs[k][0], size=sizes[k], x=placed[k][0], y=placed[k][1])
                for k in range(n_objects)
            )
            scene = Scene(objs, scene_id)
            return Scene(tuple(scene.objects[i] for i in scene.reading_order()), scene_id)
    raise RuntimeError(f"could not lay out {n_objects} objects without overlap after {max_restarts} restarts")


# ---------------------------------------------------------------------------------------------
# writing: captions


def _join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c' (no Oxford comma: the parser does not care either way)."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capital_list(words: Sequence[str]) -> str:
    """'Red and blue.': a joined list, capitalised, with a full stop."""
    text = _join(list(words)) + "."
    return text[0].upper() + text[1:]


def caption_relations(scene: Scene) -> list[Relation]:
    """The relations a detailed caption states: one per consecutive pair in reading order.

    Different columns -> "left of" (their x differ by at least the margin in sampled scenes);
    same column -> "above". A pair whose relation does not clearly hold (possible only in
    hand-made scenes) is skipped, so a caption never states an unclear relation.
    """
    order = scene.reading_order()
    out = []
    for a, b in zip(order, order[1:]):
        oa, ob = scene.objects[a], scene.objects[b]
        rel = "above" if abs(ob.x - oa.x) <= ALIGN_EPS else "left of"
        if scene.relation_truth(a, rel, b):
            out.append(Relation(a, rel, b))
    return out


def detailed_caption(scene: Scene) -> str:
    """All objects with size, colour and shape in reading order, then the caption relations.

    "There are two objects: a small red circle and a large blue square. The red circle is left of
    the blue square."
    """
    order = scene.reading_order()
    n = len(order)
    items = [f"{article(scene.objects[i].size)} {scene.objects[i].name(with_size=True)}" for i in order]
    head = "There is one object: " if n == 1 else f"There are {number_word(n)} objects: "
    sentences = [head + _join(items) + "."]
    for r in caption_relations(scene):
        sentences.append(f"The {scene.objects[r.subject].name()} is {r.relation} the {scene.objects[r.object].name()}.")
    return " ".join(sentences)


def short_caption(scene: Scene) -> str:
    """Colour and shape of every object in reading order: "A red circle and an orange star." """
    items = [f"{article(scene.objects[i].color)} {scene.objects[i].name()}" for i in scene.reading_order()]
    return _capital_list(items)


# ---------------------------------------------------------------------------------------------
# writing: questions


@dataclass(frozen=True)
class QA:
    """One task instance for a scene.

    ``label`` is the yes/no truth for yes/no tasks and None otherwise. ``meta`` holds the
    structured question (which object, attribute, relation; how a negative was made) so an
    evaluation can break results down, POPE-style, without re-parsing the text. Per key, its
    values always have one type (str, int or None) so the records load as a typed table.
    """

    task: str
    question: str
    answer: str
    label: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def yes_no(answer: bool, evidence: str | None = None) -> str:
    """The answer text for a yes/no question. Always starts with "Yes" or "No".

    With ``evidence`` ("there is a red circle", "it is small") the answer goes on to say what
    the image shows: "No, it is small." (the ``explained`` answer format, see
    :func:`scene_tasks`).
    """
    if evidence is None:
        return "Yes." if answer else "No."
    return f"{'Yes' if answer else 'No'}, {evidence}."


def count_answer(n: int) -> str:
    """"Three." for 3."""
    return number_word(n).capitalize() + "."


def existence_question(scene: Scene, rng: random.Random, answer: bool | None = None, explain: bool = False) -> QA:
    """ "Is there a red circle in the image?" about a present or absent (color, shape), or, a
    third of the time, "Is there a circle in the image?" about a category alone.

    The category form is POPE's question (Li et al. 2023: "Is there a <object> in the image?");
    the evaluation's POPE splits ask it, so the model must have seen it. Colour-and-shape
    negatives are made half the time at random and half "adversarially" (POPE style): an absent
    pair that reuses a colour or a shape that *is* in the scene, which is the harder case.
    ``meta["color"]`` is None for the category form.
    """
    if answer is None:
        answer = rng.random() < 0.5
    present = {(o.color, o.shape) for o in scene.objects}
    shapes = sorted({s for _c, s in present})
    absent_shapes = [s for s in SHAPES if s not in shapes]
    negative: str | None = None
    color: str | None
    if rng.random() < 1 / 3 and (answer or absent_shapes):
        color, shape = None, rng.choice(shapes) if answer else rng.choice(absent_shapes)
        negative = None if answer else "random"
        template = rng.choice(("Is there {a} {s} in the image?", "Can you see {a} {s} in the picture?"))
        q = template.format(a=article(shape), s=shape)
        evidence = None
        if explain:
            first = next(scene.objects[i] for i in scene.reading_order() if scene.objects[i].shape == shape) \
                if answer else None
            evidence = f"there is {article(first.color)} {first.name()}" if first else f"there is no {shape}"
        return QA("yesno_existence", q, yes_no(answer, evidence), answer,
                  {"color": None, "shape": shape, "negative": negative})
    if answer:
        color, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        if near and rng.random() < 0.5:
            negative, pool = "adversarial", near
        else:
            negative, pool = "random", absent
        color, shape = rng.choice(pool)
    template = rng.choice((
        "Is there {a} {c} {s} in the image?",
        "Does the image contain {a} {c} {s}?",
        "Can you see {a} {c} {s} in the picture?",
    ))
    q = template.format(a=article(color), c=color, s=shape)
    evidence = None
    if explain:
        evidence = f"there is {article(color)} {color} {shape}" if answer else f"there is no {color} {shape}"
    return QA("yesno_existence", q, yes_no(answer, evidence), answer,
              {"color": color, "shape": shape, "negative": negative})


def attribute_question(scene: Scene, rng: random.Random, answer: bool | None = None, explain: bool = False) -> QA:
    """ "Is the circle red?" (colour of a shape that occurs once) or "Is the red circle large?".

    Colour questions need an unambiguous referent, so they are only asked about shapes that
    occur exactly once; size questions name the object by colour and shape, which is always
    unique. A negative asks a colour the object does not have (preferring a colour that is
    elsewhere in the scene half the time) or the other size.
    """
    if answer is None:
        answer = rng.random() < 0.5
    shape_counts: dict[str, int] = {}
    for o in scene.objects:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
    unique_shape = [i for i, o in enumerate(scene.objects) if shape_counts[o.shape] == 1]
    if unique_shape and rng.random() < 0.5:
        i = rng.choice(unique_shape)
        o = scene.objects[i]
        negative: str | None = None
        if answer:
            color = o.color
        else:
            others = [c for c in COLORS if c != o.color]
            in_scene = sorted({p.color for p in scene.objects if p.color != o.color})
            if in_scene and rng.random() < 0.5:
                negative, color = "adversarial", rng.choice(in_scene)
            else:
                negative, color = "random", rng.choice(others)
        template = rng.choice(("Is the {s} {c}?", "Is the {s} in the image {c}?"))
        return QA("yesno_attribute", template.format(s=o.shape, c=color),
                  yes_no(answer, f"it is {o.color}" if explain else None), answer,
                  {"attribute": "color", "subject": o.shape, "value": color, "negative": negative})
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    size = o.size if answer else next(s for s in SIZES if s != o.size)
    template = rng.choice(("Is the {n} {z}?", "Is the {n} in the image {z}?"))
    return QA("yesno_attribute", template.format(n=o.name(), z=size),
              yes_no(answer, f"it is {o.size}" if explain else None), answer,
              {"attribute": "size", "subject": o.name(), "value": size, "negative": None if answer else "opposite"})


def relation_question(scene: Scene, rng: random.Random, answer: bool | None = None,
                      explain: bool = False) -> QA | None:
    """ "Is the red circle left of the blue square?"; None for a one-object scene.

    A positive is a relation that clearly holds. A negative is a (pair, relation) that is
    *clearly* false: the opposite relation holds ("opposite") or the pair is aligned on that
    axis ("aligned"); offsets in the ambiguous band are never asked about.
    """
    if len(scene.objects) < 2:
        return None
    if answer is None:
        answer = rng.random() < 0.5
    n = len(scene.objects)
    triples = [(i, rel, j) for i in range(n) for j in range(n) if i != j for rel in RELATIONS]
    pool = [t for t in triples if scene.relation_truth(*t) is answer]
    if not pool:  # only in hand-made scenes (sampled pairs always have a clear relation)
        answer = not answer
        pool = [t for t in triples if scene.relation_truth(*t) is answer]
        if not pool:
            return None
    i, rel, j = rng.choice(pool)
    negative: str | None = None
    if not answer:
        negative = "opposite" if scene.relation_truth(i, OPPOSITE[rel], j) else "aligned"
    template = rng.choice(("Is the {a} {r} the {b}?", "In the image, is the {a} {r} the {b}?"))
    q = template.format(a=scene.objects[i].name(), r=rel, b=scene.objects[j].name())
    evidence = None
    if explain:
        holds = relations_between(scene, i, j)
        evidence = f"it is {_join(holds)} the {scene.objects[j].name()}" if holds else "they are level"
    return QA("yesno_relation", q, yes_no(answer, evidence), answer,
              {"subject": scene.objects[i].name(), "relation": rel, "object": scene.objects[j].name(),
               "negative": negative})


def count_question(scene: Scene, rng: random.Random) -> QA:
    """ "How many objects are there?" -> "Three."; or objects of one colour, shape or size.

    A colour or shape that is absent from the scene is asked a quarter of the time (answer
    "Zero."), so counting is not just "at least one".
    """
    kind = rng.choices(("all", "color", "shape", "size"), weights=(2, 1, 1, 1))[0]
    value: str | None = None
    if kind == "all":
        q = rng.choice(("How many objects are there?", "How many objects are in the image?"))
        n = len(scene.objects)
    elif kind == "size":
        value = rng.choice(SIZES)
        q = f"How many {value} objects are there?"
        n = len(scene.find(size=value))
    else:
        values = tuple(COLORS) if kind == "color" else SHAPES
        present = sorted({getattr(o, kind) for o in scene.objects})
        absent = [v for v in values if v not in present]
        value = rng.choice(absent) if absent and rng.random() < 0.25 else rng.choice(present)
        n = len(scene.find(**{kind: value}))
        q = f"How many {value} objects are there?" if kind == "color" else f"How many {_plural(value)} are there?"
    return QA("count", q, count_answer(n), None, {"attribute": kind, "value": value, "count": n})


#: The first paraphrase of each look-up question: the one the judge asks.
LOOKUP_COLOR_TEMPLATE = "What color is the {s}?"
LOOKUP_SIZE_TEMPLATE = "What size is the {n}?"
LOOKUP_RELATION_TEMPLATE = "Where is the {a} relative to the {b}?"


def lookup_color_question(scene: Scene, rng: random.Random, shape: str | None = None) -> QA:
    """ "What color is the star?" -> "Yellow." / "Yellow and red." (every object of that shape,
    in reading order) / "There is no star." when the shape is absent (a quarter of the time).

    A content question: the answer is read off the image, not compared with the question, so a
    model learns it where it cannot learn "Is there a star?" (docs/TESTBED.md). The judge asks it
    to verify object and colour claims.
    """
    present = sorted({o.shape for o in scene.objects})
    if shape is None:
        absent = [s for s in SHAPES if s not in present]
        shape = rng.choice(absent) if absent and rng.random() < 0.25 else rng.choice(present)
    colors = [scene.objects[i].color for i in scene.reading_order() if scene.objects[i].shape == shape]
    answer = _capital_list(colors) if colors else f"There is no {shape}."
    q = rng.choice((LOOKUP_COLOR_TEMPLATE, "Which color does the {s} have?")).format(s=shape)
    return QA("lookup_color", q, answer, None, {"shape": shape, "colors": ",".join(colors)})


def lookup_size_question(scene: Scene, rng: random.Random, index: int | None = None) -> QA:
    """ "What size is the red circle?" -> "Small." about an object of the scene."""
    i = rng.randrange(len(scene.objects)) if index is None else index
    o = scene.objects[i]
    q = rng.choice((LOOKUP_SIZE_TEMPLATE, "How big is the {n}?")).format(n=o.name())
    return QA("lookup_size", q, o.size.capitalize() + ".", None, {"subject": o.name(), "size": o.size})


def relations_between(scene: Scene, i: int, j: int) -> list[str]:
    """Every relation that clearly holds from object ``i`` to ``j``, in :data:`RELATIONS` order."""
    return [r for r in RELATIONS if scene.relation_truth(i, r, j)]


def lookup_relation_question(scene: Scene, rng: random.Random, pair: tuple[int, int] | None = None) -> QA | None:
    """ "Where is the red circle relative to the blue square?" -> "Left of and above." (every
    relation that clearly holds; "Level." if none does, only in hand-made scenes); None for a
    one-object scene."""
    if len(scene.objects) < 2 and pair is None:
        return None
    i, j = pair if pair is not None else rng.sample(range(len(scene.objects)), 2)
    rels = relations_between(scene, i, j)
    a, b = scene.objects[i].name(), scene.objects[j].name()
    q = rng.choice((LOOKUP_RELATION_TEMPLATE, "Where is the {a} compared to the {b}?")).format(a=a, b=b)
    return QA("lookup_relation", q, _capital_list(rels) if rels else "Level.", None,
              {"subject": a, "object": b, "relations": ",".join(rels)})


def parse_lookup_colors(text: str) -> list[str] | None:
    """Colours named in a :func:`lookup_color_question` answer; ``[]`` for "There is no ...";
    None when the text is neither (unparseable)."""
    low = text.lower()
    if re.match(r"\s*there is no\b", low):
        return []
    colors = [COLOR_WORDS[w] for w in re.findall(r"[a-z]+", low) if w in COLOR_WORDS]
    return colors or None


def parse_lookup_size(text: str) -> str | None:
    """The size word of a :func:`lookup_size_question` answer, or None."""
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in SIZE_WORDS:
            return SIZE_WORDS[w]
    return None


def parse_lookup_relations(text: str) -> list[str] | None:
    """Relations named in a :func:`lookup_relation_question` answer (``[]`` for "Level."), or None."""
    low = text.lower()
    found = [r for r in RELATIONS if re.search(r"\b" + r + r"\b", low)]
    if found:
        return found
    return [] if re.match(r"\s*level\b", low) else None


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "ch", "sh")) else shape + "s"


def caption_task(scene: Scene, rng: random.Random, task: str) -> QA:
    """A detailed_caption or short_caption instance with a paraphrased prompt."""
    if task == "detailed_caption":
        return QA(task, rng.choice(DETAILED_PROMPTS), detailed_caption(scene))
    if task == "short_caption":
        return QA(task, rng.choice(SHORT_PROMPTS), short_caption(scene))
    raise ValueError(f"not a caption task: {task!r}")


def scene_tasks(scene: Scene, rng: random.Random, qa_per_scene: int = 1, explain_yes_no: bool = False) -> list[QA]:
    """Every task for one scene: one of each caption, ``qa_per_scene`` of each question kind.

    ``explain_yes_no``: yes/no answers go on to say what the image shows ("No, it is small.",
    "Yes, there is a red circle."), the ``explained`` answer format; else "Yes." / "No.".

    Relation questions are skipped for one-object scenes. Within a scene a question is not
    repeated (up to a few redraws), so ``qa_per_scene > 1`` adds distinct questions.
    """
    out = [caption_task(scene, rng, "detailed_caption"), caption_task(scene, rng, "short_caption")]
    makers = (
        ("yesno_existence", lambda: existence_question(scene, rng, explain=explain_yes_no)),
        ("yesno_attribute", lambda: attribute_question(scene, rng, explain=explain_yes_no)),
        ("yesno_relation", lambda: relation_question(scene, rng, explain=explain_yes_no)),
        ("count", lambda: count_question(scene, rng)),
        ("lookup_color", lambda: lookup_color_question(scene, rng)),
        ("lookup_size", lambda: lookup_size_question(scene, rng)),
        ("lookup_relation", lambda: lookup_relation_question(scene, rng)),
    )
    for _task, make in makers:
        seen: set[str] = set()
        for _ in range(qa_per_scene):
            for _redraw in range(8):
                qa = make()
                if qa is None or qa.question not in seen:
                    break
            if qa is None:
                break
            if qa.question in seen:
                continue
            seen.add(qa.question)
            out.append(qa)
    return out


# ---------------------------------------------------------------------------------------------
# reading: answers


def parse_yes_no(text: str) -> bool | None:
    """True/False when the text starts with yes/no (any case, any punctuation); else None."""
    m = re.match(r"\s*(yes|no)\b", text, flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


def parse_count(text: str) -> int | None:
    """The first number in the text, as a word ("Three.") or digits ("3"); else None."""
    for tok in re.findall(r"[a-z]+|\d+", text.lower()):
        if tok.isdigit():
            return int(tok)
        if tok in NUMBER_WORDS:
            return NUMBER_WORDS.index(tok)
        if tok == "none":
            return 0
    return None


# ---------------------------------------------------------------------------------------------
# reading: captions

#: surface word -> (shape, is_plural)
SHAPE_WORDS: dict[str, tuple[str, bool]] = {}
for _s in SHAPES:
    SHAPE_WORDS[_s] = (_s, False)
    SHAPE_WORDS[_plural(_s)] = (_s, True)
SHAPE_WORDS.update({
    "disc": ("circle", False), "discs": ("circle", True), "disk": ("circle", False), "disks": ("circle", True),
    "rhombus": ("diamond", False), "rhombuses": ("diamond", True), "rhombi": ("diamond", True),
})
#: surface word -> colour. Off-vocabulary colours map to themselves: they can never match a
#: scene object, so "a pink circle" is a hallucination rather than silently "a circle".
COLOR_WORDS: dict[str, str] = {c: c for c in COLORS}
COLOR_WORDS.update({"violet": "purple", **{c: c for c in ("pink", "black", "white", "brown", "grey", "gray", "cyan", "magenta")}})
#: surface word -> size; "medium" never matches, like an off-vocabulary colour.
SIZE_WORDS: dict[str, str] = {"small": "small", "little": "small", "tiny": "small",
                              "large": "large", "big": "large", "huge": "large", "medium": "medium"}
_DETERMINERS = {"a", "an", "the", "another", "one"}
_COUNT_WORDS = {w: i for i, w in enumerate(NUMBER_WORDS) if i >= 2}


@dataclass(frozen=True)
class Mention:
    """An object mention: "the small red circle", "two red circles", "a star".

    ``color``/``size`` are None when unstated. ``count`` is set only for an explicit number of
    two or more ("two red circles"); singular mentions have None. ``negated`` marks "no red
    circle" / "not a red circle". ``start``/``end`` are character offsets into the text.
    """

    shape: str
    color: str | None
    size: str | None
    count: int | None
    plural: bool
    negated: bool
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class RelationClaim:
    """ "<subject> is <relation> <object>", possibly negated ("is not above")."""

    subject: Mention
    relation: str
    object: Mention
    negated: bool
    start: int
    end: int


@dataclass(frozen=True)
class ParsedCaption:
    """Everything :func:`parse_caption` found in a text.

    ``object_count`` is the stated total ("There are three objects") or None.
    """

    text: str
    mentions: tuple[Mention, ...]
    relations: tuple[RelationClaim, ...]
    object_count: int | None


_TOKEN = re.compile(r"[a-z]+|\d+")
#: Words that open a relative clause about the mention just before them ("B, which is above C").
_RELATIVE_PRONOUNS = {"which", "that", "who"}
_SENTENCE_END = re.compile(r"[.!?;]")


def parse_caption(text: str) -> ParsedCaption:
    """Extract object mentions, relation claims and a stated object count from free text.

    Tolerant of capitals, articles, plurals ("circles", "crosses"), a few synonyms ("disc",
    "rhombus", "big", "little", "violet"), number words ("two red circles") and relation
    phrasings ("to the left of", "on top of", "under"). A mention is a shape word plus the
    size/colour/number/determiner words directly before it. A relation claim links the last
    mention before the relation phrase to the first one after it, within one sentence; in
    "A is above B and left of C" the second claim's subject is A again, not B, while in a relative
    clause ("A is right of B, which is above C"; also "that") it is B.
    """
    low = text.lower()
    toks = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(low)]
    ends = [m.start() for m in _SENTENCE_END.finditer(low)]

    def sentence_of(pos: int) -> int:
        return sum(1 for e in ends if e < pos)

    mentions: list[Mention] = []
    mention_tok: list[tuple[int, int]] = []  # first and last token index of each mention
    for k, (w, s, e) in enumerate(toks):
        if w not in SHAPE_WORDS:
            continue
        shape, plural = SHAPE_WORDS[w]
        color = size = count = None
        negated = False
        first = k
        j = k - 1
        while j >= 0:
            wj = toks[j][0]
            if low[toks[j][2]:toks[j + 1][1]].strip():
                break  # punctuation in between: "The square is large. Red circle" is not "large red circle"
            if wj in COLOR_WORDS and color is None:
                color = COLOR_WORDS[wj]
            elif wj in SIZE_WORDS and size is None:
                size = SIZE_WORDS[wj]
            elif wj in _COUNT_WORDS or (wj.isdigit() and int(wj) >= 2):
                count = _COUNT_WORDS.get(wj, int(wj) if wj.isdigit() else None)
                first = j
                break
            elif wj in _DETERMINERS:
                first = j
                break
            elif wj == "no":
                negated, first = True, j
                break
            else:
                break
            first = j
            j -= 1
        if first > 0 and toks[first - 1][0] == "not":
            negated = True
        start = toks[first][1]
        mentions.append(Mention(shape, color, size, count, plural, negated, start, e, text[start:e]))
        mention_tok.append((first, k))

    relations: list[RelationClaim] = []
    k = 0
    while k < len(toks):
        w = toks[k][0]
        nxt = toks[k + 1][0] if k + 1 < len(toks) else ""
        rel, span_end = None, k
        if w in ("left", "right") and nxt == "of":
            rel, span_end = f"{w} of", k + 1
        elif w in ("above", "over"):
            rel = "above"
        elif w in ("below", "under", "underneath", "beneath"):
            rel = "below"
        elif w == "on" and nxt == "top" and k + 2 < len(toks) and toks[k + 2][0] == "of":
            rel, span_end = "above", k + 2
        if rel is None:
            k += 1
            continue
        p_start = toks[k][1]
        sent = sentence_of(p_start)
        before = [m for m, (_f, last) in zip(mentions, mention_tok) if last < k and sentence_of(m.start) == sent]
        after = [m for m, (f, _l) in zip(mentions, mention_tok) if f > span_end and sentence_of(m.start) == sent]
        if before and after:
            subject = before[-1]
            prev = relations[-1] if relations else None
            if prev is not None and prev.object is subject and sentence_of(prev.start) == sent:
                # "A is above B and left of C": A is left of C. But a relative clause attaches to
                # B: in "A is right of B, which is above C" it is B that is above C.
                clause = {t[0] for t in toks if subject.end <= t[1] < p_start}
                if not clause & _RELATIVE_PRONOUNS:
                    subject = prev.subject
            # negation between the subject and the phrase: "is not above", "isn't left of"
            between = [t[0] for t in toks if subject.end <= t[1] < p_start]
            negated = "not" in between or "isn" in between or "aren" in between
            relations.append(RelationClaim(subject, rel, after[0], negated, subject.start, after[0].end))
        k = span_end + 1

    object_count = None
    for m in re.finditer(r"\b([a-z]+|\d+)\s+(?:different\s+|distinct\s+)?(?:objects?|shapes)\b", low):
        w = m.group(1)
        if w.isdigit():
            object_count = int(w)
        elif w in NUMBER_WORDS:
            object_count = NUMBER_WORDS.index(w)
        elif w == "no":
            object_count = 0
        if object_count is not None:
            break
    return ParsedCaption(text, tuple(mentions), tuple(relations), object_count)


class MentionLabel(str, Enum):
    """How a mention compares with the scene. See :func:`check_caption` for the exact rules."""

    CORRECT = "correct"
    HALLUCINATED = "hallucinated"
    ATTRIBUTE_ERROR = "attribute_error"
    NEGATED = "negated"


class RelationLabel(str, Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    UNVERIFIABLE = "unverifiable"


@dataclass(frozen=True)
class MentionCheck:
    """The verdict on one mention.

    ``matched``: scene objects the mention refers to (empty when hallucinated).
    ``wrong_attributes``: which stated attributes are wrong — ("color",) for a hallucination
    whose shape *is* in the scene, ("size",) or ("count",) for attribute errors.
    ``shape_present``: the category exists in the scene, so a CHAIR-style category-level count
    (only absent shapes are hallucinations) can be derived from these checks.
    """

    mention: Mention
    label: MentionLabel
    matched: tuple[int, ...]
    wrong_attributes: tuple[str, ...]
    shape_present: bool


@dataclass(frozen=True)
class RelationCheck:
    claim: RelationClaim
    label: RelationLabel
    subject_index: int | None
    object_index: int | None


@dataclass(frozen=True)
class CaptionCheck:
    """Per-claim verdicts for one caption against one scene, plus counts.

    ``covered``: indices of scene objects that some correct mention identifies. A caption
    "covers" the scene when every object is covered.
    """

    mentions: tuple[MentionCheck, ...]
    relations: tuple[RelationCheck, ...]
    count_correct: bool | None
    covered: frozenset[int]
    n_objects: int

    def _n(self, label: MentionLabel) -> int:
        return sum(1 for m in self.mentions if m.label == label)

    @property
    def n_mentions(self) -> int:
        """Positive (non-negated) mentions: the denominator of the hallucination rate."""
        return sum(1 for m in self.mentions if m.label != MentionLabel.NEGATED)

    @property
    def n_correct(self) -> int:
        return self._n(MentionLabel.CORRECT)

    @property
    def n_hallucinated(self) -> int:
        return self._n(MentionLabel.HALLUCINATED)

    @property
    def n_attribute_errors(self) -> int:
        return self._n(MentionLabel.ATTRIBUTE_ERROR)

    @property
    def n_category_hallucinated(self) -> int:
        """Hallucinations whose shape is absent from the scene altogether (CHAIR's notion)."""
        return sum(1 for m in self.mentions if m.label == MentionLabel.HALLUCINATED and not m.shape_present)

    @property
    def n_relations_correct(self) -> int:
        return sum(1 for r in self.relations if r.label == RelationLabel.CORRECT)

    @property
    def n_relations_wrong(self) -> int:
        return sum(1 for r in self.relations if r.label == RelationLabel.WRONG)

    @property
    def n_relations_unverifiable(self) -> int:
        return sum(1 for r in self.relations if r.label == RelationLabel.UNVERIFIABLE)

    @property
    def coverage(self) -> float:
        """Fraction of scene objects identified by a correct mention (recall)."""
        return len(self.covered) / self.n_objects

    @property
    def faithful(self) -> bool:
        """No hallucination, attribute error or wrong relation, and the count (if stated) right."""
        return (self.n_hallucinated == 0 and self.n_attribute_errors == 0 and self.n_relations_wrong == 0
                and self.count_correct is not False)

    @property
    def complete(self) -> bool:
        """Faithful and every scene object covered."""
        return self.faithful and len(self.covered) == self.n_objects

    @property
    def distinct_mentioned(self) -> int:
        """Distinct (shape, colour) names among positive mentions: "a small red circle ... the
        red circle" is one. The denominator of a CHAIR-i-like per-object rate."""
        return len({(m.mention.shape, m.mention.color) for m in self.mentions if m.label != MentionLabel.NEGATED})

    @property
    def distinct_hallucinated(self) -> int:
        """Distinct (shape, colour) names among hallucinated mentions."""
        return len({(m.mention.shape, m.mention.color) for m in self.mentions if m.label == MentionLabel.HALLUCINATED})

    def counts(self) -> dict[str, int]:
        """Integer counts for summing over a data set (see :func:`aggregate_checks`)."""
        return {
            "mentions": self.n_mentions,
            "distinct_mentioned": self.distinct_mentioned,
            "distinct_hallucinated": self.distinct_hallucinated,
            "correct": self.n_correct,
            "hallucinated": self.n_hallucinated,
            "category_hallucinated": self.n_category_hallucinated,
            "attribute_errors": self.n_attribute_errors,
            "relations": len(self.relations),
            "relations_correct": self.n_relations_correct,
            "relations_wrong": self.n_relations_wrong,
            "relations_unverifiable": self.n_relations_unverifiable,
            "objects": self.n_objects,
            "covered": len(self.covered),
            "count_stated": int(self.count_correct is not None),
            "count_correct": int(self.count_correct is True),
            "faithful": int(self.faithful),
            "complete": int(self.complete),
        }


def _resolve(scene: Scene, m: Mention) -> int | None:
    """The one scene object a mention names, or None when it names none or several.

    Identity is (color, shape); size is used only to break a tie when the colour is unstated
    ("the large circle" with one large and one small circle).
    """
    cand = scene.find(color=m.color, shape=m.shape)
    if len(cand) == 1:
        return cand[0]
    if len(cand) > 1 and m.size is not None:
        sized = [i for i in cand if scene.objects[i].size == m.size]
        if len(sized) == 1:
            return sized[0]
    return None


def check_mention(scene: Scene, m: Mention) -> MentionCheck:
    """Label one mention; the rules are listed in :func:`check_caption`."""
    shape_present = bool(scene.find(shape=m.shape))
    if m.negated:
        return MentionCheck(m, MentionLabel.NEGATED, (), (), shape_present)
    cand = scene.find(color=m.color, shape=m.shape)
    if not cand:
        wrong = ("color",) if shape_present else ()
        return MentionCheck(m, MentionLabel.HALLUCINATED, (), wrong, shape_present)
    matched = [i for i in cand if m.size is None or scene.objects[i].size == m.size]
    if not matched:
        return MentionCheck(m, MentionLabel.ATTRIBUTE_ERROR, tuple(cand), ("size",), shape_present)
    if m.count is not None and m.count != len(matched):
        return MentionCheck(m, MentionLabel.ATTRIBUTE_ERROR, tuple(matched), ("count",), shape_present)
    return MentionCheck(m, MentionLabel.CORRECT, tuple(matched), (), shape_present)


def check_relation(scene: Scene, claim: RelationClaim) -> RelationCheck:
    """Label one relation claim; the rules are listed in :func:`check_caption`."""
    i, j = _resolve(scene, claim.subject), _resolve(scene, claim.object)
    if i is None or j is None or i == j or claim.subject.negated or claim.object.negated:
        return RelationCheck(claim, RelationLabel.UNVERIFIABLE, i, j)
    truth = scene.relation_truth(i, claim.relation, j)
    if truth is None:
        return RelationCheck(claim, RelationLabel.UNVERIFIABLE, i, j)
    if claim.negated:
        truth = not truth
    return RelationCheck(claim, RelationLabel.CORRECT if truth else RelationLabel.WRONG, i, j)


def check_caption(parsed: ParsedCaption, scene: Scene) -> CaptionCheck:
    """Check every claim of a parsed caption against a scene.

    Mentions (identity of an object in this world is its (colour, shape) name, because the
    pair is unique in a scene; size is the free attribute):

    * ``HALLUCINATED`` — no object has the mention's shape and (if stated) colour: "a blue
      circle" with no blue circle, even if a red circle exists (``wrong_attributes=("color",)``,
      ``shape_present=True``; :attr:`CaptionCheck.n_category_hallucinated` counts only absent
      shapes, for a CHAIR-style category rate).
    * ``ATTRIBUTE_ERROR`` — objects with that shape and colour exist, but none has the stated
      size (``("size",)``), or an explicit number ("two red circles") differs from how many match
      (``("count",)``).
    * ``CORRECT`` — some object matches every stated attribute (and the number, if stated).
    * ``NEGATED`` — "no red circle": not a positive claim; excluded from all counts.

    Relations: both sides are resolved to one object each (:func:`_resolve`). ``UNVERIFIABLE``
    when either side names no object or several (e.g. a hallucinated subject), or the offset is
    in the ambiguous band; otherwise ``CORRECT`` if the relation clearly holds (negated claims:
    clearly does not hold) and ``WRONG`` if it is clearly false.

    Coverage: a correct mention covers its matched objects when it identifies them: it matches
    one object, or its explicit number equals how many it matches.
    """
    mchecks = tuple(check_mention(scene, m) for m in parsed.mentions)
    rchecks = tuple(check_relation(scene, r) for r in parsed.relations)
    covered: set[int] = set()
    for mc in mchecks:
        if mc.label == MentionLabel.CORRECT and (len(mc.matched) == 1 or mc.mention.count == len(mc.matched)):
            covered.update(mc.matched)
    count_correct = None if parsed.object_count is None else parsed.object_count == len(scene.objects)
    return CaptionCheck(mchecks, rchecks, count_correct, frozenset(covered), len(scene.objects))


def aggregate_checks(checks: Iterable[CaptionCheck]) -> dict[str, float]:
    """Sum counts over captions and derive rates (micro-averaged over mentions/relations).

    ``object_hallucination_rate`` = hallucinated / mentions (the "simple count" of the first
    evaluation; an object named again in a relation sentence counts again);
    ``distinct_hallucination_rate`` counts each (shape, colour) name once per caption, like
    CHAIR-i; ``category_hallucination_rate`` counts absent shapes only; ``coverage`` =
    covered / scene objects; ``faithful_rate``/``complete_rate`` are per caption.
    """
    total: dict[str, float] = {}
    n = 0
    for c in checks:
        n += 1
        for k, v in c.counts().items():
            total[k] = total.get(k, 0) + v

    def rate(a: str, b: str) -> float:
        return total[a] / total[b] if total.get(b) else 0.0

    out = dict(total)
    out["captions"] = n
    if n:
        out.update({
            "object_hallucination_rate": rate("hallucinated", "mentions"),
            "distinct_hallucination_rate": rate("distinct_hallucinated", "distinct_mentioned"),
            "category_hallucination_rate": rate("category_hallucinated", "mentions"),
            "attribute_error_rate": rate("attribute_errors", "mentions"),
            "relation_error_rate": rate("relations_wrong", "relations"),
            "coverage": rate("covered", "objects"),
            "count_accuracy": rate("count_correct", "count_stated"),
            "faithful_rate": total["faithful"] / n,
            "complete_rate": total["complete"] / n,
        })
    return out
