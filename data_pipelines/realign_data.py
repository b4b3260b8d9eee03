"""The ``realign_data`` stage: Re-Align's dual-preference pairs (rejected text + retrieved rejected image).

    python -m data_pipelines.realign_data --data runs/demo/data --index runs/demo/index --split train \\
        --tasks detailed_caption --k 10 --out runs/demo/realign-data \\
        --model runs/demo/sft/model [--rejected refill] [--refill-mode infill|prompt] \\
        [--text-model PATH] [--max-similarity 0.95] [--kinds object,attribute,relation]
    python -m data_pipelines.realign_data ... --rejected injection [--select first-different|top1] [--seed 0]

Re-Align (Xing et al. 2025, "Re-Align: Aligning Vision Language Models via Retrieval-Augmented
Direct Preference Optimization") trains rDPO on a *dual* preference per (image, question):

* textual: the chosen answer is preferred over a hallucinated copy of it under the same image;
* visual: the chosen answer is better supported by the real image than by a *retrieved*, similar
  looking image that shows something else.

This stage builds both sides for every (image, question, chosen answer) of ``<data>/<split>/sft.jsonl``
(chosen = the data set's reference answer; one per distinct image + question, in file order;
``--tasks`` keeps only those tasks, ``--limit N`` the first N). The neighbours of an image are the
nearest *other* images in the ``index`` stage's FAISS index (:meth:`mmalign.retrieval.ImageIndex.neighbours`,
self excluded, cosine over the VLM's own vision features, top ``--k``, best first).

``--rejected refill`` (default): the paper's rule (its data figure ``asset/pics/reject-response.png``)
-------------------------------------------------------------------------------------------------------
1. mask the chosen answer's object / attribute / relation words (``--kinds``;
   :func:`mmalign.refill.mask_answer`: from the world's claims, :func:`mmalign.oracle.world_claims`,
   when the record has a scene graph, else from the vocabulary: COCO objects, colours, sizes, spatial
   phrases);
2. for each of the ``--k`` neighbours in rank order, the policy ``--model`` re-fills the masked answer
   *while looking at that neighbour* (asked the record's own question): ``--refill-mode infill``
   (default) forces the unmasked text and decodes each masked slot greedily
   (:class:`mmalign.refill.ConstrainedInfiller`; what a tiny model can do), ``prompt`` asks an
   instruction-following VLM to fill the ``[MASK]`` s (:class:`mmalign.refill.PromptInfiller`);
3. the first completion whose sentence-embedding cosine to the chosen answer is below
   ``--max-similarity`` (0.95; :class:`mmalign.textsim.SentenceSimilarity`, the packaged
   all-MiniLM-L6-v2 unless ``--text-model``) is accepted: it is the rejected answer and its
   neighbour the rejected image. All records still open at rank r are re-filled together (one
   batched pass per rank), so a record's later neighbours are only tried when its earlier ones gave
   a completion too close to the chosen answer (or none).

A record with nothing to mask, or none of whose k completions falls below the threshold, goes to
``rejects.jsonl`` with its reason (and every attempt: rank, image, similarity or error). Scene graphs
are not needed here; where they exist the report checks the accepted answer against the *original*
scene (:func:`mmalign.oracle.verify_world_claim`): how often the re-fill really is wrong for the image
it is paired with.

``--rejected injection``: rule-based, independent of the retrieved image (the earlier way)
-----------------------------------------------------------------------------------------
* rejected **text**: :func:`mmalign.inject.inject` adds one ``object`` / ``attribute`` /
  ``relation`` hallucination to the chosen answer. Each record gets a start kind from an rng
  seeded by ``--seed`` and its prompt id (so the result does not depend on the other records),
  and the kinds of ``--kinds`` rotate from there; an impossible kind (no absent shape left, no
  relation to flip, ...) makes the next one be tried. Failures are counted by kind and reason.
* rejected **image**: ``--select first-different`` (default) takes the highest-ranked neighbour that
  provably does not show the same scene: its scene graph differs (:meth:`mmalign.world.Scene.graph_hash`)
  **and** the chosen answer is not fully correct on it (at least one of its
  :func:`mmalign.oracle.world_claims` is false there, :func:`mmalign.oracle.verify_world_claim`).
  A neighbour without a scene graph cannot be checked and never qualifies. ``--select top1``
  takes the raw nearest neighbour, unchecked. Neither is the paper's rule (above): the rejected
  text is not made by looking at the rejected image, so the two rejected sides are unrelated.
  A record none of whose k neighbours qualifies goes to ``rejects.jsonl`` with the reason and the
  candidates seen (counted). This mode needs a scene graph for every record.

Output (atomic, with ``manifest.json`` over the data and index manifests, and in refill mode the
policy's and the sentence model's weights, so an unchanged re-run is skipped):

* ``train/pairs.jsonl``, ``val/pairs.jsonl``: :class:`mmalign.records.PreferenceRecord` JSON,
  one per record: ``id`` (= the prompt id: the SFT record's id), ``images`` ``[original]``,
  ``prompt`` (the messages before the answer), ``chosen`` / ``rejected`` (assistant messages),
  ``rejected_images`` ``[retrieved image, relative to the data root]`` and meta ``prompt_id``,
  ``task``, ``scene_id``, ``retrieved_scene_id``, ``rejected_source`` (``refill`` | ``injection``),
  ``retrieval`` (``rank`` 1-based among the neighbours, ``score`` cosine, ``differs``: its scene
  graph differs, ``chosen_faithfulness_on_retrieved``: share of the chosen answer's verifiable
  claims that hold on the retrieved scene; ``select``: the rule). Refill pairs add ``refill``
  (``mode``, ``similarity``, ``rank``, ``attempts``, ``masked`` text, ``fills``, ``stops``) and
  ``oracle`` (``rejected_wrong_on_original``, ``rejected_faithfulness_on_original``: None without a
  scene graph); injection pairs add ``injection_kind`` and ``injection`` (``original``,
  ``replacement``, ``start``, ``end`` of the changed span). A prompt goes to val when a hash of its
  id falls under ``--val-fraction`` (:func:`mmalign.ranking.split_of`, seed-free, stable across runs);
* ``report.json`` / ``report.md``: records read, pairs per split, rejects by reason; refill:
  acceptance rate, rank of the accepted image, similarity distribution (accepted and all attempts),
  masking statistics, how slots ended, the oracle's verdict on the accepted answers (wrong on the
  original image; faithful to the retrieved one); injection: kinds used and failures, retrieval
  statistics (how often the *raw* top-1 neighbour shows a different scene and makes the chosen answer
  wrong; rank and cosine of the selected image; the chosen answer's faithfulness there);
* ``rejects.jsonl``: input lines that could not be used (``--on-error skip``) and records that got
  no pair, each with ``reason`` and ``error``.

An unusable input line (malformed JSON or record, not exactly one image, an image outside the data
root, missing, or not in the index; with ``--rejected injection`` also no scene graph) stops the
stage with ``file:line: what is wrong``, or with ``--on-error skip`` goes to ``rejects.jsonl``. Image
paths are resolved with :func:`mmalign.records.resolve_image_path` and never leave the data root.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.inject import INJECTION_KINDS, try_inject
from mmalign.ranking import assistant_message, split_of
from mmalign.records import (
    MAX_RESPONSE_CHARS,
    PreferenceRecord,
    RecordError,
    SFTRecord,
    image_exists,
    iter_jsonl,
    message_text,
    read_scenes,
    resolve_image_path,
)
from mmalign.stage import (
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
)
from mmalign.world import Scene

STAGE = "realign_data"
SELECT_RULES = ("first-different", "top1")
REJECTED_SOURCES = ("refill", "injection")
#: Neighbour queries per FAISS call.
QUERY_BATCH = 512


@dataclass
class Item:
    """One (image, question, chosen answer) of the SFT records."""

    id: str
    image: str  # relative to the data root, posix (= the index id)
    prompt: list[dict]
    chosen: str
    task: str | None
    scene: Scene | None  # None only with require_scene=False (refill mode)
    scene_id: str | None
    line: int
    where: str


@dataclass
class Candidate:
    """One retrieved neighbour and what the scene graphs say about it."""

    rank: int  # 1-based
    id: str
    score: float
    scene: Scene | None
    differs: bool | None  # None: no scene graph for it
    wrong: bool | None  # some claim of the chosen answer is false on it
    faithfulness: float | None  # share of verifiable claims that hold (None: none verifiable)

    @property
    def qualifies(self) -> bool:
        return bool(self.differs) and bool(self.wrong)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": round(self.score, 6),
                "scene_id": self.scene.scene_id if self.scene else None, "differs": self.differs,
                "chosen_wrong": self.wrong, "chosen_faithfulness": self.faithfulness}


# ---------------------------------------------------------------------------------------------
# reading


def load_scene_map(data: Path) -> dict[str, Scene]:
    """Image path relative to the data root (posix) -> scene graph, over every split's scenes.jsonl."""
    root = data.resolve()
    out: dict[str, Scene] = {}
    for f in sorted(data.glob("*/scenes.jsonl")):
        for i, (scene, rel) in enumerate(read_scenes(f), 1):
            full = resolve_image_path(rel, root, f"{f} scene {i}")
            out[full.relative_to(root).as_posix()] = scene
    return out


def _prompt_id(obj: dict, images: list[str], prompt: list[dict]) -> str:
    pid = obj.get("id")
    if isinstance(pid, str) and pid:
        return pid
    blob = json.dumps([images, prompt], sort_keys=True)
    return "p-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def read_items(path: Path, data: Path, scenes: dict[str, Scene], indexed, tasks: set[str] | None,
               on_error: str, rejects: list[dict], stats: dict[str, Counter], require_scene: bool = True) -> list[Item]:
    """The distinct (image, question, chosen answer) items of an SFT file, in file order.

    ``indexed`` is a container of index ids; ``tasks`` None keeps every task. Unusable lines raise
    :class:`RecordError` (``file:line: ...``) or, with ``on_error="skip"``, go to ``rejects``. A
    record without a scene graph is such a line only with ``require_scene`` (injection needs one;
    the re-fill masks free text by vocabulary instead).
    """
    root = data.resolve()
    by_scene_id = {s.scene_id: s for s in scenes.values() if s.scene_id}
    items: list[Item] = []
    seen: dict[tuple[str, str], str] = {}
    ids: dict[str, int] = {}
    for lineno, obj, err in iter_jsonl(path):
        where = f"{path}:{lineno}"
        reason = "malformed record"
        try:
            if err:
                raise RecordError(f"{where}: {err}")
            if not isinstance(obj, dict):
                raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
            if tasks is not None and obj.get("task") not in tasks:
                stats["records"]["other_task"] += 1
                continue
            stats["records"]["read"] += 1
            rec = SFTRecord.from_json(obj, where, max_chars=MAX_RESPONSE_CHARS)
            if len(rec.images) != 1:
                raise RecordError(f"{where}: Re-Align pairs need exactly one image per record, got {len(rec.images)}")
            chosen = message_text(rec.messages[-1]).strip()
            if not chosen:
                raise RecordError(f"{where}: the answer (last assistant message) is empty")
            reason = "image"
            full = resolve_image_path(rec.images[0], root, where)
            if not image_exists(full):
                raise RecordError(f"{where}: image {rec.images[0]!r} not found under {root}")
            rel = full.relative_to(root).as_posix()
            reason = "not indexed"
            if rel not in indexed:
                raise RecordError(f"{where}: image {rel!r} is not in the index (was the index built over this "
                                  "split of this data root?)")
            reason = "no scene"
            sid = rec.meta.get("scene_id")
            scene = scenes.get(rel) or by_scene_id.get(sid)
            if scene is None and require_scene:
                raise RecordError(f"{where}: no scene graph for image {rel!r} (scene_id {sid!r}) in "
                                  f"{data}/*/scenes.jsonl; the retrieval check and injection need one")
            prompt = rec.messages[:-1]
            key = (rel, json.dumps(prompt, sort_keys=True))
            if key in seen:
                stats["records"]["duplicates"] += 1
                continue
            reason = "duplicate id"
            pid = _prompt_id(obj, rec.images, prompt)
            if pid in ids:
                raise RecordError(f"{where}: duplicate id {pid!r} (first at line {ids[pid]})")
            ids[pid] = lineno
            seen[key] = pid
            task = rec.meta.get("task")
            items.append(Item(id=pid, image=rel, prompt=prompt, chosen=chosen, task=task if isinstance(task, str) else None,
                              scene=scene, scene_id=(scene.scene_id or str(sid)) if scene is not None else
                              (sid if isinstance(sid, str) else None), line=lineno, where=where))
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"line": lineno, "reason": reason, "error": str(e), "record": obj})
    return items


# ---------------------------------------------------------------------------------------------
# retrieval


def claim_verdicts(claims: list, scene: Scene) -> tuple[bool, float | None, int]:
    """(some claim is false on ``scene``, share of the verifiable claims that hold, false count)."""
    from mmalign.oracle import verify_world_claim

    vs = [verify_world_claim(c, scene) for c in claims]
    known = [v for v in vs if v is not None]
    n_false = sum(v is False for v in vs)
    return n_false > 0, (sum(known) / len(known) if known else None), n_false


def check_candidates(item: Item, claims: list, hits: list[tuple[str | None, float]],
                     scenes: dict[str, Scene]) -> list[Candidate]:
    """The neighbours ``hits`` (``(id, cosine)``, best first) checked against the scene graphs."""
    own = item.scene.graph_hash()
    out = []
    for rank, (id_, score) in enumerate(hits, 1):
        if id_ is None:
            break
        scene = scenes.get(id_)
        differs = wrong = faith = None
        if scene is not None:
            differs = scene.graph_hash() != own
            wrong, faith, _ = claim_verdicts(claims, scene)
        out.append(Candidate(rank, id_, float(score), scene, differs, wrong, faith))
    return out


def select(cands: list[Candidate], rule: str) -> tuple[Candidate | None, str]:
    """The rejected image under ``rule`` and, when there is none, why."""
    if not cands:
        return None, "no neighbour"
    if rule == "top1":
        return cands[0], ""
    for c in cands:
        if c.qualifies:
            return c, ""
    if all(c.scene is None for c in cands):
        return None, "no neighbour has a scene graph"
    return None, "no qualifying neighbour"


def neighbour_table(index, images: list[str], k: int, progress: bool) -> dict[str, list[tuple[str | None, float]]]:
    """Image id -> its top-``k`` other images ``(id, cosine)``, best first."""
    from tqdm.auto import tqdm

    uniq = list(dict.fromkeys(images))
    out: dict[str, list[tuple[str | None, float]]] = {}
    with tqdm(total=len(uniq), desc="retrieving neighbours", unit="img", disable=not progress, file=sys.stderr) as bar:
        for s in range(0, len(uniq), QUERY_BATCH):
            chunk = uniq[s:s + QUERY_BATCH]
            scores, ids = index.neighbours(chunk, k)
            for q, id_ in enumerate(chunk):
                out[id_] = [(ids[q, j], float(scores[q, j])) for j in range(k)]
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# injection


def inject_rotating(item: Item, kinds: list[str], seed: int, stats: dict[str, Counter]):
    """The first possible injection, kinds rotating from a start drawn per record; None if none is."""
    rng = random.Random(f"{seed}:{item.id}")
    start = rng.randrange(len(kinds))
    for kind in kinds[start:] + kinds[:start]:
        inj = try_inject(item.chosen, item.scene, kind, rng, stats["inject_failed"])
        if inj is None:
            continue
        if inj.text.strip() == item.chosen.strip():  # inject guarantees a change; never pair equal texts
            stats["inject_failed"][f"{kind}: the copy equals the answer"] += 1
            continue
        return inj
    return None


# ---------------------------------------------------------------------------------------------
# report


def _mean(values: list[float], nd: int = 4) -> float | None:
    return round(statistics.fmean(values), nd) if values else None


def _share(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def build_report(n_items: int, pairs: dict[str, list[dict]], stats: dict[str, Counter], top1: list[Candidate],
                 selected: list[Candidate], rejects: list[dict], own_faith: list[float], args: argparse.Namespace,
                 seconds: float) -> dict[str, Any]:
    n_pairs = sum(len(v) for v in pairs.values())
    with_scene = [c for c in top1 if c.scene is not None]
    no_nb = sum(1 for r in rejects if r["reason"] in ("no qualifying neighbour", "no neighbour",
                                                       "no neighbour has a scene graph"))
    faith = [c.faithfulness for c in selected if c.faithfulness is not None]
    return {
        "rejected": "injection", "split": args.split, "tasks": sorted(args.task_set) if args.task_set else "all",
        "select": args.select, "k": args.k, "kinds": args.kind_list,
        "records": {"items": n_items, **dict(stats["records"]), "pairs": n_pairs,
                    "rejected": len(rejects)},
        "pairs": {"total": n_pairs, **{s: len(v) for s, v in pairs.items()}},
        "injections": {"used": dict(sorted(stats["injected"].items())),
                       "failed_attempts": dict(sorted(stats["inject_failed"].items())),
                       "records_without_injection": stats["outcome"]["no injection possible"]},
        "retrieval": {
            "raw_top1": {"n": len(top1), "with_scene_graph": len(with_scene),
                         "differs": _share(sum(bool(c.differs) for c in with_scene), len(with_scene)),
                         "makes_chosen_wrong": _share(sum(bool(c.wrong) for c in with_scene), len(with_scene)),
                         "qualifies": _share(sum(c.qualifies for c in with_scene), len(with_scene)),
                         "mean_score": _mean([c.score for c in top1])},
            "selected": {"n": len(selected), "mean_rank": _mean([c.rank for c in selected], 3),
                         "rank_histogram": {str(r): n for r, n in sorted(Counter(c.rank for c in selected).items())},
                         "mean_score": _mean([c.score for c in selected]),
                         "differs": _share(sum(bool(c.differs) for c in selected), len(selected)),
                         "mean_chosen_faithfulness_on_retrieved": _mean(faith)},
            "no_qualifying_neighbour": {"n": no_nb, "share": _share(no_nb, n_items)},
            "candidates_without_scene_graph": stats["retrieval"]["candidates_without_scene"],
        },
        "mean_chosen_faithfulness_on_own_scene": _mean(own_faith),
        "rejects": {"total": len(rejects), "reasons": dict(Counter(r["reason"] for r in rejects))},
        "seconds": round(seconds, 2),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def report_md(rep: dict) -> str:
    r, p, rt = rep["records"], rep["pairs"], rep["retrieval"]
    t1, sel, nq = rt["raw_top1"], rt["selected"], rt["no_qualifying_neighbour"]
    lines = ["# Re-Align dual-preference data", "",
             (f"Split {rep['split']}, tasks {rep['tasks']}: {r['items']} distinct (image, question) records -> "
              f"{p['total']} pairs ({p.get('train', 0)} train, {p.get('val', 0)} val); {r['rejected']} rejected"
              f"{' ' + str(rep['rejects']['reasons']) if rep['rejects']['reasons'] else ''}. Rejected image: "
              f"`--select {rep['select']}` among k={rep['k']} neighbours."), "",
             "| retrieval | value |", "|---|---|",
             f"| raw top-1 shows a different scene graph | {_pct(t1['differs'])} (of {t1['with_scene_graph']}) |",
             f"| raw top-1 makes the chosen answer wrong | {_pct(t1['makes_chosen_wrong'])} |",
             f"| raw top-1 qualifies (both) | {_pct(t1['qualifies'])} |",
             f"| raw top-1 mean cosine | {t1['mean_score']} |",
             f"| selected: mean rank (1 = nearest) | {sel['mean_rank']} |",
             f"| selected: mean cosine | {sel['mean_score']} |",
             f"| selected: scene graph differs | {_pct(sel['differs'])} |",
             f"| selected: mean chosen faithfulness on its scene | {sel['mean_chosen_faithfulness_on_retrieved']} |",
             f"| rejected for no qualifying neighbour | {nq['n']} ({_pct(nq['share'])}) |",
             "", f"Selected ranks: {sel['rank_histogram'] or 'none'}.",
             "", (f"Injections used: {rep['injections']['used'] or 'none'}; records with no possible injection: "
                 f"{rep['injections']['records_without_injection']}.")]
    if rep["injections"]["failed_attempts"]:
        lines += ["", "Injection attempts that failed (the next kind was tried):", ""]
        lines += [f"- {k}: {v}" for k, v in rep["injections"]["failed_attempts"].items()]
    lines += ["", (f"Chosen answers' faithfulness on their own scene: {rep['mean_chosen_faithfulness_on_own_scene']}. "
              f"{rep['seconds']} s.")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# refill (the paper's rule)


@dataclass
class Attempt:
    """One re-fill of a record's masked answer under its rank-``rank`` neighbour."""

    rank: int
    image: str
    score: float
    text: str
    similarity: float | None  # None: the re-fill failed
    error: str = ""
    fills: list[str] | None = None
    stops: list[str] | None = None
    same_as_chosen: bool = False  # the re-fill gave the chosen answer back word for word

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "image": self.image, "score": round(self.score, 6), "text": self.text,
                "similarity": None if self.similarity is None else round(self.similarity, 6), "error": self.error}


def mask_item(item: Item, kinds: list[str], vocab) -> Any:
    """The record's masked answer: from the world's claims with a scene graph, else by vocabulary."""
    from mmalign.oracle import world_claims
    from mmalign.refill import mask_answer

    if item.scene is not None:
        return mask_answer(item.chosen, claims=world_claims(item.chosen), kinds=kinds)
    return mask_answer(item.chosen, vocab=vocab, kinds=kinds)


def refill_rounds(items: list[Item], masks: dict[str, Any], table: dict[str, list[tuple[str | None, float]]],
                  infiller, similarity, max_similarity: float, data_root: Path, progress: bool,
                  ) -> tuple[dict[str, Attempt], dict[str, list[Attempt]]]:
    """Re-Align's rule over ranks 1..k: at rank r every record without an accepted completion is
    re-filled under its rank-r neighbour, and a completion whose cosine to the chosen answer is
    below ``max_similarity`` is accepted. Returns the accepted attempt and every attempt, by id."""
    from mmalign.refill import RefillRequest
    from mmalign.textsim import first_below

    accepted: dict[str, Attempt] = {}
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    root = data_root.resolve()
    open_items = list(items)
    k = max((len(v) for v in table.values()), default=0)
    for rank in range(1, k + 1):
        todo = [(it, table[it.image][rank - 1]) for it in open_items
                if rank <= len(table[it.image]) and table[it.image][rank - 1][0] is not None]
        if not todo:
            break
        reqs = [RefillRequest(resolve_image_path(nb, root, f"{it.where} neighbour {rank}"), it.prompt, masks[it.id],
                              f"{it.where} (neighbour {rank}: {nb})") for it, (nb, _) in todo]
        results = infiller(reqs, progress=progress, desc=f"re-filling under neighbour {rank}/{k}")
        ok = [j for j, r in enumerate(results) if r.ok]
        sims = similarity.pairwise([todo[j][0].chosen for j in ok], [results[j].text for j in ok])
        sim_of = {j: float(s) for j, s in zip(ok, sims)}
        for j, ((it, (nb, score)), res) in enumerate(zip(todo, results)):
            att = Attempt(rank, nb, float(score), res.text, sim_of.get(j), res.error, res.fills, res.stops,
                          res.ok and res.text.strip() == it.chosen.strip())
            attempts[it.id].append(att)
            if att.similarity is not None and first_below([att.similarity], max_similarity) == 0:
                accepted[it.id] = att
        open_items = [it for it in open_items if it.id not in accepted]
        if not open_items:
            break
    return accepted, attempts


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "min": None, "p10": None, "p50": None, "p90": None, "max": None}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))], 4)

    return {"n": len(v), "mean": round(statistics.fmean(v), 4), "min": round(v[0], 4), "p10": q(0.1),
            "p50": q(0.5), "p90": q(0.9), "max": round(v[-1], 4)}


def _hist(values: list[float], edges=(0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)) -> dict[str, int]:
    """Counts per similarity bin ``[lo, hi)``: "<0.5", "0.5-0.7", ..., ">=0.99"."""
    out: dict[str, int] = {}
    labels = [f"<{edges[0]}"] + [f"{a}-{b}" for a, b in itertools.pairwise(edges)] + [f">={edges[-1]}"]
    for x in values:
        i = sum(x >= e for e in edges)
        out[labels[i]] = out.get(labels[i], 0) + 1
    return {lab: out[lab] for lab in labels if lab in out}


def build_refill_report(n_items: int, pairs: dict[str, list[dict]], stats: dict[str, Counter],
                        accepted: dict[str, Attempt], attempts: dict[str, list[Attempt]], verdicts: list[dict],
                        rejects: list[dict], own_faith: list[float], args: argparse.Namespace, text_model: str,
                        seconds: float) -> dict[str, Any]:
    n_pairs = sum(len(v) for v in pairs.values())
    every = [a for v in attempts.values() for a in v]
    sims_all = [a.similarity for a in every if a.similarity is not None]
    sims_acc = [a.similarity for a in accepted.values()]
    ranks = [a.rank for a in accepted.values()]
    checked = [v for v in verdicts if v["wrong_on_original"] is not None]
    on_retr = [v for v in verdicts if v["faithful_to_retrieved"] is not None]
    masked = stats["masking"]
    return {
        "rejected": "refill", "split": args.split, "tasks": sorted(args.task_set) if args.task_set else "all",
        "k": args.k, "kinds": args.kind_list,
        "records": {"items": n_items, **dict(stats["records"]), "pairs": n_pairs, "rejected": len(rejects)},
        "pairs": {"total": n_pairs, **{s: len(v) for s, v in pairs.items()}},
        "refill": {
            "mode": args.refill_mode, "model": str(args.model), "text_model": text_model,
            "max_similarity": args.max_similarity, "extra_words": args.extra_words,
            "temperature": args.refill_temperature,
            "masking": {"records_masked": masked["records_masked"], "nothing_to_mask": masked["nothing_to_mask"],
                        "from_claims": masked["from_claims"], "from_vocabulary": masked["from_vocabulary"],
                        "mean_slots": round(masked["slots"] / masked["records_masked"], 3)
                        if masked["records_masked"] else None,
                        "slots_by_kind": dict(sorted(stats["slot_kinds"].items()))},
            "acceptance": {"accepted": len(accepted), "items": n_items, "rate": _share(len(accepted), n_items),
                           "rate_of_masked": _share(len(accepted), masked["records_masked"])},
            "accepted_rank": {"mean": _mean([float(r) for r in ranks], 3),
                              "histogram": {str(r): n for r, n in sorted(Counter(ranks).items())}},
            "similarity": {"accepted": _stats(sims_acc), "all_attempts": _stats(sims_all),
                           "all_attempts_histogram": _hist(sims_all)},
            "attempts": {"total": len(every), "failed": sum(a.similarity is None for a in every),
                         "failed_reasons": dict(Counter(a.error.split(":")[0] for a in every if a.similarity is None)),
                         "same_as_chosen": sum(a.same_as_chosen for a in every)},
            "slot_stops": dict(sorted(stats["slot_stops"].items())),
            "oracle": {"with_scene_graph": len(checked),
                       "wrong_on_original": _share(sum(v["wrong_on_original"] for v in checked), len(checked)),
                       "mean_faithfulness_on_original": _mean([v["faithfulness_on_original"] for v in checked
                                                               if v["faithfulness_on_original"] is not None]),
                       "mean_false_claims_on_original": _mean([float(v["false_on_original"]) for v in checked], 3),
                       "with_retrieved_scene_graph": len(on_retr),
                       "faithful_to_retrieved": _share(sum(v["faithful_to_retrieved"] for v in on_retr), len(on_retr)),
                       "retrieved_differs": _share(sum(bool(v["retrieved_differs"]) for v in on_retr), len(on_retr))},
        },
        "mean_chosen_faithfulness_on_own_scene": _mean(own_faith),
        "rejects": {"total": len(rejects), "reasons": dict(Counter(r["reason"] for r in rejects))},
        "seconds": round(seconds, 2),
    }


def refill_report_md(rep: dict) -> str:
    r, p, rf = rep["records"], rep["pairs"], rep["refill"]
    acc, sim, orc, msk = rf["acceptance"], rf["similarity"], rf["oracle"], rf["masking"]
    sa, sl = sim["accepted"], sim["all_attempts"]
    lines = ["# Re-Align dual-preference data (re-filled rejected answers)", "",
             (f"Split {rep['split']}, tasks {rep['tasks']}: {r['items']} distinct (image, question) records -> "
              f"{p['total']} pairs ({p.get('train', 0)} train, {p.get('val', 0)} val); {r['rejected']} rejected"
              f"{' ' + str(rep['rejects']['reasons']) if rep['rejects']['reasons'] else ''}. Rejected answer: the "
              f"masked chosen answer re-filled by `{rf['model']}` ({rf['mode']}) under each of k={rep['k']} "
              f"retrieved images in rank order; the first with cosine < {rf['max_similarity']} "
              f"({rf['text_model']}) is accepted, with its image."), "",
             "| re-fill | value |", "|---|---|",
             f"| acceptance rate (accepted / records) | {_pct(acc['rate'])} ({acc['accepted']} of {acc['items']}) |",
             f"| accepted image rank: mean | {rf['accepted_rank']['mean']} |",
             f"| accepted similarity: mean / p10 / p50 / p90 | {sa['mean']} / {sa['p10']} / {sa['p50']} / {sa['p90']} |",
             (f"| all attempts: n / mean similarity / failed / same as chosen | {rf['attempts']['total']} / "
              f"{sl['mean']} / {rf['attempts']['failed']} / {rf['attempts']['same_as_chosen']} |"),
             (f"| accepted answer wrong on the ORIGINAL image (oracle) | {_pct(orc['wrong_on_original'])} "
              f"(of {orc['with_scene_graph']} with a scene graph) |"),
             f"| accepted answer: mean false claims on the original | {orc['mean_false_claims_on_original']} |",
             f"| accepted answer: mean faithfulness on the original | {orc['mean_faithfulness_on_original']} |",
             f"| accepted answer fully true on the retrieved image | {_pct(orc['faithful_to_retrieved'])} |",
             f"| retrieved image's scene graph differs | {_pct(orc['retrieved_differs'])} |",
             f"| masked slots per record (mean) | {msk['mean_slots']} |",
             "", f"Accepted ranks: {rf['accepted_rank']['histogram'] or 'none'}.",
             f"Similarity of all attempts: {sim['all_attempts_histogram'] or 'none'}.",
             (f"Slots masked by kind: {msk['slots_by_kind']}; records with nothing to mask: {msk['nothing_to_mask']} "
              f"(masked from claims: {msk['from_claims']}, from vocabulary: {msk['from_vocabulary']})."),
             f"How the accepted answers' slots ended: {rf['slot_stops']}.", "",
             (f"Chosen answers' faithfulness on their own scene: {rep['mean_chosen_faithfulness_on_own_scene']}. "
              f"{rep['seconds']} s.")]
    return "\n".join(lines) + "\n"


def _verdicts(claims: list, scene: Scene | None) -> tuple[bool | None, float | None, int]:
    """:func:`claim_verdicts`, or (None, None, 0) where there is no scene graph to check against."""
    return (None, None, 0) if scene is None else claim_verdicts(claims, scene)


def build_refill(args, items: list[Item], table, scenes: dict[str, Scene], stats: dict[str, Counter],
                 rejects: list[dict], pairs: dict[str, list[dict]]):
    """Pairs by Re-Align's rule (module docstring) into ``pairs``; returns what the report needs."""
    import torch

    from mmalign.components import load_component
    from mmalign.eval.vocab import ObjectVocabulary
    from mmalign.oracle import world_claims
    from mmalign.refill import ConstrainedInfiller, PromptInfiller
    from mmalign.textsim import SentenceSimilarity

    vocab = ObjectVocabulary.coco() if any(it.scene is None for it in items) else None
    masks, maskable = {}, []
    for it in items:
        m = mask_item(it, args.kind_list, vocab)
        stats["masking"]["from_claims" if it.scene is not None else "from_vocabulary"] += 1
        if not m.spans:
            stats["masking"]["nothing_to_mask"] += 1
            stats["outcome"]["nothing to mask"] += 1
            rejects.append({"line": it.line, "id": it.id, "reason": "nothing to mask", "image": it.image,
                            "error": f"{it.where}: the answer has no {'/'.join(args.kind_list)} words to mask"})
            continue
        stats["masking"]["records_masked"] += 1
        stats["masking"]["slots"] += len(m.spans)
        for sp in m.spans:
            stats["slot_kinds"]["+".join(sp.kinds)] += 1
        masks[it.id] = m
        maskable.append(it)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_component(args.policy_class, path=str(args.model)).eval().to(device)
    if args.refill_mode == "infill":
        infiller = ConstrainedInfiller(policy, batch_size=args.batch_size, extra_words=args.extra_words,
                                       temperature=args.refill_temperature, seed=args.seed)
    else:
        infiller = PromptInfiller(policy, batch_size=args.batch_size)
    similarity = SentenceSimilarity.load(args.text_model)
    accepted, attempts = refill_rounds(maskable, masks, table, infiller, similarity, args.max_similarity, args.data,
                                       not args.no_progress)
    verdicts = []
    for it in maskable:
        att = accepted.get(it.id)
        if att is None:
            tried = attempts.get(it.id, [])
            reason = "no neighbour" if not tried else "no re-fill below the similarity threshold"
            stats["outcome"][reason] += 1
            best = min((a.similarity for a in tried if a.similarity is not None), default=None)
            rejects.append({"line": it.line, "id": it.id, "reason": reason, "image": it.image,
                            "error": (f"{it.where}: none of the {len(tried)} re-fills (one per retrieved image) has "
                                      f"cosine < {args.max_similarity} to the chosen answer (lowest: "
                                      f"{'none' if best is None else round(best, 4)})") if tried else
                                     f"{it.where}: the index returned no neighbour",
                            "masked": masks[it.id].masked(), "attempts": [a.to_json() for a in tried]})
            continue
        for why in att.stops or []:
            stats["slot_stops"][why] += 1
        retrieved = scenes.get(att.image)
        refill_claims = world_claims(att.text)  # parsed once, checked on both scenes
        wrong, faith, n_false = _verdicts(refill_claims, it.scene)
        r_wrong, _, _ = _verdicts(refill_claims, retrieved)
        _, c_faith, _ = _verdicts(world_claims(it.chosen), retrieved)
        differs = None if retrieved is None or it.scene is None else retrieved.graph_hash() != it.scene.graph_hash()
        verdicts.append({"wrong_on_original": wrong, "faithfulness_on_original": faith, "false_on_original": n_false,
                         "faithful_to_retrieved": None if r_wrong is None else not r_wrong,
                         "retrieved_differs": differs})
        rec = PreferenceRecord(
            id=it.id, images=[it.image], prompt=it.prompt, chosen=assistant_message(it.chosen),
            rejected=assistant_message(att.text),
            meta={"prompt_id": it.id, "task": it.task, "scene_id": it.scene_id,
                  "retrieved_scene_id": retrieved.scene_id if retrieved else None,
                  "rejected_source": "refill",
                  "refill": {"mode": args.refill_mode, "similarity": round(att.similarity, 6), "rank": att.rank,
                             "attempts": len(attempts[it.id]), "masked": masks[it.id].masked(), "fills": att.fills,
                             "stops": att.stops},
                  "retrieval": {"rank": att.rank, "score": round(att.score, 6), "differs": differs,
                                "chosen_faithfulness_on_retrieved": None if c_faith is None else round(c_faith, 4),
                                "select": "refill"},
                  "oracle": {"rejected_wrong_on_original": wrong,
                             "rejected_faithfulness_on_original": None if faith is None else round(faith, 4)}}).to_json()
        rec = {**{k: v for k, v in rec.items() if k in ("id", "images")}, "rejected_images": [att.image],
               **{k: v for k, v in rec.items() if k not in ("id", "images", "rejected_images")}}
        pairs[split_of(it.id, args.val_fraction)].append(rec)
    return accepted, attempts, verdicts, similarity.name


def build_injection(args, items: list[Item], table, scenes: dict[str, Scene], stats: dict[str, Counter],
                    rejects: list[dict], pairs: dict[str, list[dict]]):
    """Pairs with an injected rejected answer and a selected neighbour (module docstring) into ``pairs``."""
    from tqdm.auto import tqdm

    from mmalign.oracle import world_claims

    top1: list[Candidate] = []
    selected: list[Candidate] = []
    kinds = args.kind_list
    for it in tqdm(items, desc="building pairs", unit="rec", disable=args.no_progress, file=sys.stderr):
        claims = world_claims(it.chosen)
        cands = check_candidates(it, claims, table[it.image], scenes)
        stats["retrieval"]["candidates_without_scene"] += sum(c.scene is None for c in cands)
        if cands:
            top1.append(cands[0])
        pick, why = select(cands, args.select)
        inj = inject_rotating(it, kinds, args.seed, stats) if pick is not None else None
        if pick is None or inj is None:
            reason = why if pick is None else "no injection possible"
            stats["outcome"][reason] += 1
            error = (f"{it.where}: none of the {len(cands)} nearest images qualifies as the rejected image "
                     "(its scene graph must differ and make a claim of the answer false)" if pick is None else
                     f"{it.where}: no hallucination of kinds {kinds} can be injected into the answer")
            rejects.append({"line": it.line, "id": it.id, "reason": reason, "error": error, "image": it.image,
                            "candidates": [c.to_json() for c in cands]})
            continue
        selected.append(pick)
        stats["injected"][inj.kind] += 1
        rec = PreferenceRecord(
            id=it.id, images=[it.image], prompt=it.prompt, chosen=assistant_message(it.chosen),
            rejected=assistant_message(inj.text),
            meta={"prompt_id": it.id, "task": it.task, "scene_id": it.scene_id,
                  "retrieved_scene_id": pick.scene.scene_id if pick.scene else None,
                  "rejected_source": "injection",
                  "injection_kind": inj.kind,
                  "injection": {"original": inj.original, "replacement": inj.replacement,
                                "start": inj.start, "end": inj.end},
                  "retrieval": {"rank": pick.rank, "score": round(pick.score, 6), "differs": pick.differs,
                                "chosen_faithfulness_on_retrieved":
                                    None if pick.faithfulness is None else round(pick.faithfulness, 4),
                                "select": args.select}}).to_json()
        # rejected_images right after the images (set here too, whatever PreferenceRecord's version)
        rec = {**{k: v for k, v in rec.items() if k in ("id", "images")}, "rejected_images": [pick.id],
               **{k: v for k, v in rec.items() if k not in ("id", "images", "rejected_images")}}
        pairs[split_of(it.id, args.val_fraction)].append(rec)
    return top1, selected


# ---------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from mmalign.textsim import DEFAULT_MAX_SIMILARITY, PACKAGED_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path,
                    help="the data stage's folder: image root, <split>/sft.jsonl and */scenes.jsonl")
    ap.add_argument("--index", required=True, type=Path, help="the index stage's folder (ids = image paths)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--split", default="train", help="which <data>/<split>/sft.jsonl to read (default train)")
    ap.add_argument("--tasks", default="detailed_caption",
                    help="comma-separated tasks to keep ('all': every task; default detailed_caption)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N records only (0 = all)")
    ap.add_argument("--k", type=int, default=10, help="neighbours retrieved per image (default 10)")
    ap.add_argument("--rejected", choices=REJECTED_SOURCES, default="refill",
                    help="refill (default, the paper's rule): the policy re-fills the masked answer under each "
                         "retrieved image in rank order, the first below --max-similarity is taken; injection: a "
                         "rule-based hallucination and a --select'ed neighbour, independent of each other")
    ap.add_argument("--kinds", default=",".join(INJECTION_KINDS),
                    help=f"comma-separated kinds of words to mask (refill) or hallucinations to rotate through "
                         f"(injection) (default {','.join(INJECTION_KINDS)})")
    ap.add_argument("--seed", type=int, default=0, help="seeds the injections (with each prompt id) and a sampled re-fill")
    g = ap.add_argument_group("refill (--rejected refill)")
    g.add_argument("--model", type=Path, help="the policy checkpoint that re-fills (Hugging Face folder)")
    g.add_argument("--policy-class", default="models.policy.HFPolicy", help="Policy implementation to load it with")
    g.add_argument("--refill-mode", choices=("infill", "prompt"), default="infill",
                   help="infill (default): forced fixed text, policy-decoded slots (any policy); prompt: ask an "
                        "instruction-following VLM to fill the [MASK]s")
    g.add_argument("--text-model", default=None,
                   help=f"SentenceTransformer folder for the similarity (default: the packaged {PACKAGED_MODEL})")
    g.add_argument("--max-similarity", type=float, default=DEFAULT_MAX_SIMILARITY,
                   help=f"accept the first re-fill whose cosine to the chosen answer is below this "
                        f"(default {DEFAULT_MAX_SIMILARITY}, the paper's)")
    g.add_argument("--extra-words", type=int, default=1,
                   help="infill: a slot may hold this many words more than it masked (default 1)")
    g.add_argument("--refill-temperature", type=float, default=0.0, help="infill: 0 greedy (default), > 0 sampled")
    g.add_argument("--batch-size", type=int, default=64, help="re-fills decoded together (default 64)")
    g.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    g = ap.add_argument_group("injection (--rejected injection)")
    g.add_argument("--select", choices=SELECT_RULES, default=None,
                   help="first-different (default): highest-ranked neighbour whose scene differs and makes the chosen "
                        "answer wrong; top1: the raw nearest neighbour, unchecked")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of prompts (by id hash) for val")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="an unusable input line: stop with file:line (raise) or write it to rejects.jsonl (skip)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    args = ap.parse_args(argv)
    kinds = _csv(args.kinds)
    bad = [k for k in kinds if k not in INJECTION_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        ap.error(f"--kinds {args.kinds!r}: give distinct kinds among {', '.join(INJECTION_KINDS)}")
    if args.k < 1 or args.limit < 0 or not 0 <= args.val_fraction < 1:
        ap.error("need --k >= 1, --limit >= 0 and 0 <= --val-fraction < 1")
    tasks = _csv(args.tasks)
    if not tasks:
        ap.error("--tasks: name at least one task, or 'all'")
    args.task_set = None if tasks == ["all"] else set(tasks)
    args.kind_list = kinds
    sft = args.data / args.split / "sft.jsonl"
    if not sft.is_file():
        ap.error(f"{sft}: no such file (is --data a data stage output with a {args.split!r} split?)")
    config = {"split": args.split, "tasks": sorted(tasks), "limit": args.limit, "k": args.k, "rejected": args.rejected,
              "kinds": kinds, "val_fraction": args.val_fraction, "on_error": args.on_error}
    inputs: list[Path] = [args.data, args.index]
    if args.rejected == "injection":
        args.select = args.select or "first-different"
        config.update(select=args.select, seed=args.seed)
    else:
        if args.select is not None:
            ap.error("--select picks the rejected image of --rejected injection; the re-fill rule picks its own")
        if args.model is None or not (args.model / "config.json").is_file():
            ap.error(f"--rejected refill needs --model, a policy checkpoint folder with config.json (got {args.model})")
        if not 0 < args.max_similarity <= 1 or args.extra_words < 0 or args.refill_temperature < 0 or args.batch_size < 1:
            ap.error("need 0 < --max-similarity <= 1, --extra-words >= 0, --refill-temperature >= 0, --batch-size >= 1")
        if args.text_model is not None and not Path(args.text_model).is_dir():
            ap.error(f"--text-model {args.text_model}: no such folder (a SentenceTransformer folder)")
        from mmalign.stage import checkpoint_id

        config.update(model=checkpoint_id(args.model), policy_class=args.policy_class, refill_mode=args.refill_mode,
                      text_model=args.text_model or PACKAGED_MODEL, max_similarity=args.max_similarity,
                      extra_words=args.extra_words, refill_temperature=args.refill_temperature)
        if args.refill_temperature > 0:
            config["seed"] = args.seed
        inputs += [args.model / "config.json", *sorted(args.model.glob("*.safetensors"))]
        if args.text_model is not None:
            inputs += sorted(Path(args.text_model).glob("*.safetensors"))
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    from mmalign.oracle import world_claims
    from mmalign.retrieval import ImageIndex

    t0 = time.perf_counter()
    index = ImageIndex.load(args.index)
    scenes = load_scene_map(args.data)
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        rejects: list[dict] = []
        stats: dict[str, Counter] = defaultdict(Counter)
        items = read_items(sft, args.data, scenes, index, args.task_set, args.on_error, rejects, stats,
                           require_scene=args.rejected == "injection")
        if args.limit:
            stats["records"]["beyond_limit"] = max(0, len(items) - args.limit)
            items = items[:args.limit]
        if not items:
            raise RecordError(f"{sft}: no usable records of tasks {tasks} ({len(rejects)} rejected; "
                              f"{stats['records']['other_task']} of other tasks)")
        table = neighbour_table(index, [it.image for it in items], args.k, not args.no_progress)
        pairs: dict[str, list[dict]] = {"train": [], "val": []}
        own_faith: list[float] = []
        for it in items:
            faith = _verdicts(world_claims(it.chosen), it.scene)[1]
            if faith is not None:
                own_faith.append(faith)
        if args.rejected == "refill":
            accepted, attempts, verdicts, text_model = build_refill(args, items, table, scenes, stats, rejects, pairs)
        else:
            top1, selected = build_injection(args, items, table, scenes, stats, rejects, pairs)
        n_pairs = sum(len(v) for v in pairs.values())
        if not n_pairs:
            raise RecordError(f"{sft}: no pair could be made from {len(items)} records "
                              f"({dict(Counter(r['reason'] for r in rejects))}); see --k"
                              f"{' and --max-similarity' if args.rejected == 'refill' else ' and --select'}")
        for split, rows in pairs.items():
            atomic_write_jsonl(st.path / split / "pairs.jsonl", rows)
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        seconds = time.perf_counter() - t0
        if args.rejected == "refill":
            rep = build_refill_report(len(items), pairs, stats, accepted, attempts, verdicts, rejects, own_faith, args,
                                      text_model, seconds)
            md = refill_report_md(rep)
        else:
            rep = build_report(len(items), pairs, stats, top1, selected, rejects, own_faith, args, seconds)
            md = report_md(rep)
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2) + "\n")
        atomic_write_text(st.path / "report.md", md)
        st.count("records", len(items))
        for split, rows in pairs.items():
            st.count(f"{split}/pairs", len(rows))
        st.count("rejected", len(rejects))
        st.info.update(index=str(args.index), index_size=len(index), index_info=index.info)
    print(md)
    print(f"{STAGE}: {len(items)} records, {len(pairs['train'])} train / {len(pairs['val'])} val pairs, "
          f"{len(rejects)} rejected in {seconds:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
