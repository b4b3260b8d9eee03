"""The ``index`` stage: embed every image of a data root and build a FAISS retrieval index.

    python -m data_pipelines.index --data runs/demo/data --splits train --embedder policy \\
        --model runs/demo/sft/model --kind flat --out runs/demo/index
    python -m data_pipelines.index ... --splits val --add        # append, no rebuild

Re-Align's knowledge base (Xing et al. 2025): every training image is embedded with the policy's
own vision encoder (``--embedder policy``, :class:`models.embedders.PolicyVisionEmbedder`; or any
CLIP-style model with ``--embedder clip``), and a later stage retrieves, for each image, the most
similar *other* images by cosine similarity (:meth:`mmalign.retrieval.ImageIndex.neighbours`).

Which images: the scenes of ``--splits`` (``<data>/<split>/scenes.jsonl``, the data stage's
output) and/or every .png/.jpg/.jpeg under ``--images`` folders inside the data root (e.g. COCO
``train2014``). An image's id is its path relative to the data root (``images/train/000000.png``),
so a retrieved id can go straight into a record's ``images``.

Output (atomic, with ``manifest.json``): ``index.faiss``, ``embeddings.npy`` (N, D) float32
normalised, ``ids.json`` (see :class:`mmalign.retrieval.ImageIndex`). The stage is up to date when
the embedder, the checkpoint (hash of its weights), the index parameters, the sources and the image
listing (ids and file sizes) are unchanged. ``--add`` loads the existing index, embeds only the
images it does not hold yet, adds them (an IVF index keeps its trained cells) and writes the
result atomically; the manifest then reads as if the union had been indexed at once. Every image
is checked to exist before the model loads; an unreadable one stops the stage with its path.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmalign.records import RecordError, load_image, read_scenes, resolve_image_path
from mmalign.retrieval import ImageIndex, IndexConfig
from mmalign.stage import (
    MANIFEST,
    StageOutput,
    checkpoint_id,
    is_up_to_date,
    read_manifest,
    sha256_json,
)

STAGE = "index"
EMBEDDERS = {"policy": "models.embedders.PolicyVisionEmbedder", "clip": "models.embedders.CLIPEmbedder"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(data: Path, splits: list[str], folders: list[str],
                counts: dict[str, int] | None = None) -> list[tuple[str, Path, str]]:
    """``(id, absolute path, where it was listed)`` for every image of ``splits`` (scene records)
    and ``folders`` (every image file under them), ids relative to the data root, each once.
    ``counts``, when given, is filled with the number of images per split / folder."""
    root = data.resolve()
    out: list[tuple[str, Path, str]] = []
    seen: dict[str, str] = {}
    counts = counts if counts is not None else {}

    def put(full: Path, where: str, source: str) -> None:
        id_ = full.relative_to(root).as_posix()
        if id_ in seen:
            raise RecordError(f"{where}: image {id_} is listed twice (first at {seen[id_]})")
        seen[id_] = where
        out.append((id_, full, where))
        counts[source] = counts.get(source, 0) + 1

    for split in splits:
        scenes_file = data / split / "scenes.jsonl"
        if not scenes_file.is_file():
            raise FileNotFoundError(f"{scenes_file}: no such scenes file (is --data a data stage output "
                                    f"with a {split!r} split?)")
        for scene, rel in read_scenes(scenes_file):
            where = f"{scenes_file} scene {scene.scene_id}"
            put(resolve_image_path(rel, data, where), where, split)
    for folder in folders:
        d = resolve_image_path(folder, data, f"--images {folder}")
        if not d.is_dir():
            raise FileNotFoundError(f"--images {folder}: {d} is not a folder")
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                put(resolve_image_path(p, data, f"--images {folder}"), f"--images {folder}", folder)
    return out


def check_exist(items: list[tuple[str, Path, str]]) -> None:
    """Fail before any model loads if an image file is missing (naming up to five)."""
    missing = [(p, w) for _, p, w in items if not p.is_file()]
    if missing:
        shown = "; ".join(f"{w}: {p}" for p, w in missing[:5])
        raise RecordError(f"{len(missing)} image file(s) missing: {shown}" + (" ..." if len(missing) > 5 else ""))


def embed_items(embedder: Any, items: list[tuple[str, Path, str]], batch_size: int, progress: bool = True):
    """``(N, D)`` float32 embeddings of the images of ``items``, loaded and embedded ``batch_size``
    at a time (memory stays one batch of images); a corrupt image raises naming its file."""
    import numpy as np
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=len(items), desc="embedding images", unit="img", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            images = [load_image(p, w) for _, p, w in batch]
            x = np.asarray(embedder.embed(images), dtype=np.float32)
            if x.shape[0] != len(batch):
                raise RuntimeError(f"{embedder.name}: {len(batch)} images gave {x.shape[0]} embeddings")
            chunks.append(x)
            bar.update(len(batch))
    return np.concatenate(chunks) if chunks else np.empty((0, int(embedder.dim)), dtype=np.float32)


def stage_config(args: argparse.Namespace, splits: list[str], folders: list[str],
                 items: list[tuple[str, Path, str]]) -> dict[str, Any]:
    """What the output depends on. Order-free (sorted sources, sorted listing), so an index grown
    with ``--add`` reads the same as one built from the union at once."""
    embedder_class = args.embedder_class or EMBEDDERS[args.embedder]
    return {
        "embedder_class": embedder_class,
        "model": checkpoint_id(args.model),
        "projector": bool(args.projector) if embedder_class == EMBEDDERS["policy"] else None,
        "index": asdict(index_config(args)),
        "splits": sorted(set(splits)),
        "images": sorted(set(folders)),
        "listing_sha256": sha256_json(sorted([id_, p.stat().st_size if p.is_file() else -1] for id_, p, _ in items)),
    }


def index_config(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, m=args.m,
                       ef_construction=args.ef_construction, ef_search=args.ef_search)


def load_embedder(args: argparse.Namespace) -> Any:
    from mmalign.components import load_component

    class_path = args.embedder_class or EMBEDDERS[args.embedder]
    kwargs: dict[str, Any] = {"path": str(args.model), "batch_size": args.batch_size, "device": args.device}
    if class_path == EMBEDDERS["policy"]:
        kwargs["projector"] = args.projector
    return load_component(class_path, **kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="data root; ids are image paths relative to it")
    ap.add_argument("--splits", nargs="*", default=None,
                    help="splits whose scene images to index (<data>/<split>/scenes.jsonl); default: train, "
                         "or none when --images is given")
    ap.add_argument("--images", nargs="*", default=[],
                    help="folders under --data whose .png/.jpg/.jpeg files to index (e.g. COCO train2014)")
    ap.add_argument("--embedder", choices=sorted(EMBEDDERS), default="policy",
                    help="policy: the checkpoint's own vision tower (Re-Align); clip: a CLIP-style model")
    ap.add_argument("--embedder-class", default=None, help="any ImageEmbedder class path (overrides --embedder)")
    ap.add_argument("--model", required=True, type=Path, help="the embedder's checkpoint folder")
    ap.add_argument("--projector", action="store_true",
                    help="policy embedder: pool the projector's output instead of the vision tower's")
    ap.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                    help="flat: exact; ivf / hnsw: approximate (see benchmarks/bench_index.py)")
    defaults = IndexConfig()
    ap.add_argument("--nlist", type=int, default=defaults.nlist, help="ivf: k-means cells (<= number of images)")
    ap.add_argument("--nprobe", type=int, default=defaults.nprobe, help="ivf: cells scanned per query")
    ap.add_argument("--m", type=int, default=defaults.m, help="hnsw: links per node")
    ap.add_argument("--ef-construction", type=int, default=defaults.ef_construction, help="hnsw: build beam width")
    ap.add_argument("--ef-search", type=int, default=defaults.ef_search, help="hnsw: search beam width")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--add", action="store_true",
                    help="append the images the existing index at --out does not hold yet (no rebuild)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.add and args.force:
        ap.error("--add and --force do not go together (--force rebuilds from scratch)")
    splits = args.splits if args.splits is not None else ([] if args.images else ["train"])
    if not splits and not args.images:
        ap.error("nothing to index: give --splits and/or --images")

    try:
        args.index = index_config(args)
        if not (args.model / "config.json").is_file():
            raise FileNotFoundError(f"{args.model}: no config.json; not a checkpoint folder")
        inputs = [args.model / "config.json"] + ([args.data] if (args.data / MANIFEST).is_file() else [])
        counts: dict[str, int] = {}
        items = list_images(args.data, splits, args.images, counts)
        old = None
        if args.add:
            old = read_manifest(args.out)
            if old is None:
                raise FileNotFoundError(f"--add: {args.out} holds no complete index; build it first (without --add)")
            splits = sorted(set(splits) | set(old["config"].get("splits", [])))
            folders = sorted(set(args.images) | set(old["config"].get("images", [])))
            counts = {}
            items = list_images(args.data, splits, folders, counts)
        else:
            folders = list(args.images)
        config = stage_config(args, splits, folders, items)
        if old is not None:
            for key in ("embedder_class", "model", "projector", "index"):
                if old["config"].get(key) != config[key]:
                    raise ValueError(f"--add: the index at {args.out} was built with {key}={old['config'].get(key)!r}, "
                                     f"this run has {config[key]!r}; rebuild without --add")
        if not args.force and is_up_to_date(args.out, config, inputs):
            print(f"{args.out}: up to date (use --force to rebuild)")
            return 0
        index = ImageIndex.load(args.out) if args.add else None
        todo = [it for it in items if index is None or it[0] not in index]
        check_exist(todo)
        if not todo:
            print(f"{args.out}: nothing to add, all {len(items)} images are indexed")
            return 0
        embedder = load_embedder(args)
        t0 = time.perf_counter()
        vectors = embed_items(embedder, todo, args.batch_size, progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        ids = [id_ for id_, _, _ in todo]
        if index is None:
            info = {"embedder": embedder.name, "embedder_class": config["embedder_class"],
                    "ids": "image paths relative to the data root"}
            index = ImageIndex.build(ids, vectors, args.index, info=info)
        else:
            if index.info.get("embedder") not in (None, embedder.name):
                raise ValueError(f"--add: the index holds {index.info['embedder']} vectors, this embedder is "
                                 f"{embedder.name}; rebuild without --add")
            index.add(ids, vectors)
    except (RecordError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    with StageOutput(args.out, stage=STAGE, config=config, inputs=inputs) as st:
        index.save(st.path)
        st.count("images", len(index))
        st.count("embedded_this_run", len(todo))
        for source, n in counts.items():
            st.count(f"listed/{source}", n)
        st.count("milliseconds", round(seconds * 1000))
        st.info.update({"embedder": embedder.name, "dim": index.dim, "kind": index.kind,
                        "images_per_s": round(len(todo) / max(seconds, 1e-9), 1)})
    verb = "added" if args.add else "indexed"
    print(f"{len(todo)} images embedded by {embedder.name} in {seconds:.1f} s "
          f"({len(todo) / max(seconds, 1e-9):.0f} images/s); {verb}: {index!r} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
