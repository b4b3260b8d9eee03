"""Shared machinery for pipeline stages: content hashes, atomic outputs and manifests.

Why: stages talk through files only, so a stage's output must never be seen half-written, and a
re-run with unchanged inputs should cost nothing. The contract every stage follows:

* A stage writes into a temporary sibling folder (``<out>.tmp-<pid>``) and, on success, writes
  ``manifest.json`` *last* and swaps the folder into place. A folder without ``manifest.json``
  is never a complete output; a failed run leaves the previous complete output untouched.
* ``manifest.json`` records the stage name, its config, the seed, the sha256 of every input,
  counts, the UTC creation time and the mmalign version.
* :func:`is_up_to_date` compares the config and input hashes with the manifest, so a stage can
  print "up to date, skipping" and exit 0 (``--force`` redoes the work).

Typical use::

    if not args.force and is_up_to_date(out, cfg, inputs):
        print(f"{stage}: {out} up to date, skipping"); return 0
    with StageOutput(out, stage="data", config=cfg, inputs=inputs) as st:
        atomic_write_jsonl(st.path / "train.jsonl", records)
        st.count("train", len(records))
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping, Sequence

MANIFEST = "manifest.json"
#: Bumped when the manifest layout changes incompatibly; older manifests are then out of date.
MANIFEST_VERSION = 1

PathLike = str | os.PathLike


def _json_default(obj: Any) -> Any:
    """Make configs with paths, tuples and sets hashable as JSON, deterministically."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"config value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it will read back from JSON (tuples -> lists, paths -> str), so a config
    compares equal to what a manifest stored for it."""
    return json.loads(_canonical_json(dict(config)))


def sha256_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal for equal data."""
    return hashlib.sha256(_canonical_json(obj).encode("utf-8")).hexdigest()


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (inputs may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_id(model: PathLike) -> str:
    """``<folder name>@<sha256 of the first weights file, 12 hex>``: which checkpoint made a
    response or a reference log-prob, recorded beside it."""
    model = Path(model)
    weights = sorted(model.glob("*.safetensors"))
    digest = sha256_file(weights[0])[:12] if weights else "no-weights"
    return f"{model.name}@{digest}"


def input_hash(path: PathLike) -> str:
    """Content hash of one stage input.

    A file hashes its bytes. A folder is another stage's output and hashes its ``manifest.json``
    (which changes whenever that stage re-runs), so thousands of images need not be read; a
    folder without a manifest is an incomplete output and is refused.
    """
    p = Path(path)
    if p.is_dir():
        m = p / MANIFEST
        if not m.is_file():
            raise FileNotFoundError(f"input folder {p} has no {MANIFEST}: it is not a complete stage output")
        return sha256_file(m)
    if not p.exists():
        raise FileNotFoundError(f"stage input {p} does not exist")
    return sha256_file(p)


def mmalign_version() -> str:
    try:
        return metadata.version("mmalign")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _fsync_dir(path: Path) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write a file so readers see the old or the new content, never a partial one.

    Writes a temporary file in the same folder (same filesystem, so the rename is atomic),
    fsyncs it and ``os.replace`` s it over ``path``.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding=encoding, newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def atomic_write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object per line, atomically; returns the number of records."""
    lines = [json.dumps(r, ensure_ascii=False, default=_json_default) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines skipped); errors name ``file:line``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e}") from None
    return out


def read_manifest(out_dir: PathLike) -> dict[str, Any] | None:
    """The manifest of a stage output, or None when the output is absent or incomplete."""
    m = Path(out_dir) / MANIFEST
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_up_to_date(out_dir: PathLike, config: Mapping[str, Any], inputs: Sequence[PathLike] = ()) -> bool:
    """True when ``out_dir`` is a complete output made from this config and these inputs.

    Inputs are compared by content hash, in order (the stage defines what each position means),
    not by path, so moving the project folder does not force a re-run. A missing input raises
    FileNotFoundError: the stage could not run anyway, and saying so early is clearer.
    """
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("manifest_version") != MANIFEST_VERSION:
        return False
    if manifest.get("config") != normalize_config(config):
        return False
    stored = [entry.get("sha256") for entry in manifest.get("inputs", [])]
    return stored == [input_hash(p) for p in inputs]


def remove_dead_pid_folders(parent: Path, pattern: str) -> None:
    """Remove the folders matching ``pattern`` (named ``...-<pid>``) whose process is gone: the
    leftovers of killed runs. A live pid's folder is left alone, so a concurrent run is not
    sabotaged."""
    for p in parent.glob(pattern):
        pid_text = p.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # alive (or not ours to judge): leave it


class StageOutput:
    """Context manager giving a stage an all-or-nothing output folder.

    ``with StageOutput(out_dir, stage, config, inputs) as st:`` — write files under ``st.path``
    (``<out_dir>.tmp-<pid>``), call ``st.count(key, n)`` for the manifest counts and, if useful,
    put JSON-able facts in ``st.info``. On a clean exit ``manifest.json`` is written last and
    the folder replaces ``out_dir``: the old output is renamed to ``<out_dir>.trash-<pid>``, the
    new one renamed into place, the trash deleted. (POSIX cannot swap two non-empty folders in
    one step; between the two renames ``out_dir`` is briefly absent, never partial.) On an
    exception the temporary folder is removed and any previous output is left as it was.

    Input hashes are taken on entry, i.e. of the inputs the stage is about to read.
    """

    def __init__(
        self,
        out_dir: PathLike,
        stage: str,
        config: Mapping[str, Any],
        inputs: Sequence[PathLike] = (),
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.name in ("", ".", ".."):
            raise ValueError(f"out_dir must name a folder, got {str(out_dir)!r}")
        self.stage = stage
        self.config = normalize_config(config)
        self.inputs = [Path(p) for p in inputs]
        self.path = self.out_dir.with_name(f"{self.out_dir.name}.tmp-{os.getpid()}")
        self.counts: dict[str, int] = {}
        self.info: dict[str, Any] = {}
        self._input_hashes: list[dict[str, str]] = []
        self._entered = False

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the manifest count ``key`` (e.g. ``"train/records"``)."""
        self.counts[key] = self.counts.get(key, 0) + int(n)

    def __enter__(self) -> "StageOutput":
        if self._entered:
            raise RuntimeError("a StageOutput can be entered only once")
        self._entered = True
        self._input_hashes = [{"path": str(p), "sha256": input_hash(p)} for p in self.inputs]
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def _remove_stale_tmp(self) -> None:
        """Remove ``<out>.tmp-<pid>`` / ``<out>.trash-<pid>`` left by runs that were killed.

        Only folders whose pid is no longer alive are removed, so a concurrent run of the same
        stage is not sabotaged (it would still race us on the final rename; don't do that).
        """
        for kind in ("tmp", "trash"):
            remove_dead_pid_folders(self.out_dir.parent, f"{self.out_dir.name}.{kind}-*")

    def manifest(self) -> dict[str, Any]:
        """The manifest that a clean exit writes."""
        return {
            "manifest_version": MANIFEST_VERSION,
            "stage": self.stage,
            "config": self.config,
            "seed": self.config.get("seed"),
            "inputs": self._input_hashes,
            "counts": dict(sorted(self.counts.items())),
            "info": self.info,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "mmalign_version": mmalign_version(),
            "python": sys.version.split()[0],
        }

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        try:
            atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest(), indent=2, ensure_ascii=False) + "\n")
            self._swap_into_place()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return False

    def _swap_into_place(self) -> None:
        trash = self.out_dir.with_name(f"{self.out_dir.name}.trash-{os.getpid()}")
        if trash.exists():
            shutil.rmtree(trash)
        had_old = self.out_dir.exists() or self.out_dir.is_symlink()
        if had_old:
            os.rename(self.out_dir, trash)
        try:
            os.rename(self.path, self.out_dir)
        except BaseException:
            if had_old:
                os.rename(trash, self.out_dir)  # put the previous complete output back
            raise
        _fsync_dir(self.out_dir.parent)
        if had_old:
            shutil.rmtree(trash, ignore_errors=True)
