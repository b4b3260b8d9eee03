"""The ``realign_data`` stage: Re-Align's dual-preference pairs (rejected text + retrieved rejected image).

    python -m data_pipelines.realign_data --data runs/demo/data --index runs/demo/index --split train \\
        --tasks detailed_caption --limit 0 --k 10 --kinds object,attribute,relation --seed 0 \\
        --out runs/demo/realign-data [--select first-different|top1] [--val-fraction 0.1]

Re-Align (Xing et al. 2025, "Re-Align: Aligning Vision Language Models via Retrieval-Augmented
Direct Preference Optimization") trains rDPO on a *dual* preference per (image, question):

* textual: the chosen answer is preferred over a hallucinated copy of it under the same image;
* visual: the chosen answer is better supported by the real image than by a *retrieved*, similar
  looking image that shows something else.

This stage builds both sides for every (image, question, chosen answer) of ``<data>/<split>/sft.jsonl``
(chosen = the data set's reference answer; one per distinct image + question, in file order;
``--tasks`` keeps only those tasks, ``--limit N`` the first N):

* rejected **text**: :func:`mmalign.inject.inject` adds one ``object`` / ``attribute`` /
  ``relation`` hallucination to the chosen answer. Each record gets a start kind from an rng
  seeded by ``--seed`` and its prompt id (so the result does not depend on the other records),
  and the kinds of ``--kinds`` rotate from there; an impossible kind (no absent shape left, no
  relation to flip, ...) makes the next one be tried. Failures are counted by kind and reason.
* rejected **image**: the nearest *other* images of the record's image in the ``index`` stage's
  FAISS index (:meth:`mmalign.retrieval.ImageIndex.neighbours`, self excluded, cosine, top
  ``--k``). ``--select first-different`` (default) takes the highest-ranked neighbour that
  provably does not show the same scene: its scene graph differs (:meth:`mmalign.world.Scene.graph_hash`)
  **and** the chosen answer is not fully correct on it (at least one of its
  :func:`mmalign.oracle.world_claims` is false there, :func:`mmalign.oracle.verify_world_claim`).
  A neighbour without a scene graph cannot be checked and never qualifies. ``--select top1``
  takes the raw nearest neighbour, unchecked. Neither is the paper's exact rule: the paper picks
  among its top-k retrieved images with a threshold on the similarity of their *responses* (the
  retrieved image's description against the chosen answer), which needs a captioner; the
  synthetic world's scene graphs give the exact check instead (first-different), and ``top1``
  is the check-free variant closest to plain retrieval. A record none of whose k neighbours
  qualifies goes to ``rejects.jsonl`` with the reason and the candidates seen (counted).

Output (atomic, with ``manifest.json`` over the data and index manifests, so an unchanged re-run
is skipped):

* ``train/pairs.jsonl``, ``val/pairs.jsonl``: :class:`mmalign.records.PreferenceRecord` JSON,
  one per record: ``id`` (= the prompt id: the SFT record's id), ``images`` ``[original]``,
  ``prompt`` (the messages before the answer), ``chosen`` / ``rejected`` (assistant messages),
  ``rejected_images`` ``[retrieved image, relative to the data root]`` and meta ``prompt_id``,
  ``task``, ``scene_id``, ``retrieved_scene_id``, ``injection_kind``, ``injection``
  (``original``, ``replacement``, ``start``, ``end`` of the changed span), ``retrieval``
  (``rank`` 1-based among the neighbours, ``score`` cosine, ``differs``: its scene graph differs,
  ``chosen_faithfulness_on_retrieved``: share of the chosen answer's verifiable claims that hold
  on the retrieved scene; ``select``). A prompt goes to val when a hash of its id falls under
  ``--val-fraction`` (:func:`mmalign.ranking.split_of`, seed-free, stable across runs);
* ``report.json`` / ``report.md``: records read, pairs per split, injection kinds used and
  failures, retrieval statistics (how often the *raw* top-1 neighbour shows a different scene and
  how often it makes the chosen answer wrong; rank and cosine of the selected image; share
  rejected for want of a qualifying neighbour; the chosen answer's faithfulness on the selected
  image's scene);
* ``rejects.jsonl``: input lines that could not be used (``--on-error skip``) and records that got
  no pair, each with ``reason`` and ``error``.

An unusable input line (malformed JSON or record, not exactly one image, an image outside the data
root, missing, or not in the index, no scene graph) stops the stage with ``file:line: what is
wrong``, or with ``--on-error skip`` goes to ``rejects.jsonl``. Image paths are resolved with
:func:`mmalign.records.resolve_image_path` and never leave the data root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.inject import INJECTION_KINDS, inject
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
    scene: Scene
    scene_id: str
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
               on_error: str, rejects: list[dict], stats: dict[str, Counter]) -> list[Item]:
    """The distinct (image, question, chosen answer) items of an SFT file, in file order.

    ``indexed`` is a container of index ids; ``tasks`` None keeps every task. Unusable lines raise
    :class:`RecordError` (``file:line: ...``) or, with ``on_error="skip"``, go to ``rejects``.
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
            if scene is None:
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
                              scene=scene, scene_id=scene.scene_id or str(sid), line=lineno, where=where))
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.append({"line": lineno, "reason": reason, "error": str(e), "record": obj})
    return items


# ---------------------------------------------------------------------------------------------
# retrieval


def check_candidates(item: Item, claims: list, hits: list[tuple[str | None, float]],
                     scenes: dict[str, Scene]) -> list[Candidate]:
    """The neighbours ``hits`` (``(id, cosine)``, best first) checked against the scene graphs."""
    from mmalign.oracle import verify_world_claim

    own = item.scene.graph_hash()
    out = []
    for rank, (id_, score) in enumerate(hits, 1):
        if id_ is None:
            break
        scene = scenes.get(id_)
        differs = wrong = faith = None
        if scene is not None:
            differs = scene.graph_hash() != own
            verdicts = [verify_world_claim(c, scene) for c in claims]
            known = [v for v in verdicts if v is not None]
            wrong = any(v is False for v in verdicts)
            faith = sum(known) / len(known) if known else None
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
        try:
            inj = inject(item.chosen, item.scene, kind, rng)
        except ValueError as e:
            why = str(e).split(" (response:")[0].split("hallucination: ", 1)[-1]
            stats["inject_failed"][f"{kind}: {why}"] += 1
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
        "split": args.split, "tasks": sorted(args.task_set) if args.task_set else "all",
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


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--select", choices=SELECT_RULES, default="first-different",
                    help="first-different: highest-ranked neighbour whose scene differs and makes the chosen answer "
                         "wrong; top1: the raw nearest neighbour, unchecked")
    ap.add_argument("--kinds", default=",".join(INJECTION_KINDS),
                    help=f"comma-separated injection kinds to rotate through (default {','.join(INJECTION_KINDS)})")
    ap.add_argument("--seed", type=int, default=0, help="seeds the injections (with each prompt id)")
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
    config = {"split": args.split, "tasks": sorted(tasks), "limit": args.limit, "k": args.k, "select": args.select,
              "kinds": kinds, "seed": args.seed, "val_fraction": args.val_fraction, "on_error": args.on_error}
    inputs = [args.data, args.index]
    if not args.force and is_up_to_date(args.out, config, inputs):
        print(f"{STAGE}: {args.out} up to date, skipping (--force to redo)")
        return 0

    from tqdm.auto import tqdm

    from mmalign.oracle import verify_world_claim, world_claims
    from mmalign.retrieval import ImageIndex

    t0 = time.perf_counter()
    index = ImageIndex.load(args.index)
    scenes = load_scene_map(args.data)
    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        rejects: list[dict] = []
        stats: dict[str, Counter] = defaultdict(Counter)
        items = read_items(sft, args.data, scenes, index, args.task_set, args.on_error, rejects, stats)
        if args.limit:
            stats["records"]["beyond_limit"] = max(0, len(items) - args.limit)
            items = items[:args.limit]
        if not items:
            raise RecordError(f"{sft}: no usable records of tasks {tasks} ({len(rejects)} rejected; "
                              f"{stats['records']['other_task']} of other tasks)")
        table = neighbour_table(index, [it.image for it in items], args.k, not args.no_progress)
        pairs: dict[str, list[dict]] = {"train": [], "val": []}
        top1: list[Candidate] = []
        selected: list[Candidate] = []
        own_faith: list[float] = []
        for it in tqdm(items, desc="building pairs", unit="rec", disable=args.no_progress, file=sys.stderr):
            claims = world_claims(it.chosen)
            own = [v for v in (verify_world_claim(c, it.scene) for c in claims) if v is not None]
            if own:
                own_faith.append(sum(own) / len(own))
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
        n_pairs = sum(len(v) for v in pairs.values())
        if not n_pairs:
            raise RecordError(f"{sft}: no pair could be made from {len(items)} records "
                              f"({dict(Counter(r['reason'] for r in rejects))}); see --k and --select")
        for split, rows in pairs.items():
            atomic_write_jsonl(st.path / split / "pairs.jsonl", rows)
        atomic_write_jsonl(st.path / "rejects.jsonl", rejects)
        seconds = time.perf_counter() - t0
        rep = build_report(len(items), pairs, stats, top1, selected, rejects, own_faith, args, seconds)
        atomic_write_text(st.path / "report.json", json.dumps(rep, indent=2) + "\n")
        md = report_md(rep)
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
