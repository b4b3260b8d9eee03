"""Object mentions in free text, by a small parser over a synonym table (for CHAIR and AMBER).

CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning", EMNLP;
github.com/LisaAnne/Hallucination, ``utils/chair.py`` and ``data/synonyms.txt``; read here from
github.com/Maxlinn/CHAIR-metric-standalone, whose ``chair.py`` inlines both) counts the COCO
objects a caption mentions and calls those absent from the image's ground truth hallucinated.
AMBER's generative task (Wang et al. 2023, arXiv:2311.07397) does the same with its own object
words. Both need the same step, done here: find every object mention in a text and map it to a
canonical category.

How text is parsed (:meth:`ObjectVocabulary.extract`):

* Words are maximal runs of letters/digits, matched case-insensitively and whole: "cathedral" is
  not a cat, "skiing" is not a ski. An apostrophe ends a word, so "man's" holds the word "man".
* Multi-word forms match words separated by white space or a hyphen ("hot dog", "hot-dog"), never
  across other punctuation ("a hot. Dog" is a dog).
* Longest match first, left to right: "hot dog" is one hot dog (not a dog), "teddy bear" one
  teddy bear (not a bear), "stove top oven" one oven.
* The last word of a form may be plural: regular -s / -es / -ies / -ves, and the irregular
  plurals in ``IRREGULAR_PLURALS`` (people, men, women, children, mice, geese, teeth, feet, oxen,
  knives, leaves, ...; "-men" compounds such as "policemen"). Words with an unchanged plural
  (sheep, fish, deer, skis) match as they are. An exact match always wins over a de-pluralised
  one, so a table holding both "glass" and "glasses" keeps them apart.

The COCO table (:data:`COCO_SYNONYMS`, :meth:`ObjectVocabulary.coco`) is CHAIR's
``synonyms.txt``: the 80 category names exactly as in ``instances_*.json`` with, per category, the
words CHAIR maps to it. Taken from CHAIR as well (``CHAIR.__init__`` and ``caption_to_words``):

* two-word forms are one mention (CHAIR's ``coco_double_words``);
* "baby"/"adult" + animal is the animal, not a person plus the animal ("baby bird" -> bird);
  "baby/adult animal" and "baby/adult cub" are no COCO object at all;
* "passenger jet" -> airplane and "passenger train" -> train, not a person;
* "toilet seat" -> toilet; "bow tie" -> tie; "train track" is not a train;
* when a text mentions a toilet, "seat" is not a chair ("the seat of the toilet").

Where this differs from CHAIR (all deliberate; CHAIR numbers from here are close to, not
identical with, the reference script's):

* CHAIR tokenises with NLTK and singularises with ``pattern.en``; here the rules above do both,
  with no dependencies. Hyphenated forms ("hot-dog") match here; NLTK keeps them one token.
* CHAIR joins at most two words; "stove top oven" (three) never matched there, here it does.
* The baby/adult rule covers every form of the ten animal categories ("baby goat" -> sheep,
  "baby duck" -> bird), not only the ten category names; "passenger" + any form of airplane,
  bus, train or boat ("passenger ferry") is the vehicle. CHAIR lists only "passenger jet/train".
* The toilet/seat rule fires on any mention of the toilet category (urinal, commode, ...), not
  only the literal word "toilet".
* Dropped from ``synonyms.txt``: "knive" and "phon" (artefacts of singularising "knives" and
  "phones", which the plural rules handle) and its duplicate entries. Added: "hair dryer"
  (the common spelling; CHAIR has only "hair drier" and "hairdryer"), "hotdog", "aeroplane".
  "home plate" (a CHAIR double word) is left out: neither word is a COCO object here either.
* Reference-script quirks fixed here, silently changing counts against it: ``pattern.en``'s
  ``singularize`` turns "bus" into "bu" and "ties" into "ty", so the reference never counts a
  bus or a plural tie (here both are mentions); and ``synonyms.txt`` writes two forms after a
  double space ("motorcycle, scooter,  motor bike" and "cake,  cheesecake"), which its
  ``split(', ')`` reads as " motor bike" and " cheesecake" with a leading space that no token can
  equal (here "motor bike" is a motorcycle and "cheesecake" a cake). The LisaAnne/Hallucination
  forks that lemmatise with WordNet instead of ``pattern`` (OPERA's ``chair.py``) keep the
  leading-space forms but not the bus/ty ones.
* Negation is ignored on COCO, as in the reference script: "there is no dog" is a dog mention (a
  hallucination if the image has none). The world's CHAIR skips negated mentions because its
  caption grammar marks them (``mmalign.eval.world_bench``); free text has no such parse here.
* Known CHAIR limits kept as they are: "orange" the colour is an orange, "bow" is a tie,
  "pitcher"/"player" are people, "ball" is a sports ball, "mouse" is the COCO (computer) mouse.

A word that is a form of two categories is an error when the vocabulary is built, naming both;
CHAIR's table has no such word, a custom one must not either.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CHAIR_PHRASES",
    "COCO_SYNONYMS",
    "IRREGULAR_PLURALS",
    "ObjectMention",
    "ObjectVocabulary",
    "VocabularyError",
]


class VocabularyError(ValueError):
    """A synonym table is malformed or ambiguous (the message names the table and the words)."""


# --------------------------------------------------------------------------------------------
# the COCO table (CHAIR's synonyms.txt)

#: The 80 COCO categories (names exactly as in ``instances_*.json``, in category-id order) and the
#: further words CHAIR maps to each (its ``data/synonyms.txt``, duplicates removed; see the module
#: docstring for the few changes). The category name itself is always a form too.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider",
        "children", "baby", "worker", "passenger", "sister", "biker", "policeman", "cop", "officer",
        "lady", "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother", "father",
        "gentleman", "pitcher", "player", "skier", "snowboarder", "skater", "skateboarder",
        "foreigner", "caller", "offender", "coworker", "trespasser", "patient", "politician",
        "soldier", "grandchild", "serviceman", "walker", "drinker", "doctor", "bicyclist", "thief",
        "buyer", "teenager", "student", "camper", "driver", "solider", "hunter", "shopper",
        "villager",
    ),
    "bicycle": ("bike", "unicycle", "minibike", "trike"),
    "car": (
        "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe",
        "taxicab", "limo", "taxi",
    ),
    "motorcycle": ("scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane",
        "seaplane", "aeroplane",
    ),
    "bus": ("minibus", "trolley"),
    "train": ("locomotive", "tramway", "caboose"),
    "truck": ("pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
        "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat",
        "trawler", "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry", "sailboard",
        "paddleboat", "lifeboat", "freighter", "steamboat", "riverboat", "battleship", "steamship",
    ),
    "traffic light": (
        "street light", "traffic signal", "stop light", "streetlight", "stoplight",
    ),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    "bird": (
        "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
        "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird",
        "osprey", "blackbird", "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail",
        "bluebird", "kingfisher", "buzzard", "willet", "gull", "swan", "bluejay", "flamingo",
        "cormorant", "parrot", "loon", "gosling", "waterbird", "pheasant", "rooster", "sandpiper",
        "crow", "raven", "turkey", "oriole", "cowbird", "warbler", "magpie", "peacock",
        "cockatiel", "lorikeet", "puffin", "vulture", "condor", "macaw", "peafowl", "cockatoo",
        "songbird",
    ),
    "cat": ("kitten", "feline", "tabby"),
    "dog": (
        "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
        "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt",
        "doggy", "spaniel", "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound",
        "retriever", "brindle", "hound", "whippet", "husky",
    ),
    "horse": (
        "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino", "mustang",
        "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": (
        "cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison",
    ),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack",),
    "umbrella": (),
    "handbag": ("wallet", "purse", "briefcase"),
    "tie": ("bow", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball",),
    "kite": (),
    "baseball bat": (),
    "baseball glove": (),
    "skateboard": (),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("racket",),
    "bottle": (),
    "wine glass": (),
    "cup": (),
    "fork": (),
    "knife": ("pocketknife",),
    "spoon": (),
    "bowl": ("container",),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "sub", "cheeseburger", "hamburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("seat", "stool"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("houseplant",),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty"),
    "tv": ("monitor", "televison", "television"),
    "laptop": ("computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": (),
    "remote": (),
    "keyboard": (),
    "cell phone": (
        "mobile phone", "phone", "cellphone", "telephone", "smartphone", "iphone",
    ),
    "microwave": (),
    "oven": ("stovetop", "stove", "stove top oven"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear",),
    "hair drier": ("hairdryer", "hair dryer"),
    "toothbrush": (),
}

_CHAIR_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
_PASSENGER_VEHICLES = ("airplane", "bus", "train", "boat")


def _chair_phrases() -> dict[str, str | None]:
    phrases: dict[str, str | None] = {}
    for animal in _CHAIR_ANIMALS:
        for form in (animal, *COCO_SYNONYMS[animal]):
            phrases[f"baby {form}"] = animal
            phrases[f"adult {form}"] = animal
    for word in ("animal", "cub"):
        phrases[f"baby {word}"] = None
        phrases[f"adult {word}"] = None
    for vehicle in _PASSENGER_VEHICLES:
        for form in (vehicle, *COCO_SYNONYMS[vehicle]):
            phrases[f"passenger {form}"] = vehicle
    phrases["toilet seat"] = "toilet"
    phrases["train track"] = None
    return phrases


#: CHAIR's multi-word special cases: phrase -> the category it is, or None for "no COCO object"
#: (the words are consumed, so "baby" in "baby animal" is not a person). See the module docstring.
CHAIR_PHRASES: dict[str, str | None] = _chair_phrases()

#: CHAIR: when the toilet category is mentioned, mentions written "seat" are not chairs.
CHAIR_DROP_IF_PRESENT: dict[str, tuple[str, ...]] = {"toilet": ("seat",)}


# --------------------------------------------------------------------------------------------
# words and plurals

_WORD = re.compile(r"[^\W_]+")
# what may stand between the words of a multi-word form in a text: white space or one hyphen
_JOIN = re.compile(r"\s+|\s*-\s*")
# characters a surface form may hold besides its words
_FORM_SEPARATORS = re.compile(r"[\s\-]*")

#: Irregular plural -> singular. Unchanged plurals (sheep, fish, deer, bison, aircraft, skis) need
#: no entry: they match as written.
IRREGULAR_PLURALS: dict[str, str] = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "lice": "louse",
    "dice": "die",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "loaves": "loaf",
    "calves": "calf",
    "halves": "half",
    "wolves": "wolf",
    "shelves": "shelf",
    "thieves": "thief",
    "scarves": "scarf",
    "cacti": "cactus",
    "fungi": "fungus",
}
# compounds: "policemen" -> "policeman", "grandchildren" -> "grandchild"
_IRREGULAR_SUFFIXES = (("men", "man"), ("children", "child"), ("people", "person"))


def _singular_candidates(word: str) -> list[str]:
    """``word`` (lower case) first, then every singular it may be the plural of, most specific first.

    Over-generating is harmless: a candidate only counts when it is a form in the vocabulary.
    """
    out = [word]
    if word in IRREGULAR_PLURALS:
        out.append(IRREGULAR_PLURALS[word])
    for plural, singular in _IRREGULAR_SUFFIXES:
        if word.endswith(plural) and len(word) > len(plural):
            out.append(word[: -len(plural)] + singular)
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")  # puppies -> puppy
    if word.endswith("ves") and len(word) > 4:
        out += [word[:-3] + "f", word[:-3] + "fe"]  # wolves -> wolf, knives -> knife
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])  # horses -> horse, ties -> tie
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])  # buses -> bus, glasses -> glass, benches -> bench
    return out


def _form_words(form: str, where: str) -> tuple[str, ...]:
    """The lower-case words of a surface form; only letters, digits, spaces and hyphens allowed."""
    if not isinstance(form, str):
        raise VocabularyError(f"{where}: a surface form must be a string, got {type(form).__name__}")
    words = tuple(w.lower() for w in _WORD.findall(form))
    if not words:
        raise VocabularyError(f"{where}: surface form {form!r} has no words")
    if _FORM_SEPARATORS.fullmatch(_WORD.sub("", form)) is None:
        raise VocabularyError(
            f"{where}: surface form {form!r} may hold only letters, digits, spaces and hyphens")
    return words


# --------------------------------------------------------------------------------------------
# the vocabulary


@dataclass(frozen=True)
class ObjectMention:
    """One object mention: its canonical category, the text as written and its character span."""

    category: str  # canonical category name, e.g. "dining table"
    surface: str  # the text as written, e.g. "Tables"
    start: int  # character offsets into the text: text[start:end] == surface
    end: int


class ObjectVocabulary:
    """Canonical object categories, the surface forms of each, and a parser that finds them.

    Args:
        synonyms: canonical category -> further surface forms (single or multi-word, singular).
            The category name itself is always a form. A bare string as the value is an error
            (it would read as a list of letters).
        name: what the vocabulary is called in reports and errors.
        phrases: extra multi-word forms -> category, or -> None for "no object" (the words are
            consumed so their parts do not count: CHAIR's "baby animal"). Optional.
        drop_if_present: category -> surface forms whose mentions are dropped when the same text
            also mentions that category (CHAIR's toilet/seat rule). Optional.

    Raises:
        VocabularyError: a form belongs to two categories (both are named), a form is empty or
            holds punctuation, or a phrase/drop rule names an unknown category or form.
    """

    def __init__(
        self,
        synonyms: Mapping[str, Iterable[str]],
        name: str = "custom",
        *,
        phrases: Mapping[str, str | None] | None = None,
        drop_if_present: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.name = name
        where = f"vocabulary {name!r}"
        if not isinstance(synonyms, Mapping):
            raise VocabularyError(f"{where}: synonyms must be a mapping category -> forms")
        # words -> (category or None, form as first given)
        self._lexicon: dict[tuple[str, ...], tuple[str | None, str]] = {}
        self._forms: dict[str, list[str]] = {}
        cats: list[str] = []
        for cat, forms in synonyms.items():
            if not isinstance(cat, str) or not cat.strip():
                raise VocabularyError(f"{where}: category names must be non-empty strings, got {cat!r}")
            if isinstance(forms, (str, bytes)) or not isinstance(forms, Iterable):
                raise VocabularyError(f"{where}: category {cat!r}: forms must be a list of strings, "
                                      f"got {type(forms).__name__}")
            cats.append(cat)
            self._forms[cat] = []
            for form in (cat, *forms):
                self._add(form, cat, f"{where}: category {cat!r}")
        self.categories: tuple[str, ...] = tuple(cats)
        for phrase, cat in (phrases or {}).items():
            if cat is not None and cat not in self._forms:
                raise VocabularyError(f"{where}: phrase {phrase!r} names unknown category {cat!r}")
            self._add(phrase, cat, f"{where}: phrase {phrase!r}")
        self._drop: dict[str, frozenset[tuple[str, ...]]] = {}
        for cat, forms in (drop_if_present or {}).items():
            if cat not in self._forms:
                raise VocabularyError(f"{where}: drop rule names unknown category {cat!r}")
            words = set()
            for form in forms:
                w = _form_words(form, f"{where}: drop rule for {cat!r}")
                if w not in self._lexicon:
                    raise VocabularyError(f"{where}: drop rule for {cat!r}: {form!r} is not a form")
                words.add(w)
            self._drop[cat] = frozenset(words)
        self._max_words = max((len(w) for w in self._lexicon), default=1)

    def _add(self, form: str, cat: str | None, where: str) -> None:
        words = _form_words(form, where)
        known = self._lexicon.get(words)
        if known is not None:
            if known[0] != cat:
                first = "no object" if known[0] is None else f"category {known[0]!r}"
                second = "no object" if cat is None else f"category {cat!r}"
                raise VocabularyError(
                    f"vocabulary {self.name!r}: {' '.join(words)!r} is a form of {first} and of "
                    f"{second}; a form must name one category")
            return  # the same form twice for one category
        self._lexicon[words] = (cat, form)
        if cat is not None:
            self._forms[cat].append(form)

    # ----------------------------------------------------------------------------------------

    def forms(self, category: str) -> tuple[str, ...]:
        """The surface forms of ``category`` (its name first), as given."""
        return tuple(self._forms[category])

    def __repr__(self) -> str:
        return f"ObjectVocabulary(name={self.name!r}, {len(self.categories)} categories)"

    def _match_at(self, tokens: list[tuple[str, int, int]], i: int, text: str,
                  lengths: Iterable[int]) -> tuple[int, str | None, tuple[str, ...]] | None:
        """Longest form starting at token ``i``: (number of words, category, form words)."""
        for n in lengths:
            if i + n > len(tokens):
                continue
            span = tokens[i:i + n]
            if any(_JOIN.fullmatch(text, span[k][2], span[k + 1][1]) is None for k in range(n - 1)):
                continue
            head = tuple(t[0] for t in span[:-1])
            for last in _singular_candidates(span[-1][0]):
                hit = self._lexicon.get((*head, last))
                if hit is not None:
                    return n, hit[0], (*head, last)
        return None

    @staticmethod
    def _tokens(text: str) -> list[tuple[str, int, int]]:
        return [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]

    def extract(self, text: str) -> list[ObjectMention]:
        """Every object mention in ``text``, in text order (see the module docstring for the rules)."""
        if not isinstance(text, str):
            raise TypeError(f"extract() needs a string, got {type(text).__name__}")
        tokens = self._tokens(text)
        found: list[tuple[ObjectMention, tuple[str, ...]]] = []
        i = 0
        lengths = range(self._max_words, 0, -1)
        while i < len(tokens):
            hit = self._match_at(tokens, i, text, lengths)
            if hit is None:
                i += 1
                continue
            n, cat, words = hit
            if cat is not None:
                start, end = tokens[i][1], tokens[i + n - 1][2]
                found.append((ObjectMention(cat, text[start:end], start, end), words))
            i += n
        if self._drop:
            present = {m.category for m, _ in found}
            drop = set().union(*(self._drop[c] for c in present if c in self._drop))
            found = [(m, w) for m, w in found if w not in drop]
        return [m for m, _ in found]

    def normalize(self, name: str) -> str | None:
        """The category ``name`` is a form of ("Dining Tables" -> "dining table"); None if none.

        The whole of ``name`` must be one form (its last word may be plural).
        """
        tokens = self._tokens(name)
        if not tokens:
            return None
        hit = self._match_at(tokens, 0, name, (len(tokens),))
        return None if hit is None else hit[1]

    # ----------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def coco(cls) -> ObjectVocabulary:
        """The 80 COCO categories with CHAIR's synonyms and special cases (module docstring)."""
        return _coco()

    @classmethod
    def from_names(cls, names: Iterable[str], name: str = "custom") -> ObjectVocabulary:
        """Each name its own category with no synonyms (e.g. AMBER's object words).

        Repeated names are one category (AMBER's truth lists repeat words, e.g. "ship", "ship").
        """
        if isinstance(names, (str, bytes)):
            raise VocabularyError(f"vocabulary {name!r}: names must be a list of strings, not one string")
        return cls({n: () for n in dict.fromkeys(names)}, name=name)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ObjectVocabulary:
        """Read ``{"category": ["synonym", ...], ...}``; every error names the file.

        The vocabulary is named after the file's stem.
        """
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as e:
            raise VocabularyError(f"{path}: cannot read the synonym file: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise VocabularyError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise VocabularyError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise VocabularyError(f"{path}: the top level must be an object mapping category -> list of "
                                  f"synonyms, got {type(obj).__name__}")
        for cat, forms in obj.items():
            if not isinstance(forms, list) or not all(isinstance(f, str) for f in forms):
                raise VocabularyError(f"{path}: category {cat!r}: synonyms must be a list of strings")
        try:
            return cls(obj, name=path.stem)
        except VocabularyError as e:
            raise VocabularyError(f"{path}: {e}") from None


@lru_cache(maxsize=1)
def _coco() -> ObjectVocabulary:
    return ObjectVocabulary(COCO_SYNONYMS, name="coco", phrases=CHAIR_PHRASES,
                            drop_if_present=CHAIR_DROP_IF_PRESENT)
