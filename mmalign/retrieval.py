"""Image retrieval: a FAISS index over L2-normalised image embeddings, and the embedder protocol.

Why: Re-Align (Xing et al. 2025, "Re-Align: Aligning Vision Language Models via
Retrieval-Augmented Direct Preference Optimization") builds its rejected side from a *retrieved*
image: every training image is embedded with the VLM's own vision encoder, and the images most
similar to the input image (cosine similarity, top-k, tried in order of similarity) condition the
hallucinated completion and serve as the visual DPO term's rejected image. This module is that
knowledge base, model-free: vectors in, ``(scores, ids)`` out. Producing the vectors is an
:class:`ImageEmbedder`'s job (``models.embedders`` implements it for a policy checkpoint's vision
tower and for CLIP-style models); ``mmalign`` never imports a model family.

All vectors are L2-normalised on the way in (index and queries), so the inner product the index
computes *is* the cosine similarity, in ``[-1, 1]``. Three index kinds, chosen by
:class:`IndexConfig`:

* ``"flat"`` -- ``faiss.IndexFlatIP``: exact search, no training; the right choice up to a few
  hundred thousand images (the benchmark, ``benchmarks/bench_index.py``, measures where).
* ``"ivf"`` -- ``faiss.IndexIVFFlat`` (inner-product metric, flat inner-product coarse
  quantizer): k-means into ``nlist`` cells, trained on the vectors; a query scans the ``nprobe``
  nearest cells. Needs training before :meth:`ImageIndex.add`.
* ``"hnsw"`` -- ``faiss.IndexHNSWFlat`` (inner-product metric): a graph with ``m`` links per
  node, searched with beam width ``ef_search``. No training; fast queries, slower build.

FAISS labels vectors by insertion order (0, 1, ...), so the index keeps the string ids beside it
in that order, and the normalised embeddings too (row ``i`` of :attr:`ImageIndex.embeddings` is
the vector of ``ids[i]``; a later stage can look up an image's vector without re-embedding it).

A saved index is a folder of three files::

    index.faiss       faiss.write_index of the index
    embeddings.npy    (N, D) float32, the normalised vectors, row i = ids[i]
    ids.json          format version, kind, config, dim, count, info and the N ids; written last

:meth:`ImageIndex.save` deletes ``ids.json`` first and writes it back last (each file through a
temporary file and ``os.replace``), so a folder whose save was interrupted has no ``ids.json``
and :meth:`ImageIndex.load` refuses it. For an all-or-nothing folder *with* a manifest, save inside
a :class:`mmalign.stage.StageOutput`, as the ``index`` stage (``data_pipelines/index.py``) does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import faiss
import numpy as np
from PIL import Image

from mmalign.stage import atomic_write_text

KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE = "index.faiss", "embeddings.npy", "ids.json"
#: Bumped when the saved layout changes incompatibly.
FORMAT_VERSION = 1
# A vector shorter than this cannot be normalised meaningfully (an all-zero embedding).
_MIN_NORM = 1e-12


class IndexNotTrainedError(RuntimeError):
    """An IVF index was asked to add vectors before its k-means cells were trained."""


# --------------------------------------------------------------------------------------------
# the embedder protocol


@runtime_checkable
class ImageEmbedder(Protocol):
    """Anything that turns images into fixed-size vectors for the index.

    Attributes:
        name: identity of the embedding function (model, checkpoint hash, pooling), recorded in
            the index stage's manifest: an index is only up to date for the embedder that made it,
            and queries must be embedded by the same one.
        dim: width ``D`` of the vectors :meth:`embed` returns.
    """

    name: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images: ``(N, D)`` float32, one row per image, in order (not necessarily
        normalised; the index normalises). Implementations batch internally and need no grad."""
        ...


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class IndexConfig:
    """Which FAISS index, and its parameters.

    Attributes:
        kind: "flat" (exact), "ivf" (inverted lists, trained) or "hnsw" (graph).
        nlist: IVF: number of k-means cells. Training needs at least this many vectors, and
            FAISS wants ~39 per cell for stable centroids (it warns below that). A common choice
            is 4 * sqrt(N): 1,265 cells for 100k images.
        nprobe: IVF: cells scanned per query (recall/speed knob; nprobe = nlist is exact).
        m: HNSW: links per node (memory ~ N * m * 8 bytes beside the vectors).
        ef_construction: HNSW: beam width while inserting (build time/graph quality).
        ef_search: HNSW: beam width while searching (recall/speed knob; >= k).
    """

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = 256
    nprobe: int = 16
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {KINDS}")
        for name in ("nlist", "nprobe", "m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexConfig.{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# helpers


def l2_normalize(vectors: Any, what: str = "vectors", ids: Sequence[str] | None = None) -> np.ndarray:
    """``vectors`` ``(N, D)`` as a C-contiguous float32 copy with unit rows.

    Raises ValueError for a non-2-D array, non-finite values or an all-zero row (its cosine
    similarity is undefined), naming the row (and its id when ``ids`` is given).
    """
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N, D), got shape {x.shape}")

    def name(i: int) -> str:
        return f"row {i}" + (f" (id {ids[i]!r})" if ids is not None else "")

    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {name(int(np.argmax(bad)))} has NaN or infinite values")
    norms = np.linalg.norm(x, axis=1)
    small = norms < _MIN_NORM
    if small.any():
        raise ValueError(f"{what}: {name(int(np.argmax(small)))} is all zeros; it has no direction to compare")
    x /= norms[:, None]
    return x


def _atomic_file(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then fsync and ``os.replace`` the result over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_npy(array: np.ndarray) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return write


# --------------------------------------------------------------------------------------------
# the index


class ImageIndex:
    """A cosine-similarity index of image embeddings with string ids.

    Args:
        dim: vector width ``D``.
        config: the index kind and parameters (default: exact flat search).
        info: JSON-able facts saved beside the index (e.g. which embedder made the vectors).

    Typical use::

        index = ImageIndex.build(ids, vectors, IndexConfig(kind="hnsw"))   # (N, D) vectors
        scores, hits = index.search(query_vectors, k=5)                    # (Q, 5), (Q, 5)
        index.save("runs/demo/index"); index = ImageIndex.load("runs/demo/index")
        index.add(new_ids, new_vectors)                                    # no rebuild
    """

    def __init__(self, dim: int, config: IndexConfig | None = None, info: dict[str, Any] | None = None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.config = config if config is not None else IndexConfig()
        self.info: dict[str, Any] = dict(info or {})
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._chunks: list[np.ndarray] = []
        self._quantizer = None  # the IVF coarse quantizer; held so Python does not free it first
        self.index = self._new_index()

    # -- construction ----------------------------------------------------------------------------

    def _new_index(self) -> faiss.Index:
        c, ip = self.config, faiss.METRIC_INNER_PRODUCT
        if c.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if c.kind == "ivf":
            self._quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(self._quantizer, self.dim, c.nlist, ip)
            index.nprobe = c.nprobe
            return index
        index = faiss.IndexHNSWFlat(self.dim, c.m, ip)
        index.hnsw.efConstruction = c.ef_construction
        index.hnsw.efSearch = c.ef_search
        return index

    @classmethod
    def build(cls, ids: Sequence[str], vectors: Any, config: IndexConfig | None = None,
              info: dict[str, Any] | None = None) -> ImageIndex:
        """A new index holding ``vectors`` ``(N, D)`` under ``ids`` (length N); an IVF index is
        trained on these same vectors first."""
        x = np.asarray(vectors)
        if x.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array (N, D), got shape {x.shape}")
        index = cls(int(x.shape[1]), config, info)
        index.train(x)
        index.add(ids, x)
        return index

    def train(self, vectors: Any) -> None:
        """Train the IVF cells (k-means, FAISS's fixed seed) on ``vectors`` ``(N, D)``, N >= nlist.
        A no-op for "flat" and "hnsw", which need no training."""
        if self.config.kind != "ivf":
            return
        if self.index.ntotal:
            raise ValueError("the IVF index already holds vectors; train it before the first add")
        x = l2_normalize(vectors, "training vectors")
        self._check_dim(x, "training vectors")
        if x.shape[0] < self.config.nlist:
            raise ValueError(f"IVF training needs at least nlist={self.config.nlist} vectors, got {x.shape[0]}: "
                             "lower nlist (about 4 * sqrt(N)) or use kind 'flat'")
        self.index.train(x)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    # -- contents --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._rows

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def ids(self) -> list[str]:
        """The ids in insertion order (row ``i`` of :attr:`embeddings` belongs to ``ids[i]``)."""
        return list(self._ids)

    @property
    def embeddings(self) -> np.ndarray:
        """The normalised vectors ``(N, D)`` float32, in insertion order."""
        if not self._chunks:
            return np.empty((0, self.dim), dtype=np.float32)
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored normalised vectors of ``ids``: ``(len(ids), D)``; KeyError for an unknown id."""
        missing = [i for i in ids if i not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
        return self.embeddings[[self._rows[i] for i in ids]]

    def _check_dim(self, x: np.ndarray, what: str) -> None:
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dim {x.shape[1]}, the index has dim {self.dim}")

    def add(self, ids: Sequence[str], vectors: Any) -> None:
        """Add ``vectors`` ``(N, D)`` under ``ids`` (N distinct strings, none already present).

        Nothing is added if any check fails. An IVF index must be trained first
        (:meth:`train`, or :meth:`build`); vectors added later are assigned to the existing cells,
        so rebuild when the new images differ a lot from the training ones.
        """
        ids = list(ids)
        for i in ids:
            if not isinstance(i, str) or not i:
                raise TypeError(f"ids must be non-empty strings, got {i!r}")
        x = l2_normalize(vectors, "vectors", ids if len(ids) == len(vectors) else None)
        self._check_dim(x, "vectors")
        if len(ids) != x.shape[0]:
            raise ValueError(f"{len(ids)} ids for {x.shape[0]} vectors")
        seen: set[str] = set()
        for i in ids:
            if i in self._rows:
                raise ValueError(f"duplicate id {i!r}: already in the index (row {self._rows[i]})")
            if i in seen:
                raise ValueError(f"duplicate id {i!r} within this add")
            seen.add(i)
        if not self.is_trained:
            raise IndexNotTrainedError(
                f"the IVF index (nlist={self.config.nlist}) is not trained: call train(vectors) with at least "
                "nlist representative vectors before add(), or use ImageIndex.build(ids, vectors, config)")
        if not ids:
            return
        self.index.add(x)
        start = len(self._ids)
        self._ids.extend(ids)
        self._rows.update((i, start + n) for n, i in enumerate(ids))
        self._chunks.append(x)

    # -- search ----------------------------------------------------------------------------------

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the query-time knobs (IVF ``nprobe``, HNSW ``ef_search``) without a rebuild."""
        if nprobe is not None:
            self.config.nprobe = nprobe
        if ef_search is not None:
            self.config.ef_search = ef_search
        IndexConfig(**asdict(self.config))  # validate
        if self.kind == "ivf":
            self.index.nprobe = self.config.nprobe
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = self.config.ef_search

    def search_rows(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine similarity for ``queries`` ``(Q, D)``: ``(scores, rows)``, both
        ``(Q, k)`` -- float32 cosines in descending order and int64 row numbers into :attr:`ids`;
        where fewer than ``k`` were found (k > N, or an IVF probe reached too few vectors) the row
        is -1 and the score -inf."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = l2_normalize(queries, "queries")
        self._check_dim(q, "queries")
        if not len(self):
            return np.full((q.shape[0], k), -np.inf, dtype=np.float32), np.full((q.shape[0], k), -1, dtype=np.int64)
        scores, rows = self.index.search(q, k)
        scores[rows < 0] = -np.inf
        return scores, rows

    def search(self, queries: Any, k: int,
               exclude: Sequence[str | Collection[str] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours of ``queries`` ``(Q, D)`` by cosine similarity.

        Args:
            queries: query vectors ``(Q, D)`` (normalised here).
            k: neighbours per query.
            exclude: per query, an id or a collection of ids to leave out of its results -- e.g.
                the query image's own id when the query is an indexed image (Re-Align retrieves
                *other* images that look alike).

        Returns:
            ``(scores, ids)``: ``scores`` ``(Q, k)`` float32 cosines, descending; ``ids`` ``(Q, k)``
            object array of id strings, ``None`` (with score -inf) where fewer than ``k`` were found.
        """
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries (one per query)")
        skip = [set() if e is None else {e} if isinstance(e, str) else set(e) for e in exclude or []]
        extra = max((len(s) for s in skip), default=0)
        scores, rows = self.search_rows(queries, k + extra)
        out_scores = np.full((rows.shape[0], k), -np.inf, dtype=np.float32)
        out_ids = np.full((rows.shape[0], k), None, dtype=object)
        for qi in range(rows.shape[0]):
            j = 0
            for s, r in zip(scores[qi], rows[qi]):
                if r < 0 or j == k:
                    break
                id_ = self._ids[r]
                if skip and id_ in skip[qi]:
                    continue
                out_scores[qi, j], out_ids[qi, j] = s, id_
                j += 1
        return out_scores, out_ids

    def neighbours(self, ids: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` *other* indexed images for indexed images ``ids``, by their stored vectors:
        :meth:`search` with each id excluded from its own results. ``(scores, ids)``, ``(len(ids), k)``."""
        return self.search(self.vectors(ids), k, exclude=list(ids))

    # -- persistence -----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``embeddings.npy`` and ``ids.json`` (last) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # Until ids.json is back the folder is visibly incomplete (load refuses it).
        (d / IDS_FILE).unlink(missing_ok=True)
        _atomic_file(d / INDEX_FILE, lambda tmp: faiss.write_index(self.index, tmp))
        _atomic_file(d / EMBEDDINGS_FILE, _save_npy(self.embeddings))
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "metric": "inner_product (cosine)",
                "dim": self.dim, "count": len(self), "config": asdict(self.config), "info": self.info,
                "files": {"index": INDEX_FILE, "embeddings": EMBEDDINGS_FILE}, "ids": self._ids}
        atomic_write_text(d / IDS_FILE, json.dumps(meta, ensure_ascii=False) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, nprobe: int | None = None,
             ef_search: int | None = None) -> ImageIndex:
        """Read a folder written by :meth:`save`, checking that the three files agree on kind,
        dim and count (errors name the file); ``nprobe`` / ``ef_search`` override the saved
        query-time knobs."""
        d = Path(directory)
        ids_file, index_file, emb_file = d / IDS_FILE, d / INDEX_FILE, d / EMBEDDINGS_FILE
        if not ids_file.is_file():
            raise FileNotFoundError(f"{ids_file} not found: {d} is not a saved ImageIndex, or its save was interrupted")
        try:
            meta = json.loads(ids_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{ids_file}: cannot be read as JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{ids_file}: not an ImageIndex file of format version {FORMAT_VERSION}")
        try:
            config = IndexConfig(**meta["config"])
            dim, count, ids = int(meta["dim"]), int(meta["count"]), meta["ids"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{ids_file}: malformed: {e}") from None
        if not isinstance(ids, list) or len(ids) != count:
            raise ValueError(f"{ids_file}: says count={count} but lists {len(ids) if isinstance(ids, list) else 'no'} ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{ids_file}: an id appears more than once")
        for f in (index_file, emb_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (listed by {ids_file})")
        try:
            index = faiss.read_index(str(index_file))
        except RuntimeError as e:
            raise ValueError(f"{index_file}: cannot be read by faiss: {str(e).splitlines()[0]}") from None
        expected = {"flat": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}[config.kind]
        if not isinstance(index, expected) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{index_file}: holds a {type(index).__name__} (metric {index.metric_type}), "
                             f"but {ids_file} says kind {config.kind!r} with the inner-product metric")
        if index.d != dim:
            raise ValueError(f"{index_file}: has dim {index.d}, {ids_file} says {dim}")
        if index.ntotal != count:
            raise ValueError(f"{index_file}: holds {index.ntotal} vectors, {ids_file} lists {count} ids")
        try:
            emb = np.load(emb_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{emb_file}: cannot be read: {e}") from None
        if emb.ndim != 2 or emb.shape != (count, dim) or emb.dtype != np.float32:
            raise ValueError(f"{emb_file}: holds {emb.dtype} {emb.shape}, expected float32 ({count}, {dim}) "
                             f"to match {ids_file}")
        out = cls(dim, config, meta.get("info") or {})
        out.index, out._quantizer = index, None  # a read index owns its quantizer
        out._ids = list(ids)
        out._rows = {i: n for n, i in enumerate(ids)}
        out._chunks = [np.ascontiguousarray(emb)] if count else []
        out.set_search_params(nprobe=nprobe, ef_search=ef_search)
        return out

    def __repr__(self) -> str:
        c = self.config
        knobs = {"flat": "", "ivf": f", nlist={c.nlist}, nprobe={c.nprobe}",
                 "hnsw": f", m={c.m}, ef_search={c.ef_search}"}[self.kind]
        return f"ImageIndex(kind={self.kind!r}, dim={self.dim}, n={len(self)}{knobs})"


def recall_at_k(found: Any, truth: Any) -> float:
    """Mean fraction of the true top-k each query found: ``|found_q ∩ truth_q| / k``, averaged
    over queries. ``found`` and ``truth`` are ``(Q, k)`` arrays of row numbers (or ids); -1 /
    None entries in ``found`` never count. Order within a row does not matter."""
    f, t = np.asarray(found), np.asarray(truth)
    if f.shape != t.shape or f.ndim != 2 or f.shape[1] == 0:
        raise ValueError(f"found {f.shape} and truth {t.shape} must both be (Q, k) with k >= 1")
    if f.shape[0] == 0:
        return math.nan
    hits = [len({x for x in fr if x is not None and x != -1} & {x for x in tr if x is not None and x != -1})
            for fr, tr in zip(f.tolist(), t.tolist())]
    return float(np.mean(hits) / f.shape[1])
