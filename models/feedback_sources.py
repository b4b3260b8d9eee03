"""Model-backed fine-grained feedback sources: a VLM judge, a zero-shot detector, a teacher LM.

Fine-grained AI feedback (FGAIF, Jing & Du 2024) splits a response into claims -- object
existence, attributes, relations -- and asks an AI model whether each one holds in the image;
the per-claim verdicts become per-segment labels ("hallucinated" / "correct" / "n/a"). The claim
extraction, the segment labelling and the template critique/refinement (DRESS-style) are model-free
and live in :mod:`mmalign.oracle`; this module supplies the models that give the verdicts:

* :class:`VLMJudgeSource` -- any image-text-to-text checkpoint (loaded through
  :class:`models.policy.HFPolicy`) answers each claim's yes/no question about the image,
  greedily, in left-padded batches; identical (image, question) pairs are asked once. Checking
  claims against its own description of the image (``questions="caption"``), it also scores
  helpfulness and names what the answer leaves out, as the oracle does, so every consumer of the
  oracle's feedback (the nlf and prefs stages) can take the judge's instead.
* :class:`DetectorSource` -- a zero-shot object detector (OWL-ViT / OWLv2 / Grounding-DINO) checks
  object existence only: each claimed object's category is a text query, the claim holds when
  the detector finds it with score >= ``threshold``. Attribute and relation segments are "n/a".
* :class:`TeacherCritic` -- optional: a text-only teacher LM rewrites the critique and the
  refinement from the per-segment labels (DRESS prompts GPT-4 with its annotations), with
  prompts read from ``configs/feedback/teacher.yaml``.

``mmalign`` never imports this module; the sources are loaded by class path.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from mmalign.feedback import (
    HALLUCINATION_TYPES,
    Claim,
    Feedback,
    FeedbackError,
    FeedbackItem,
    SegmentFeedback,
    check_feedback,
    check_items,
    item_where,
    prompt_text,
)
from mmalign.oracle import (
    EVIDENCE_PROMPT,
    _label_counts,
    _name,
    caption_verdict,
    coco_claims,
    critique_and_refinement,
    lookup_questions,
    lookup_verdict,
    segment_feedback,
    world_claims,
)
from mmalign.records import load_image
from mmalign.segments import DEFAULT_SEGMENTATION, check_segmentation
from mmalign.world import Mention, ParsedCaption, parse_caption, parse_yes_no
from models.policy import DTYPES

CLAIM_SETS = ("world", "coco")
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# shared helpers


def _claim_extractor(claims: str):
    if claims == "world":
        return world_claims
    if claims == "coco":
        from mmalign.eval.vocab import ObjectVocabulary

        vocab = ObjectVocabulary.coco()
        return lambda response: coco_claims(response, vocab)
    raise ValueError(f"claims must be one of {CLAIM_SETS}, got {claims!r}")


def _faithfulness(verdicts: Sequence[bool | None]) -> float:
    parsed = [v for v in verdicts if v is not None]
    return sum(parsed) / len(parsed) if parsed else 1.0


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def described_objects(evidence: ParsedCaption) -> list[Mention]:
    """The distinct objects a description names: its non-negated mentions, one per (colour,
    shape) -- the world's identity of an object -- in order of first mention. A mention without a
    colour ("the star") is the same object as a coloured one of its shape ("a red star") when the
    description has one. A counted mention ("two red circles") is one name, so one object here."""
    first: dict[tuple[str | None, str], Mention] = {}
    for m in evidence.mentions:
        if not m.negated:
            first.setdefault((m.color, m.shape), m)
    coloured = {shape for color, shape in first if color is not None}
    return [m for (color, shape), m in first.items() if color is not None or shape not in coloured]


def refers_to(mention: Mention, obj: Mention) -> bool:
    """A response's mention refers to a described object: not negated, the same shape and, where
    both state a colour, the same colour (size is the free attribute, as in the oracle's coverage)."""
    return (not mention.negated and mention.shape == obj.shape
            and (mention.color is None or obj.color is None or mention.color == obj.color))


def caption_helpfulness(response: str, evidence: ParsedCaption) -> tuple[float, list[str]]:
    """The judge's helpfulness of ``response`` against its description of the image, and the
    described objects the response leaves out, named as the oracle names a scene object ("red
    circle"; "star" when the description gives no colour), in order of description.

    helpfulness = referred / described objects (:func:`described_objects`, :func:`refers_to`);
    1.0 when the description names no object -- nothing is known to be missing.
    """
    described = described_objects(evidence)
    said = parse_caption(response).mentions
    missing = [o for o in described if not any(refers_to(m, o) for m in said)]
    share = 1.0 - len(missing) / len(described) if described else 1.0
    return share, [_name({"shape": o.shape, "color": o.color}) for o in missing]


# --------------------------------------------------------------------------------------------
# the VLM judge


class VLMJudgeSource:
    """FGAIF-style AI feedback: a judge VLM answers a yes/no question about each claim.

    Args:
        path: an image-text-to-text checkpoint (folder or hub id; a peft adapter folder works),
            loaded through :class:`models.policy.HFPolicy` in eval mode without gradients.
        claims: ``"world"`` (objects, attributes, relations of the synthetic world,
            :func:`mmalign.oracle.world_claims`) or ``"coco"`` (COCO object existence only,
            :func:`mmalign.oracle.coco_claims`).
        questions: ``"yesno"`` asks each claim's yes/no question ("Is there a star in the
            image?"); ``"lookup"`` (world claims) asks content questions ("What color is the
            star?", "What size is the red star?", "Where is the red star relative to the blue
            square?") and compares the answers with the claim in code, TIFA-style
            (:func:`mmalign.oracle.lookup_questions`, :func:`mmalign.oracle.lookup_verdict`);
            ``"caption"`` (world claims) asks the judge once per image to describe it and checks
            every claim against that description (:func:`mmalign.oracle.caption_verdict`).
        batch_size: questions per ``generate`` call.
        max_new_tokens: answer length (a yes/no needs few tokens; look-ups get at least 12).
        dtype: weights dtype ("float32" on CPU).
        trust_remote_code: run custom model code from the checkpoint.
        progress: tqdm bar over the questions when there is more than one batch.
        device: "cpu", "cuda", ...; None = cuda when available, else cpu.
        segmentation: how responses are cut into labelled segments (:mod:`mmalign.segments`:
            "released", the default, or "fine"); the feedback stage passes its ``--segmentation``.

    Per item: ``segments`` (labels from the verdicts: yes = holds, no = hallucinated, an
    unparseable answer = unknown), template ``critique`` / ``refinement``, ``scores`` =
    ``{"faithfulness": share of parsed verdicts that are yes}`` (1.0 with none), and ``meta``
    ``answers`` (the judge's raw answer per claim, in claim order), ``questions``,
    ``unparsed`` (how many answers were neither yes nor no) and, as the oracle writes them so a
    consumer reads the same keys from either source, ``hallucinated`` (per type, the claims
    judged false), ``claims`` (how many) and ``unverifiable`` (how many got no verdict).

    ``questions="caption"`` also gives what the oracle gives and the other modes cannot:
    ``scores["helpfulness"]`` = the share of the objects in the judge's description that the
    response refers to (:func:`caption_helpfulness`; 1.0 when the description names none), the
    described objects it leaves out named in the critique and refinement ("The answer does not
    mention the red circle."), and ``meta["description"]``. The description is asked for every
    item in this mode, with claims or without (an answer that says nothing is unhelpful).
    """

    name = "judge"

    def __init__(
        self,
        path: str,
        claims: Literal["world", "coco"] = "world",
        questions: Literal["yesno", "lookup", "caption"] = "yesno",
        batch_size: int = 64,
        max_new_tokens: int = 4,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        progress: bool = True,
        device: str | None = None,
        segmentation: str = DEFAULT_SEGMENTATION,
    ):
        from models.policy import HFPolicy

        self.segmentation = check_segmentation(segmentation)

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if questions not in ("yesno", "lookup", "caption"):
            raise ValueError(f"questions must be 'yesno', 'lookup' or 'caption', got {questions!r}")
        if questions != "yesno" and claims != "world":
            raise ValueError(f"questions={questions!r} verifies the world's claims: use claims='world'")
        self.extract = _claim_extractor(claims)
        self.claims = claims
        self.questions = questions
        if questions == "lookup":
            max_new_tokens = max(max_new_tokens, 12)
        elif questions == "caption":
            max_new_tokens = max(max_new_tokens, 128)
        self.path = str(path)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.policy = HFPolicy(self.path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.device = _device(device)
        self.policy.model.to(self.device).eval().requires_grad_(False)

    def ask(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """Greedy answers to ``(image path, question)`` pairs, in order; each distinct pair is
        asked once."""
        unique: dict[tuple[str, str], int] = {}
        for p in pairs:
            unique.setdefault((str(p[0]), p[1]), len(unique))
        answers = self._generate(list(unique))
        return [answers[unique[(str(p[0]), p[1])]] for p in pairs]

    def _generate(self, pairs: list[tuple[str, str]]) -> list[str]:
        from mmalign.eval.runner import generate_answers

        show = self.progress and len(pairs) > self.batch_size
        return generate_answers(self.policy, [(Path(i), q) for i, q in pairs], self.batch_size, self.max_new_tokens,
                                self.name, progress=show)[0]

    def annotate(self, items: Sequence[FeedbackItem]) -> list[Feedback]:
        items = list(items)
        check_items(self.name, items, f"the {self.name} feedback source checks claims against the image")
        per_item = [list(self.extract(it.response)) for it in items]
        if self.questions == "caption":
            # every item, claims or not: helpfulness needs the description either way
            plans = [[{"description": EVIDENCE_PROMPT}] for _ in per_item]
        elif self.questions == "lookup":
            plans = [[lookup_questions(c) for c in cs] for cs in per_item]
        if self.questions != "yesno":
            pairs = [(str(it.image), q) for it, ps in zip(items, plans) for p in ps for q in p.values()]
        else:
            pairs = [(str(it.image), c.question) for it, cs in zip(items, per_item) for c in cs]
        answers = iter(self.ask(pairs))
        feedback = []
        for k, (it, cs) in enumerate(zip(items, per_item)):
            scores: dict[str, float] = {}
            missing: list[str] = []
            extra: dict = {}
            if self.questions == "caption":
                description = next(answers)
                evidence = parse_caption(description)
                verdicts = [caption_verdict(c, evidence) for c in cs]
                ans = [description] * len(cs)
                questions = [EVIDENCE_PROMPT] * len(cs)
                scores["helpfulness"], missing = caption_helpfulness(it.response, evidence)
                extra["description"] = description
            elif self.questions == "lookup":
                got = [{key: next(answers) for key in p} for p in plans[k]]
                verdicts = [lookup_verdict(c, a) for c, a in zip(cs, got)]
                ans = [" | ".join(a.values()) for a in got]
                questions = [" | ".join(p.values()) for p in plans[k]]
            else:
                ans = [next(answers) for _ in cs]
                verdicts = [parse_yes_no(a) for a in ans]
                questions = [c.question for c in cs]
            segments = segment_feedback(it.response, cs, verdicts, self.segmentation)
            critique, refinement = critique_and_refinement(segments, missing)
            unknown = sum(v is None for v in verdicts)
            feedback.append(Feedback(
                id=it.id,
                scores={"faithfulness": _faithfulness(verdicts), **scores},
                critique=critique,
                refinement=refinement,
                meta={"answers": ans, "questions": questions, "unparsed": unknown, "judge": self.path,
                      "hallucinated": _label_counts(segments), "claims": len(cs), "unverifiable": unknown,
                      **extra},
                segments=segments,
            ))
        return check_feedback(items, feedback, self.name)


# --------------------------------------------------------------------------------------------
# the judge as FGAIF's segment rewards


class JudgeSegmentRewards:
    """The judge's per-segment verdicts as fine-grained rewards, scored online: -1 hallucinated,
    +1 correct, 0 n/a, for the segments of :func:`mmalign.segments.split_segments` with
    ``segmentation``. A drop-in for trained fine-grained reward models (it implements
    :class:`mmalign.rewards.SegmentRewardModel`), so FGAIF's PPO can take its rewards from the AI
    feedback itself, as the oracle control takes them from the scene graphs.

    Why it exists: a fine-grained reward model reads a verdict off one forward pass at a segment's
    last token, and a small model may not learn to verify a claim that way (the tiny test model
    stays at the "always hallucinated" prior; docs/RESULTS.md), while the same judge verifies well
    by describing the image and comparing the description with the claim (``questions="caption"``).
    One description per rollout image is generated per scoring call.

    Args:
        path: the judge checkpoint (as :class:`VLMJudgeSource`).
        questions, batch_size, max_new_tokens, dtype, trust_remote_code, device: as
            :class:`VLMJudgeSource`.
        segmentation: must be the policy's (PPO checks it).
    """

    types = HALLUCINATION_TYPES

    def __init__(self, path: str, questions: Literal["yesno", "lookup", "caption"] = "caption", batch_size: int = 64,
                 max_new_tokens: int = 4, dtype: str = "float32", trust_remote_code: bool = False,
                 device: str | None = None, segmentation: str = DEFAULT_SEGMENTATION):
        self.judge = VLMJudgeSource(path, questions=questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    dtype=dtype, trust_remote_code=trust_remote_code, progress=False, device=device,
                                    segmentation=segmentation)
        self.segmentation = self.judge.segmentation
        self.path = str(path)

    def segment_rewards(self, items: Sequence, mode: str = "label", batch_size: int = 16,
                        types: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per item and type the judge's ``(S_i,)`` segment rewards, one ``annotate`` call over all
        items (``mode`` and ``batch_size`` do not apply: the verdicts are labels, and the judge
        batches by its own ``batch_size``). An empty response has no segment."""
        from mmalign.rewards import rewards_from_labels

        types = list(types or self.types)
        out: list[dict[str, torch.Tensor]] = [{t: torch.zeros(0) for t in types} for _ in items]
        live = [(k, it) for k, it in enumerate(items) if it.response.strip()]
        for k, it in live:
            if not it.images or not isinstance(it.images[0], (str, Path)):
                raise FeedbackError(f"judge rewards: item {it.id!r} needs its image as a path (got "
                                    f"{type(it.images[0]).__name__ if it.images else 'no image'})")
        prompts = [it.prompt if isinstance(it.prompt, str) else prompt_text(it.prompt) for _, it in live]
        fbs = self.judge.annotate([FeedbackItem(id=str(it.id or k), prompt=q, response=it.response,
                                                image=str(it.images[0]))
                                   for (k, it), q in zip(live, prompts)])
        for (k, _), fb in zip(live, fbs):
            out[k] = rewards_from_labels(fb.segments, types)
        return out

    def to(self, device) -> JudgeSegmentRewards:
        self.judge.device = torch.device(device)
        self.judge.policy.model.to(self.judge.device)
        return self


# --------------------------------------------------------------------------------------------
# the zero-shot detector


def _find(seq: Sequence[int], sub: Sequence[int], last: bool = False) -> int | None:
    """Offset of ``sub`` in ``seq`` (first or last occurrence), or None."""
    n = len(sub)
    if n == 0:
        return None
    starts = range(len(seq) - n, -1, -1) if last else range(len(seq) - n + 1)
    return next((i for i in starts if list(seq[i: i + n]) == list(sub)), None)


def claim_category(claim: Claim) -> str:
    """The object category an object claim is about (from its ``meta``)."""
    meta = claim.meta or {}
    for key in ("category", "object", "shape", "name"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
    raise ValueError(f"object claim {claim.text!r} names no category in its meta (looked for 'category', "
                     f"'object', 'shape', 'name'; got {dict(meta)})")


class DetectorSource:
    """Object existence checked by a zero-shot object detector (OWL-ViT / OWLv2 / Grounding-DINO).

    Args:
        path: a checkpoint loadable by ``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``.
        claims: ``"world"`` or ``"coco"`` (as for :class:`VLMJudgeSource`); only the object
            claims are checked -- a detector cannot check attributes or relations, so those
            segment labels are "n/a".
        threshold: an object claim holds when the detector's best box for its category scores
            at least this.
        batch_size: images per forward pass.
        query_template: the text query for a category; default "a photo of a {}" (OWL-ViT's
            prompts) for the OWL family, "a {}" for Grounding-DINO.
        trust_remote_code: run custom model code from the checkpoint.
        device: "cpu", "cuda", ...; None = cuda when available, else cpu.
        segmentation: how responses are cut into labelled segments (:mod:`mmalign.segments`).

    Scores: ``faithfulness`` = share of object claims found (1.0 with none). ``meta``:
    ``detections`` = {category: best score}, ``unchecked`` = number of attribute/relation claims.

    Processors: in transformers 5.x ``AutoProcessor`` falls back to the Pillow image processors
    (``OwlViTImageProcessorPil``, ...) when torchvision is missing, so no workaround is needed
    for the OWL family.
    """

    name = "detector"

    def __init__(
        self,
        path: str,
        claims: Literal["world", "coco"] = "world",
        threshold: float = 0.1,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        query_template: str | None = None,
        device: str | None = None,
        segmentation: str = DEFAULT_SEGMENTATION,
    ):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.segmentation = check_segmentation(segmentation)

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.extract = _claim_extractor(claims)
        self.claims = claims
        self.path = str(path)
        self.threshold = threshold
        self.batch_size = batch_size
        if not Path(self.path).exists() and (Path(self.path).is_absolute() or self.path.startswith(".")
                                             or self.path.count("/") != 1):
            raise FileNotFoundError(f"detector model {self.path!r}: no such folder")
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.path, trust_remote_code=trust_remote_code,
                                                                        use_safetensors=True)
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.device = _device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        # OWL-ViT / OWLv2: logits are (images, boxes, text queries); others (Grounding-DINO)
        # score the tokens of one merged text per image (see _detect_grounded).
        self._per_query = self.model.config.model_type in ("owlvit", "owlv2")
        if query_template is None:
            query_template = "a photo of a {}" if self._per_query else "a {}"
        if "{}" not in query_template:
            raise ValueError(f"query_template must contain '{{}}' for the category, got {query_template!r}")
        self.query_template = query_template

    @torch.no_grad()
    def detect(self, images: Sequence[str], categories: Sequence[Sequence[str]],
               where: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Best detection score of each category in each image (``where``: names for errors)."""
        if where is None:
            where = [f"{self.name}: image {k}" for k in range(len(images))]
        out: list[dict[str, float]] = []
        for s in range(0, len(images), self.batch_size):
            paths, cats = images[s: s + self.batch_size], categories[s: s + self.batch_size]
            pil = [load_image(p, w) for p, w in zip(paths, where[s: s + self.batch_size])]
            queries = [[self.query_template.format(c) for c in cs] for cs in cats]
            if self._per_query:
                inputs = self.processor(text=queries, images=pil, return_tensors="pt", truncation=True)
                inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                logits = self.model(**inputs).logits.float()  # (images, boxes, max queries)
                best = torch.sigmoid(logits).amax(dim=1).cpu()
                out += [{c: float(best[i, q]) for q, c in enumerate(cs)} for i, cs in enumerate(cats)]
            else:
                out += self._detect_grounded(pil, queries, cats)
        return out

    def _detect_grounded(self, pil, queries, cats) -> list[dict[str, float]]:
        """Grounding-DINO style: one text per image ("a star. a circle."), logits over its
        tokens. A category's score is the best box's highest probability on the category's own
        tokens inside its query (the template words are shared by all queries)."""
        tok = self.processor.tokenizer
        inputs = self.processor(images=pil, text=queries, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        probs = torch.sigmoid(self.model(**inputs).logits.float()).cpu()  # (images, boxes, text tokens)
        ids = inputs["input_ids"].tolist()
        out = []
        for b, (qs, cs) in enumerate(zip(queries, cats)):
            best = {}
            for q, c in zip(qs, cs):
                q_ids = tok(q, add_special_tokens=False)["input_ids"]
                c_ids = tok(c, add_special_tokens=False)["input_ids"]
                at, within = _find(ids[b], q_ids), _find(q_ids, c_ids, last=True)
                if at is None or within is None:
                    raise ValueError(f"{self.name}: cannot find the tokens of query {q!r} in the detector's text "
                                     f"input (truncated? lower batch_size or use fewer categories)")
                first = at + within
                if first + len(c_ids) > probs.shape[-1]:
                    raise ValueError(f"{self.name}: query {q!r} lies past the detector's text length "
                                     f"{probs.shape[-1]}")
                best[c] = float(probs[b, :, first: first + len(c_ids)].max())
            out.append(best)
        return out

    def annotate(self, items: Sequence[FeedbackItem]) -> list[Feedback]:
        items = list(items)
        check_items(self.name, items, f"the {self.name} feedback source checks claims against the image")
        per_item = [list(self.extract(it.response)) for it in items]
        objects = [[c for c in cs if c.type == "object"] for cs in per_item]
        cats = [list(dict.fromkeys(claim_category(c) for c in obj)) for obj in objects]
        todo = [i for i, cs in enumerate(cats) if cs]
        found = self.detect([str(items[i].image) for i in todo], [cats[i] for i in todo],
                            [item_where(items[i]) for i in todo])
        scores: list[dict[str, float]] = [{} for _ in items]
        for i, f in zip(todo, found):
            scores[i] = f
        feedback = []
        for it, obj, cs, det in zip(items, objects, per_item, scores):
            verdicts = [det[claim_category(c)] >= self.threshold for c in obj]
            segments = segment_feedback(it.response, obj, verdicts, self.segmentation)
            critique, refinement = critique_and_refinement(segments)
            feedback.append(Feedback(
                id=it.id,
                scores={"faithfulness": _faithfulness(verdicts)},
                critique=critique,
                refinement=refinement,
                meta={"detections": det, "threshold": self.threshold, "unchecked": len(cs) - len(obj),
                      "detector": self.path},
                segments=segments,
            ))
        return check_feedback(items, feedback, self.name)


# --------------------------------------------------------------------------------------------
# the teacher critic


TEACHER_FIELDS = ("question", "response", "labels")
TEACHER_KEYS = ("critique_prompt", "refinement_prompt")
DEFAULT_TEACHER_PROMPTS = "configs/feedback/teacher.yaml"


def _template_fields(template: str, where: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{where}: not a valid format string: {e}") from None


def load_teacher_prompts(path: str | Path) -> dict[str, str]:
    """``{"critique_prompt": ..., "refinement_prompt": ...}`` from a YAML file, checked: both
    keys present, strings, no other keys, fields only ``{question}``, ``{response}``, ``{labels}``."""
    import yaml

    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    if not p.is_file():
        raise FileNotFoundError(f"teacher prompt file {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping with keys {list(TEACHER_KEYS)}, got {type(data).__name__}")  # noqa: TRY004
    missing = [k for k in TEACHER_KEYS if k not in data]
    if missing:
        raise ValueError(f"{p}: missing key(s) {missing}; a teacher prompt file needs {list(TEACHER_KEYS)}")
    extra = sorted(str(k) for k in data if k not in TEACHER_KEYS)
    if extra:
        raise ValueError(f"{p}: unknown key(s) {extra}; allowed: {list(TEACHER_KEYS)}")
    for key in TEACHER_KEYS:
        if not isinstance(data[key], str) or not data[key].strip():
            raise ValueError(f"{p}: {key} must be a non-empty string")
        unknown = sorted(f for f in _template_fields(data[key], f"{p}: {key}") if f not in TEACHER_FIELDS)
        if unknown:
            raise ValueError(f"{p}: {key} has unknown field(s) {unknown}; allowed: {list(TEACHER_FIELDS)} "
                             "(write a literal brace as {{ or }})")
    return {k: data[k] for k in TEACHER_KEYS}


def format_labels(segments: Sequence[SegmentFeedback]) -> str:
    """One line per segment: ``1. "<text>" -- object: correct; attribute: hallucinated; ...``."""
    lines = []
    for n, seg in enumerate(segments, 1):
        labels = "; ".join(f"{k}: {v}" for k, v in seg.labels.items())
        lines.append(f'{n}. "{seg.text.strip()}" -- {labels}')
    return "\n".join(lines) if lines else "(no segments)"


class TeacherCritic:
    """Critique and refinement written by a text-only teacher LM from per-segment labels.

    DRESS (Chen et al. 2023) prompts GPT-4 with the annotations to write its natural-language
    feedback; here any causal LM given by path does it, greedily. The prompts are ``str.format``
    templates from a YAML file (``critique_prompt``, ``refinement_prompt``) with the fields
    ``{question}``, ``{response}`` and ``{labels}`` (:func:`format_labels` of the segments).

    Args:
        path: causal LM checkpoint (``AutoModelForCausalLM`` + ``AutoTokenizer``).
        prompt_file: the YAML file of the two templates (relative paths are tried against the
            working directory, then the repository root).
        max_new_tokens: length of each generation.
        trust_remote_code: run custom model code from the checkpoint.
        device: "cpu", "cuda", ...; None = cuda when available, else cpu.
    """

    def __init__(self, path: str, prompt_file: str = DEFAULT_TEACHER_PROMPTS, max_new_tokens: int = 96,
                 trust_remote_code: bool = False, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prompts = load_teacher_prompts(prompt_file)
        self.path = str(path)
        self.max_new_tokens = max_new_tokens
        self.model = AutoModelForCausalLM.from_pretrained(self.path, trust_remote_code=trust_remote_code,
                                                          use_safetensors=True)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"teacher model {self.path!r}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = _device(device)
        self.model.to(self.device).eval().requires_grad_(False)

    def prompt_texts(self, item: FeedbackItem, fb: Feedback) -> tuple[str, str]:
        """The critique and refinement prompts for ``item`` (before any chat template)."""
        segments = getattr(fb, "segments", None)
        if segments is None:
            raise FeedbackError(f"{item_where(item)}: the teacher critic needs per-segment labels "
                                "(Feedback.segments), and this feedback has none")
        fields = {"question": item.prompt, "response": item.response, "labels": format_labels(segments)}
        return (self.prompts["critique_prompt"].format(**fields), self.prompts["refinement_prompt"].format(**fields))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
            add_special = False
        else:
            texts, add_special = [p + "\n\n" for p in prompts], True
        batch = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special)
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
        return [t.strip() for t in tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]

    def rewrite(self, item: FeedbackItem, fb: Feedback) -> Feedback:
        """``fb`` with its critique and refinement replaced by the teacher's."""
        if fb.id != item.id:
            raise FeedbackError(f"teacher critic: feedback {fb.id!r} does not belong to item {item.id!r}")
        critique, refinement = self.generate(self.prompt_texts(item, fb))
        return dataclasses.replace(fb, critique=critique, refinement=refinement,
                                   meta={**fb.meta, "teacher": self.path})

    def rewrite_all(self, items: Sequence[FeedbackItem], feedback: Sequence[Feedback]) -> list[Feedback]:
        if len(items) != len(feedback):
            raise FeedbackError(f"teacher critic: {len(feedback)} feedback entries for {len(items)} items")
        return [self.rewrite(it, fb) for it, fb in zip(items, feedback)]


__all__ = [
    "DetectorSource",
    "TeacherCritic",
    "VLMJudgeSource",
    "caption_helpfulness",
    "claim_category",
    "described_objects",
    "format_labels",
    "load_teacher_prompts",
    "refers_to",
]
