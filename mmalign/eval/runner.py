"""Run a checkpoint on a benchmark and write metrics, generations, a report and a chart.

A *benchmark* is a list of :class:`EvalItem` s, each a (image, prompt) to answer plus what is
needed to score the answer; builders exist for the synthetic world (:func:`world_benchmark`)
and for the published formats (:func:`pope_benchmark`, :func:`coco_chair_benchmark`,
:func:`amber_benchmark`). All of them go through the same generation and scoring code, so the
synthetic path tests the real one.

The policy is loaded by class path (default ``models.policy.HFPolicy``) at run time: ``mmalign``
itself imports no model code (docs/ARCHITECTURE.md), and any :class:`mmalign.policy.Policy`
implementation can be evaluated.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mmalign import world as W
from mmalign.collators import VisionChatCollator, to_device
from mmalign.conditions import with_condition
from mmalign.eval import summary as S
from mmalign.eval.pope import STRATEGIES
from mmalign.eval.vocab import ObjectVocabulary
from mmalign.eval.world_bench import (
    CAPTION_PROMPT,
    reference_stats,
    score_caption,
    world_questions,
    world_vocabulary,
)
from mmalign.health import health_row
from mmalign.records import RecordError, load_image, read_scenes, resolve_image_path
from mmalign.shard import Parts, Shard
from mmalign.stage import StageOutput, atomic_write_jsonl, atomic_write_text, read_jsonl

DEFAULT_POLICY = "models.policy.HFPolicy"
DEFAULT_JUDGE = "models.judge.MMHalJudge"

@dataclass
class EvalItem:
    """One prompt to answer and score.

    ``kind`` is ``"caption"`` (free text scored by ``Benchmark.scorers[section]``) or ``"yesno"``
    (parsed with :func:`mmalign.world.parse_yes_no`, compared with ``label``). ``truth`` is
    whatever the section's scorer needs (a scene, a set of objects); ``reference`` a reference
    answer for the judge.
    """

    id: str
    section: str
    image: Path
    prompt: str
    kind: str
    label: bool | None = None
    truth: Any = None
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    items: list[EvalItem]
    #: section -> name in :data:`mmalign.eval.summary.METRIC_SETS`
    metric_sets: dict[str, str]
    #: caption section -> (item, generation) -> per-item score columns
    scorers: dict[str, Callable[[EvalItem, str], dict[str, int]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: Benchmark) -> Benchmark:
        clash = set(self.metric_sets) & set(other.metric_sets)
        if clash:
            raise ValueError(f"two benchmarks both have sections {sorted(clash)}")
        return Benchmark(f"{self.name}+{other.name}", self.items + other.items,
                         {**self.metric_sets, **other.metric_sets}, {**self.scorers, **other.scorers},
                         {**self.info, **other.info})


# ---------------------------------------------------------------------------------------------
# benchmark builders


def world_benchmark(data: Path, split: str = "test", limit: int = 0, seed: int = 0,
                    kinds: Sequence[str] = ("existence", "attribute", "relation"),
                    strategies: Sequence[str] = STRATEGIES, captions: bool = True,
                    prompt: str = CAPTION_PROMPT) -> Benchmark:
    """Captions of every held-out scene + POPE-style yes/no splits, from the data stage's folder.

    Popular/adversarial negatives are ranked by frequencies over the *train* split's scenes
    (the priors a model could have learned); without a train split, over the evaluated scenes.
    """
    data = Path(data)
    scenes_file = data / split / "scenes.jsonl"
    if not scenes_file.exists():
        raise FileNotFoundError(f"{scenes_file}: no such file; is {data} the data stage's folder (make data)?")
    scenes = read_scenes(scenes_file)[: limit or None]
    train_file = data / "train" / "scenes.jsonl"
    stats_from = train_file if train_file.exists() and split != "train" else scenes_file
    stats = reference_stats(s for s, _ in (read_scenes(stats_from) if stats_from != scenes_file else scenes))
    by_image = {img: s for s, img in scenes}
    paths = {img: resolve_image_path(img, data, f"{scenes_file}: {s.scene_id}") for s, img in scenes}
    vocab = world_vocabulary()
    items: list[EvalItem] = []
    metric_sets: dict[str, str] = {}
    if captions:
        metric_sets["captions"] = "world_caption"
        for s, img in scenes:
            items.append(EvalItem(f"captions/{s.scene_id}", "captions", paths[img], prompt, "caption",
                                  truth=s, reference=W.detailed_caption(s), meta={"scene_id": s.scene_id}))
    for section, qs in world_questions(by_image, stats, seed=seed, kinds=kinds, strategies=strategies).items():
        metric_sets[section] = "yesno"
        for q in qs:
            items.append(EvalItem(f"{section}/{q.question_id}", section, paths[q.image], q.text, "yesno",
                                  label=q.label, meta={**q.meta, "scene_id": by_image[q.image].scene_id}))
    return Benchmark("world", items, metric_sets,
                     {"captions": lambda it, g: score_caption(g, it.truth, vocab, it.reference)},
                     {"world": {"data": str(data), "split": split, "scenes": len(scenes),
                                "frequencies_from": str(stats_from)}})


def _image(images: Path, name: str, where: str) -> Path:
    p = resolve_image_path(name, images, where)
    if not p.is_file():
        raise RecordError(f"{where}: image {name!r} not found in {images}")
    return p


def pope_benchmark(files: Sequence[Path], images: Path) -> Benchmark:
    """POPE question files (one section per file, named by its stem)."""
    from mmalign.eval.formats import read_pope_questions

    items, sets = [], {}
    for f in files:
        section = Path(f).stem
        sets[section] = "yesno"
        for q in read_pope_questions(f):
            items.append(EvalItem(f"{section}/{q.question_id}", section,
                                  _image(images, q.image, f"{f}: question_id {q.question_id}"), q.text, "yesno",
                                  label=q.label, meta={"question_id": q.question_id}))
    return Benchmark("pope", items, sets, info={"pope": [str(f) for f in files]})


def _object_row(mentions: Sequence[str], truth: set[str], likely: set[str] | None = None) -> dict[str, int]:
    hallucinated = [m for m in mentions if m not in truth]
    row = {"obj_mentions": len(mentions), "obj_hallucinated": len(hallucinated), "obj_any": int(bool(hallucinated)),
           "obj_gt": len(truth), "obj_covered": len(set(mentions) & truth)}
    if likely is not None:
        row.update(obj_cog=len(set(mentions) & likely), obj_cog_listed=len(likely))
    return row


def coco_chair_benchmark(instances: Path, images: Path, limit: int = 0, prompt: str = CAPTION_PROMPT) -> Benchmark:
    """CHAIR on COCO: caption every image of an ``instances_*.json`` (sorted by id; ``limit``
    first ones) and check the mentions against its annotated categories."""
    from mmalign.eval.formats import read_coco_instances

    coco = read_coco_instances(instances)
    vocab = ObjectVocabulary.coco()
    items = []
    for image_id in sorted(coco.images)[: limit or None]:
        im = coco.images[image_id]
        items.append(EvalItem(f"chair/{image_id}", "chair", _image(images, im.file_name, f"{instances}: image {image_id}"),
                              prompt, "caption", truth=set(im.categories),
                              reference="Objects in the image: " + ", ".join(sorted(im.categories)) + "."))

    def score(it: EvalItem, g: str) -> dict[str, int]:
        return _object_row([m.category for m in vocab.extract(g)], it.truth)

    return Benchmark("coco-chair", items, {"chair": "object_caption"}, {"chair": score}, {"coco_instances": str(instances)})


def amber_benchmark(queries: Path, annotations: Path, images: Path, limit: int = 0) -> Benchmark:
    """AMBER: generative queries scored with Cover/Hal/Cog against the annotated ``truth`` and
    ``hallu`` objects; discriminative queries as yes/no sections per dimension."""
    from mmalign.eval.formats import read_amber_annotations, read_amber_queries

    qs = read_amber_queries(queries)[: limit or None]
    ann = read_amber_annotations(annotations)
    names = {w for a in ann.values() for w in (*(a.truth_objects or ()), *(a.hallu_objects or ()))}
    vocab = ObjectVocabulary.from_names(sorted(names), name="amber")
    items, sets = [], {}
    for q in qs:
        where = f"{queries}: id {q.id}"
        if q.id not in ann:
            raise RecordError(f"{where}: no annotation with this id in {annotations}")
        a = ann[q.id]
        img = _image(images, q.image, where)
        if a.type == "generative":
            sets["amber_generative"] = "amber_caption"
            items.append(EvalItem(f"amber_generative/{q.id}", "amber_generative", img, q.query, "caption",
                                  truth=(set(a.truth_objects), set(a.hallu_objects or ())),
                                  reference="Objects in the image: " + ", ".join(a.truth_objects) + "."))
        else:
            section = f"amber_{a.dimension or 'discriminative'}"
            sets[section] = "yesno_amber"
            items.append(EvalItem(f"{section}/{q.id}", section, img, q.query, "yesno", label=a.label,
                                  meta={"type": a.type}))

    def score(it: EvalItem, g: str) -> dict[str, int]:
        truth, likely = it.truth
        return _object_row([m.category for m in vocab.extract(g)], truth, likely)

    return Benchmark("amber", items, sets, {"amber_generative": score}, {"amber": [str(queries), str(annotations)]})


# ---------------------------------------------------------------------------------------------
# generation


#: a prompt: (image, question text), or (image, a whole conversation ending with a user turn whose
#: first user turn holds the one image part)
Prompt = tuple[Path, str | Sequence[dict]]


class _Prompts(Dataset):
    """(image, text) prompts as one-turn chats, ``condition`` (DRESS; :mod:`mmalign.conditions`)
    before the text of the first user turn; an empty condition leaves the messages as they were.
    A prompt whose second element is a list of messages is used as it is (plus the condition)."""

    def __init__(self, prompts: Sequence[Prompt], condition: str = ""):
        self.prompts = prompts
        self.condition = condition

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        image, text = self.prompts[i]
        if isinstance(text, str):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        else:
            messages = [dict(m) for m in text]
        if self.condition:
            messages = with_condition(messages, self.condition, turn="first")
        return {"images": [load_image(image, str(image))], "messages": messages,
                "meta": {"id": f"prompt-{i}", "source": str(image)}}


def generate_answers(policy: Any, prompts: Sequence[Prompt], batch_size: int, max_new_tokens: int,
                     desc: str, progress: bool = True, condition: str = "") -> tuple[list[str], float]:
    """Greedy answers in prompt order, and the seconds it took. Batches are left-padded
    (:class:`VisionChatCollator` in generate mode), moved to the policy's device; images are
    decoded lazily, per batch. ``condition`` (empty: none) goes before the first user text of
    every prompt, as a conditioned model (DRESS) is asked at inference."""
    from tqdm.auto import tqdm

    if not prompts:
        return [], 0.0
    collator = VisionChatCollator(policy.processor, max_length=1 << 16, mode="generate", on_overlength="error")
    loader = DataLoader(_Prompts(prompts, condition), batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(policy.parameters()).device
    out: list[str] = []
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress,
                               file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in loader:
            texts = policy.generate(to_device(batch, device), max_new_tokens=max_new_tokens)
            out += texts
            bar.update(len(texts))
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# scoring


def score(benchmark: Benchmark, generations: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per item: identity, prompt, generation and every score column."""
    rows = []
    for it in benchmark.items:
        g = generations[it.id]
        row: dict[str, Any] = {"id": it.id, "section": it.section, "image": str(it.image), "prompt": it.prompt,
                               "generation": g}
        if it.kind == "caption":
            row["reference"] = it.reference
            row.update(benchmark.scorers[it.section](it, g))
            row.update(health_row(g))
        else:
            pred = W.parse_yes_no(g)
            row.update(label=it.label, prediction=pred, **S.yesno_row(pred, bool(it.label)))
        row.update({k: v for k, v in it.meta.items() if k not in row})
        rows.append(row)
    return rows


def summarize_sections(rows: Sequence[Mapping[str, Any]], metric_sets: Mapping[str, str], n_boot: int,
                       seed: int = 0) -> dict[str, Any]:
    by_section: dict[str, list] = defaultdict(list)
    for r in rows:
        by_section[r["section"]].append(r)
    out = {}
    for section, set_name in metric_sets.items():
        rs = by_section.get(section, [])
        metrics = S.METRIC_SETS[set_name] + (S.JUDGE if rs and "judge_rating" in rs[0] else ())
        m = S.summarize(rs, metrics, n_boot=n_boot, seed=seed)
        if set_name.endswith("caption") and rs:
            texts = [r["generation"] for r in rs]
            m["distinct_1"] = S.distinct_ci(texts, 1, n_boot=n_boot, seed=seed)
            m["distinct_2"] = S.distinct_ci(texts, 2, n_boot=n_boot, seed=seed)
        out[section] = {"metric_set": set_name, "n": len(rs), "metrics": m}
    return out


def machine() -> str:
    return f"{platform.node() or 'unknown'} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()})"


def evaluate(policy: Any, benchmark: Benchmark, out: Path, settings: Mapping[str, Any], *, inputs: Sequence[Path] = (),
             judge: Any = None, n_boot: int = 1000, progress: bool = True,
             parts: Parts | None = None) -> dict[str, Any] | None:
    """Generate, score and write ``metrics.json``, ``report.md``, ``generations.jsonl`` and
    ``chart.png`` into ``out`` (atomically, with a manifest). Returns the metrics document.

    With ``parts`` (:mod:`mmalign.shard`) every rank calls this: the distinct prompts of each kind
    are cut into generation batches, batch ``b`` runs on rank ``b % N`` (and the judge's batches
    likewise), rank 0 merges in prompt order, scores and writes; the other ranks return None.
    A batch is the same batch on any number of ranks, so the output is too.
    """
    from tqdm.auto import tqdm

    from mmalign.eval.report import markdown_report, plot_report

    parts = parts if parts is not None else Parts(Shard(), None, "")
    shard = parts.shard
    gens: dict[str, str] = {}
    throughput: dict[str, Any] = {}
    # DRESS: the condition a conditioned model is asked with (settings["condition"]; absent = none),
    # before the prompts of settings["condition_kinds"] only (absent: every kind, as before the option)
    condition = settings.get("condition") or ""
    condition_kinds = settings.get("condition_kinds") or ("caption", "yesno")
    yesno_bs = settings.get("yesno_batch_size", settings["batch_size"])
    for kind, max_new, bs in (("caption", settings["max_new_tokens"], settings["batch_size"]),
                              ("yesno", settings["yesno_max_new_tokens"], yesno_bs)):
        its = [it for it in benchmark.items if it.kind == kind]
        # Identical (image, prompt) pairs are answered once: the POPE splits share their positives.
        unique = list(dict.fromkeys((it.image, it.prompt) for it in its))
        desc = "captions" if kind == "caption" else "yes/no"
        n_mine = shard.items_mine(len(unique), bs)
        with tqdm(total=n_mine, desc=desc if shard.world == 1 else f"{desc} (rank 0 of {shard.world})",
                  unit="prompt", disable=not progress or not shard.is_main or not unique, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            # defaults bind this iteration's values (the closure runs within it anyway)
            def answer(_: int, chunk: list, max_new: int = max_new, bs: int = bs, desc: str = desc,
                       bar: Any = bar) -> list[str]:
                texts = generate_answers(policy, chunk, bs, max_new, desc, False,
                                         condition if kind in condition_kinds else "")[0]
                bar.update(len(chunk))
                return texts

            # the judge (below) rates captions on every rank, so every rank needs them
            merged = parts.map(kind, unique, bs, answer, to="all" if kind == "caption" and judge is not None else "main")
        if merged is None:
            continue
        lookup = dict(zip(unique, merged.results))
        gens.update({it.id: lookup[(it.image, it.prompt)] for it in its})
        if unique:
            secs = merged.seconds
            throughput[kind] = {"prompts": len(unique), "items": len(its), "seconds": round(secs, 2),
                                "per_second": round(len(unique) / secs, 2) if secs else None, "ranks": shard.world}
    ratings = _judge(judge, benchmark, gens, parts) if judge is not None else None
    if not shard.is_main:
        return None
    rows = score(benchmark, gens)
    if condition:
        kind_of = {it.id: it.kind for it in benchmark.items}
        for r in rows:
            if kind_of[r["id"]] in condition_kinds:
                r["condition"] = condition
    if ratings is not None:
        for r in rows:
            if r["id"] in ratings:
                r["judge_rating"] = ratings[r["id"]]
                r["judge_hallucination"] = float(ratings[r["id"]] < 3)
    doc = {
        "benchmark": benchmark.name,
        "model": settings.get("model"),
        "settings": dict(settings),
        "info": benchmark.info,
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "throughput": throughput,
        "sections": summarize_sections(rows, benchmark.metric_sets, n_boot, settings.get("seed", 0)),
    }
    with StageOutput(out, stage="eval", config=settings, inputs=inputs) as st:
        atomic_write_jsonl(st.path / "generations.jsonl", rows)
        atomic_write_text(st.path / "metrics.json", json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(st.path / "report.md", _with_condition_line(markdown_report(doc), settings))
        plot_report(doc, st.path / "chart.png")
        for section, s in doc["sections"].items():
            st.count(f"items/{section}", s["n"])
        st.info["ranks"] = shard.world
    parts.cleanup()
    return doc


def _with_condition_line(md: str, settings: Mapping[str, Any]) -> str:
    """The report with a line saying which condition the prompts carried (after its first paragraph)."""
    condition = settings.get("condition") or ""
    if not condition and not settings.get("condition_source"):
        return md
    head, sep, rest = md.partition("\n\n")
    head2, sep2, rest2 = rest.partition("\n\n")
    source = settings.get("condition_source") or ""
    if condition:
        kinds = settings.get("condition_kinds") or ("caption", "yesno")
        which = {("caption",): "every caption prompt", ("yesno",): "every yes/no prompt"}.get(tuple(kinds),
                                                                                             "every prompt")
        line = f"Condition (DRESS, before the first user text of {which}): `{condition}`"
        line += f" (from {source})." if source else "."
    else:
        line = f"Condition: none ({source})."
    return head + sep + head2 + sep2 + line + "\n\n" + rest2


def _judge(judge: Any, benchmark: Benchmark, gens: Mapping[str, str], parts: Parts) -> dict[str, float] | None:
    """Rate every caption with a feedback source (MMHal-Bench style, 0-6 against the reference):
    item id -> rating on rank 0, None on the others. One ``annotate`` call per judge batch
    (``judge.batch_size``, else 16 captions), spread over the ranks like the generation batches."""
    from mmalign.feedback import FeedbackItem, check_feedback

    caps = [it for it in benchmark.items if it.kind == "caption"]
    items = [FeedbackItem(id=it.id, prompt=it.prompt, response=gens[it.id], image=str(it.image),
                          reference=it.reference) for it in caps]

    def rate(_: int, chunk: list) -> list[float]:
        return [f.scores["mmhal_rating"] for f in check_feedback(chunk, judge.annotate(chunk))]

    merged = parts.map("judge", items, int(getattr(judge, "batch_size", 0) or 16), rate)
    return None if merged is None else {it.id: r for it, r in zip(items, merged.results)}


# ---------------------------------------------------------------------------------------------
# comparing runs


def load_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = Path(run)
    for name in ("metrics.json", "generations.jsonl"):
        if not (run / name).exists():
            raise FileNotFoundError(f"{run / name}: missing; is {run} the output folder of `mmalign eval`?")
    return json.loads((run / "metrics.json").read_text()), read_jsonl(run / "generations.jsonl")


def compare_runs(runs: Sequence[Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each run's metrics, and every later run's paired difference from the first (the baseline),
    per section they share."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs (the first is the baseline)")
    loaded = [load_run(r) for r in runs]
    base_doc, base_rows = loaded[0]
    shared = [s for s in base_doc["sections"] if all(s in d["sections"] for d, _ in loaded[1:])]
    if not shared:
        raise ValueError("the runs share no section (were they evaluated on the same benchmark?)")

    def section_rows(rows: list, section: str) -> list:
        return [r for r in rows if r["section"] == section]

    diffs: dict[str, dict[str, Any]] = {}
    for run, (doc, rows) in zip(runs[1:], loaded[1:]):
        per = {}
        for section in shared:
            metrics = S.METRIC_SETS[base_doc["sections"][section]["metric_set"]]
            if section_rows(rows, section) and "judge_rating" in section_rows(rows, section)[0]:
                metrics = metrics + S.JUDGE
            per[section] = S.paired_diff(section_rows(base_rows, section), section_rows(rows, section), metrics,
                                         n_boot=n_boot, seed=seed)
        diffs[str(run)] = per
    return {"runs": [str(r) for r in runs], "baseline": str(runs[0]), "sections": shared,
            "metrics": {str(r): d for r, (d, _) in zip(runs, loaded)}, "diffs": diffs}
