"""The ``data`` stage: sample synthetic scenes, render them, write SFT records.

    python -m data_pipelines.scenes --out runs/demo/data --seed 0 \\
        --n-train 2000 --n-val 200 --n-test 500 --image-size 64

Output (all paths relative to ``--out``, the *data root*)::

    images/<split>/<index>.png      rendered scene, e.g. images/train/000012.png
    <split>/scenes.jsonl            scene graph + image path + graph_hash per scene
    <split>/sft.jsonl               one TRL-style conversational record per task instance
    manifest.json                   config, seed, counts per split/task, duplicates rejected

Why it is built this way:

* Splits are disjoint by :meth:`mmalign.world.Scene.graph_hash` (same objects and relations =
  same graph), so a held-out scene is never a re-rendering of a training scene. A graph's split
  is chosen by its hash (see :func:`sample_splits` for why), so all splits share one object-count
  mix. (Changing any count therefore changes every split.)
* Every random choice is seeded by ``(seed, scene_id)``: the same seed gives byte-identical PNGs
  and records; rendering one scene does not depend on any other.
* Rendering jitter (rotation a few degrees, size +-6%, colour +-12 per channel, background
  tint and pixel noise) makes every image unique while colours stay nameable and a square never
  turns into a diamond. Positions are continuous random draws stored exactly as drawn, so the
  scene graph is the ground truth of the pixels.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from mmalign.render import derived_seed as _derived_seed, render_scene  # noqa: F401  (render_scene re-exported)
from mmalign.stage import StageOutput, atomic_write_jsonl, is_up_to_date
from mmalign.world import TASKS, QA, Scene, sample_scene, scene_tasks

STAGE = "data"
#: Bump when the output of the same config changes (rendering, templates, record layout), so
#: existing outputs stop counting as up to date.
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def scene_id_for(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def image_relpath(split: str, index: int) -> str:
    return f"images/{split}/{index:06d}.png"


# ---------------------------------------------------------------------------------------------
# sampling


def split_of(graph_hash: str, fractions: Sequence[tuple[str, float]]) -> str:
    """The split a graph belongs to: its hash read as a number in [0, 1), bucketed by the
    cumulative split fractions. The same graph always lands in the same split."""
    u = int(graph_hash[:16], 16) / float(1 << 64)
    cum = 0.0
    for split, frac in fractions:
        cum += frac
        if u < cum:
            return split
    return fractions[-1][0]


def sample_splits(
    seed: int, counts: dict[str, int], min_objects: int = 1, max_objects: int = 4, max_draws_factor: int = 1000,
) -> tuple[dict[str, list[Scene]], dict[str, int]]:
    """Sample every split with disjoint, unique graph hashes; return scenes and rejection counts.

    One seeded stream of scenes; each graph goes to the split its hash selects (buckets sized in
    proportion to the requested counts) and is dropped once that split is full. Why hash
    buckets instead of filling the splits one after the other: graphs are not equally plentiful.
    There are only 72 one-object graphs (6 shapes x 6 colours x 2 sizes) against tens of
    thousands with 2-4 objects, so a split filled first would take most one-object graphs and
    the splits would differ in their object-count mix. With buckets every split gets the same
    share of each kind. Graphs are also unique *within* a split (no repeats in evaluation sets),
    which caps one-object scenes at about 3% of the data; the manifest's
    ``<split>/objects_per_scene/<n>`` counts show the mix.

    Returned counts: ``duplicates_rejected`` (graph already used), ``split_full_rejected``
    (graph's split already full).
    """
    wanted = {s: counts.get(s, 0) for s in SPLITS}
    total = sum(wanted.values())
    out: dict[str, list[Scene]] = {s: [] for s in SPLITS}
    rejected = {"duplicates_rejected": 0, "split_full_rejected": 0}
    if total == 0:
        return out, rejected
    fractions = [(s, wanted[s] / total) for s in SPLITS if wanted[s] > 0]
    rng = random.Random(_derived_seed(seed, "scenes"))
    seen: set[str] = set()
    draws = 0
    while any(len(out[s]) < wanted[s] for s in SPLITS):
        draws += 1
        if draws > max_draws_factor * total + 10_000:
            short = {s: f"{len(out[s])}/{wanted[s]}" for s in SPLITS}
            raise RuntimeError(
                f"gave up after {draws - 1} draws with splits at {short}: the world has too few distinct graphs "
                f"with {min_objects}-{max_objects} objects for these counts"
            )
        scene = sample_scene(rng, "", min_objects=min_objects, max_objects=max_objects)
        h = scene.graph_hash()
        if h in seen:
            rejected["duplicates_rejected"] += 1
            continue
        split = split_of(h, fractions)
        if len(out[split]) >= wanted[split]:
            rejected["split_full_rejected"] += 1
            continue
        seen.add(h)
        out[split].append(Scene(scene.objects, scene_id_for(split, len(out[split]))))
    return out, rejected


# ---------------------------------------------------------------------------------------------
# records


def sft_record(scene: Scene, split: str, index: int, qa: QA, k: int) -> dict[str, Any]:
    """One task instance in the TRL / HF vision conversational format, plus task metadata.

    ``k`` numbers repeated instances of a task within a scene (``--qa-per-scene``); the first
    has no suffix, so ids read ``train-000012-count`` and ``train-000012-count-1``.
    """
    rid = f"{scene.scene_id}-{qa.task}" + (f"-{k}" if k else "")
    return {
        "id": rid,
        "images": [image_relpath(split, index)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]},
        ],
        "task": qa.task,
        "scene_id": scene.scene_id,
        "question": qa.question,
        "answer": qa.answer,
        "label": qa.label,
        "meta": qa.meta,
    }


def scene_record(scene: Scene, split: str, index: int) -> dict[str, Any]:
    """The scene graph line of ``scenes.jsonl`` (readable back with ``Scene.from_dict``)."""
    names = [o.name() for o in scene.objects]
    return {
        **scene.to_dict(),
        "split": split,
        "image": image_relpath(split, index),
        "graph_hash": scene.graph_hash(),
        "relations": [[names[r.subject], r.relation, names[r.object]] for r in scene.relations()],
    }


def scene_instances(scene: Scene, seed: int, qa_per_scene: int, yes_no_answers: str = "short") -> list[QA]:
    """The task instances of one scene, seeded by (seed, scene_id) only."""
    return scene_tasks(scene, random.Random(_derived_seed(seed, "tasks", scene.scene_id)), qa_per_scene,
                       explain_yes_no=yes_no_answers == "explained")


# ---------------------------------------------------------------------------------------------
# the stage


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that determines the output (not ``--out`` / ``--force``)."""
    return {
        "format_version": FORMAT_VERSION,
        "seed": args.seed,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "image_size": args.image_size,
        "min_objects": args.min_objects,
        "max_objects": args.max_objects,
        "qa_per_scene": args.qa_per_scene,
        "yes_no_answers": args.yes_no_answers,
    }


class _Progress:
    """A rich progress bar on a terminal, a plain line per split otherwise (logs, CI)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import Progress

            self._progress = Progress(transient=True)
            self._progress.__enter__()
        return self

    def task(self, description: str, total: int) -> Any:
        return None if self._progress is None else self._progress.add_task(description, total=total)

    def advance(self, task: Any) -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def generate(out: Path, config: dict[str, Any], progress: bool = True) -> dict[str, int]:
    """Write the whole data stage to ``out`` atomically; returns the manifest counts."""
    seed = config["seed"]
    counts = {"train": config["n_train"], "val": config["n_val"], "test": config["n_test"]}
    with StageOutput(out, stage=STAGE, config=config, inputs=[]) as st:
        splits, rejected = sample_splits(seed, counts, config["min_objects"], config["max_objects"])
        for key, n in rejected.items():
            st.count(key, n)
        with _Progress(progress) as bar:
            for split in SPLITS:
                t0 = time.perf_counter()
                (st.path / "images" / split).mkdir(parents=True, exist_ok=True)
                task = bar.task(f"rendering {split}", len(splits[split]))
                scene_lines, sft_lines = [], []
                for index, scene in enumerate(splits[split]):
                    render_scene(scene, config["image_size"], seed).save(
                        st.path / image_relpath(split, index), format="PNG", optimize=False)
                    scene_lines.append(scene_record(scene, split, index))
                    per_task: dict[str, int] = {}
                    for qa in scene_instances(scene, seed, config["qa_per_scene"], config.get("yes_no_answers", "short")):
                        k = per_task.get(qa.task, 0)
                        per_task[qa.task] = k + 1
                        sft_lines.append(sft_record(scene, split, index, qa, k))
                        st.count(f"{split}/records/{qa.task}")
                        if qa.label is not None:
                            st.count(f"{split}/{'yes' if qa.label else 'no'}")
                    st.count(f"{split}/objects_per_scene/{len(scene.objects)}")
                    bar.advance(task)
                atomic_write_jsonl(st.path / split / "scenes.jsonl", scene_lines)
                atomic_write_jsonl(st.path / split / "sft.jsonl", sft_lines)
                st.count(f"{split}/scenes", len(scene_lines))
                st.count(f"{split}/records", len(sft_lines))
                if not bar.enabled:
                    print(f"  {split}: rendered {len(scene_lines)} images, {len(sft_lines)} records "
                          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        result = dict(st.counts)
    return result


def summary(counts: dict[str, int], seconds: float) -> str:
    """A small table: records per split and task, yes/no balance, duplicates, time."""
    lines = [f"{'split':<6} {'scenes':>6} " + " ".join(f"{t:>16}" for t in TASKS) + f" {'yes/no':>11}"]
    for split in SPLITS:
        cells = " ".join(f"{counts.get(f'{split}/records/{t}', 0):>16}" for t in TASKS)
        yn = f"{counts.get(f'{split}/yes', 0)}/{counts.get(f'{split}/no', 0)}"
        lines.append(f"{split:<6} {counts.get(f'{split}/scenes', 0):>6} {cells} {yn:>11}")
    lines.append(f"duplicate graphs rejected: {counts.get('duplicates_rejected', 0)}; took {seconds:.1f}s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.scenes",
        description="Data stage: sample synthetic scenes (1-4 coloured shapes), render them with Pillow and write "
                    "scene graphs plus SFT records (captions, yes/no questions, counting) with splits disjoint by "
                    "scene-graph hash. Skips when --out is already up to date with the same options.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo/data"),
                   help="output folder (the data root: record image paths are relative to it); replaced atomically")
    p.add_argument("--seed", type=int, default=0, help="seed for scene sampling, rendering jitter and prompt paraphrases")
    p.add_argument("--n-train", type=int, default=2000,
                   help="training scenes; each gives ~6 records (2 captions, 3 yes/no, 1 count)")
    p.add_argument("--n-val", type=int, default=200, help="validation scenes")
    p.add_argument("--n-test", type=int, default=500, help="held-out test scenes (graphs never seen in train/val)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (the tiny model uses 64, patch 8)")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects per scene")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per scene (more than ~6 rarely fit at 64 px)")
    p.add_argument("--qa-per-scene", type=int, default=1,
                   help="instances of each question kind (existence, attribute, relation, count) per scene")
    p.add_argument("--yes-no-answers", choices=("short", "explained"), default="short",
                   help="'short': 'Yes.' / 'No.'; 'explained': the answer goes on to say what the image shows "
                        "('No, it is small.')")
    p.add_argument("--force", action="store_true", help="regenerate even if --out is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("n_train", "n_val", "n_test"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.image_size < 16:
        p.error("--image-size must be at least 16 pixels (shapes become unrecognisable below that)")
    if not 1 <= args.min_objects <= args.max_objects <= 10:
        p.error("need 1 <= --min-objects <= --max-objects <= 10")
    if args.qa_per_scene < 1:
        p.error("--qa-per-scene must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = build_config(args)
    if not args.force and is_up_to_date(args.out, config, []):
        print(f"{STAGE}: {args.out} up to date, skipping (use --force to regenerate)")
        return 0
    t0 = time.perf_counter()
    counts = generate(args.out, config, progress=not args.no_progress)
    print(f"{STAGE}: wrote {args.out}")
    print(summary(counts, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
