"""Scale-out for generation-heavy stages: split the input across ranks, merge deterministically.

    # two processes on one machine (or --nnodes/--node_rank across machines), gloo for the waits
    python -m torch.distributed.run --nproc_per_node 2 -m data_pipelines.sample ... --out runs/demo/sample
    # or without torchrun: start every rank yourself, same arguments plus --shard I/N
    python -m data_pipelines.sample ... --shard 0/2 &  python -m data_pipelines.sample ... --shard 1/2

Why the output does not depend on the number of ranks: the *global* input is cut into fixed-size
chunks (a stage's chunk is its generation batch), chunk ``c`` goes to rank ``c % N``, and anything
random is seeded per chunk from ``(seed, c)`` (:func:`chunk_seed`). So every chunk sees the same
batch (same padding, same numerics) and the same random stream whether it runs on rank 0 of 1 or
rank 1 of 4, and the merge puts the chunks back in global order. One rank runs the same code path
(chunk by chunk), only without part files.

Each rank writes its chunks' results to one part file, ``<out>.parts-<run>/<phase>.part-<r>-of-<N>.jsonl``
(not inside StageOutput's ``<out>.tmp-<pid>``: the ranks have different pids). A part file is
written atomically (temporary file, rename), so it exists only when complete, and its header names
the run key, rank, world size and chunks, all checked by the reader. Parts are never an output:
rank 0 merges them and writes the stage output through :class:`mmalign.stage.StageOutput`, manifest
last; a run killed before that leaves the previous output as it was.

Waiting for the other ranks:

* under torchrun (``WORLD_SIZE`` > 1 in the environment) a gloo process group is initialised and
  ranks exchange their status with ``all_gather_object``: a rank whose chunk failed tells the
  others, and every rank stops with an error naming that rank and its part (no rank hangs);
  the parts folder is named after rank 0's pid, so every launch starts clean;
* with ``--shard I/N`` (no process group) the readers poll the parts folder until every part is
  there, a rank's ``.error`` file says it failed, or ``--shard-timeout`` seconds pass. The folder is
  named after a hash of the stage's config, input hashes and N, so ranks started separately
  find each other; a complete part left there by a killed launch with that same key is
  accepted (it holds what the rank would compute again), a part with another key never is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.stage import atomic_write_text, input_hash, sha256_json

#: Default seconds to wait for another rank's part (and the gloo timeout under torchrun).
DEFAULT_TIMEOUT = 3600.0


class ShardError(RuntimeError):
    """A rank failed, a part is missing or a part does not belong to this run; the message names
    the rank and the part file."""


def chunk_seed(seed: int, chunk: int) -> int:
    """The RNG seed of chunk ``chunk`` of a run seeded with ``seed``.

    A hash, not ``seed + chunk``: with a sum, seed 0's chunk 1 and seed 1's chunk 0 would draw
    the same samples, so two "independent" runs would share most of their responses.
    """
    digest = hashlib.sha256(f"mmalign-chunk/{int(seed)}/{int(chunk)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: a valid torch.manual_seed


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; an argparse type."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard wants I/N with 0 <= I < N (e.g. 0/2), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def add_shard_args(ap: argparse.ArgumentParser) -> None:
    """``--shard I/N`` and ``--shard-timeout`` (torchrun needs neither: it sets RANK / WORLD_SIZE)."""
    g = ap.add_argument_group("scale-out (under torchrun the ranks come from RANK / WORLD_SIZE)")
    g.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="run as rank I of N processes started separately with the same arguments; "
                        "rank 0 waits for the others' parts and writes the output")
    g.add_argument("--shard-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for another rank's part (default {DEFAULT_TIMEOUT:.0f})")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass
class Shard:
    """Which rank this process is, of how many, and how the ranks wait for each other.

    ``distributed``: torch.distributed (gloo) was initialised here and is used for the waits;
    otherwise the waits poll the file system (``--shard``) or there is nothing to wait for.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"

    def device(self, requested: str = "auto") -> str:
        """``auto``: this rank's GPU (``cuda:<LOCAL_RANK>``) when CUDA is there, else cpu."""
        import torch

        if requested != "auto":
            return requested
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}" if self.world > 1 else "cuda"
        return "cpu"

    def chunks(self, n_chunks: int) -> list[int]:
        """This rank's chunks: ``c % world == rank``, in order."""
        return list(range(self.rank, n_chunks, self.world))

    def items_mine(self, n_items: int, chunk_size: int) -> int:
        """How many of ``n_items`` (cut into chunks of ``chunk_size``) this rank handles: the
        total of its progress bar."""
        n_chunks = -(-n_items // chunk_size)
        return sum(min(chunk_size, n_items - c * chunk_size) for c in self.chunks(n_chunks))

    def parts(self, out: Path, stage: str, config: Mapping[str, Any], inputs: Sequence[Any] = ()) -> Parts:
        """The part store of this run of ``stage`` writing ``out``. Collective under torchrun
        (every rank must call it); checks there that every rank has the same config and inputs."""
        if self.world == 1:
            return Parts(self, None, "")
        # Under torchrun the key only checks that the ranks got the same arguments, so input paths
        # do; with --shard it also names the folder whose complete parts may be reused, so the
        # inputs' contents count (hashing a large checkpoint again costs seconds, not minutes).
        ids = [str(p) for p in inputs] if self.distributed else [input_hash(p) for p in inputs]
        key = sha256_json({"stage": stage, "config": dict(config), "inputs": ids, "world": self.world})[:16]
        out = Path(out)
        if self.distributed:
            import torch.distributed as dist

            keys: list[Any] = [None] * self.world
            dist.all_gather_object(keys, key)
            differ = [r for r, k in enumerate(keys) if k != keys[0]]
            if differ:
                raise ShardError(f"{self}: ranks {differ} run {stage} with another config or other inputs than "
                                 "rank 0; launch every rank with the same arguments")
            # Named after rank 0's pid: a fresh folder per launch, and a stale one (its pid dead)
            # is recognisably stale.
            run = [str(os.getpid()) if self.is_main else None]
            if self.is_main:
                _remove_stale_parts(out)
            dist.broadcast_object_list(run, src=0)
            folder = out.with_name(f"{out.name}.parts-{run[0]}")
        else:
            folder = out.with_name(f"{out.name}.parts-k{key}")
        folder.mkdir(parents=True, exist_ok=True)
        return Parts(self, folder, key)

    def close(self) -> None:
        """Leave the process group (torchrun mode); harmless otherwise."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.distributed = False


def setup(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Shard:
    """This process's :class:`Shard`: from ``--shard I/N`` when given, else from torchrun's
    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (initialising a gloo process group), else rank 0 of 1."""
    env = os.environ if env is None else env
    shard = getattr(args, "shard", None)
    timeout = float(getattr(args, "shard_timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
    env_world = _env_int(env, "WORLD_SIZE", 1)
    if shard is not None:
        if env_world > 1:
            raise ShardError(f"--shard {shard[0]}/{shard[1]} given, but WORLD_SIZE={env_world} says this runs under "
                             "torchrun; use one or the other")
        return Shard(rank=shard[0], world=shard[1], local_rank=shard[0], timeout=timeout)
    if env_world <= 1:
        return Shard(timeout=timeout)
    rank = _env_int(env, "RANK", 0)
    if not 0 <= rank < env_world:
        raise ShardError(f"RANK={rank} is not in [0, WORLD_SIZE={env_world})")
    import torch
    import torch.distributed as dist

    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if torch.cuda.is_available():
        # plain "cuda" (what model and judge loaders default to) is then this rank's GPU
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        # gloo, not nccl: only small objects (statuses, a run id) travel, and it works on CPU too
        dist.init_process_group("gloo", rank=rank, world_size=env_world,
                                timeout=_dt.timedelta(seconds=timeout))
    return Shard(rank=rank, world=env_world, local_rank=local_rank, distributed=True, timeout=timeout)


def _remove_stale_parts(out: Path) -> None:
    """Remove ``<out>.parts-<pid>`` folders of torchrun launches whose rank 0 is gone."""
    from mmalign.stage import remove_dead_pid_folders

    remove_dead_pid_folders(out.parent, f"{out.name}.parts-*")


@dataclass
class Gathered:
    """The merged results of one phase, in global input order, and the phase's wall time: the
    slowest rank's seconds (the ranks run in parallel)."""

    results: list[Any]
    seconds: float
    per_rank_seconds: list[float] = field(default_factory=list)


def _roundtrip(obj: Any) -> Any:
    """The value as a part file gives it back: one rank and N ranks then merge the same thing
    (tuples become lists, dict keys strings, in both)."""
    return json.loads(json.dumps(obj, ensure_ascii=False))


class Parts:
    """Part files of one run; :meth:`map` runs one phase of chunked work across the ranks."""

    def __init__(self, shard: Shard, folder: Path | None, key: str) -> None:
        self.shard = shard
        self.folder = folder
        self.key = key
        self._started = time.time()

    def path(self, phase: str, rank: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{phase}.part-{rank}-of-{self.shard.world}.jsonl"

    def _error_path(self, phase: str, rank: int) -> Path:
        return self.path(phase, rank).with_suffix(".error")

    def map(self, phase: str, items: Sequence[Any], chunk_size: int, fn: Callable[[int, list[Any]], list[Any]],
            to: str = "main") -> Gathered | None:
        """Run ``fn(chunk_index, chunk_items) -> one JSON-able result per item`` over this
        rank's chunks of ``items``, write them as this rank's part of ``phase`` and, after all
        ranks did, return every result in input order: on rank 0 only (``to="main"``, other
        ranks get None) or on every rank (``to="all"``, when a later phase needs them).

        Any rank's failure raises :class:`ShardError` naming that rank and its part.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if to not in ("main", "all"):
            raise ValueError(f"to must be 'main' or 'all', got {to!r}")
        shard = self.shard
        n_chunks = -(-len(items) // chunk_size)
        mine = shard.chunks(n_chunks)
        if self.folder is not None:  # this rank's leftovers of an earlier launch are not its answer now
            self.path(phase, shard.rank).unlink(missing_ok=True)
            self._error_path(phase, shard.rank).unlink(missing_ok=True)
        t0 = time.perf_counter()
        done: dict[int, list[Any]] = {}
        error: BaseException | None = None
        for c in mine:
            chunk = list(items[c * chunk_size:(c + 1) * chunk_size])
            try:
                res = list(fn(c, chunk))
                if len(res) != len(chunk):
                    raise ShardError(f"phase {phase!r}, chunk {c}: {len(res)} results for {len(chunk)} items")
                done[c] = _roundtrip(res)
            except Exception as e:  # noqa: BLE001 - any failure is reported to the other ranks below, then re-raised
                error = e
                break
        seconds = time.perf_counter() - t0
        if self.folder is None:  # one rank: nothing to write or wait for
            if error is not None:
                raise error
            return Gathered([r for c in mine for r in done[c]], seconds, [seconds])

        part = self.path(phase, shard.rank)
        if error is not None:
            msg = f"{shard}: phase {phase!r} failed, its part {part} was not written: {type(error).__name__}: {error}"
            atomic_write_text(self._error_path(phase, shard.rank),
                              msg + "\n\n" + "".join(traceback.format_exception(error)))
        else:
            header = {"key": self.key, "phase": phase, "rank": shard.rank, "world": shard.world,
                      "n_items": len(items), "chunk_size": chunk_size, "chunks": mine, "seconds": seconds}
            lines = [json.dumps(header)] + [json.dumps({"chunk": c, "results": done[c]}, ensure_ascii=False)
                                            for c in mine]
            atomic_write_text(part, "".join(line + "\n" for line in lines))
        if not shard.distributed and to == "main" and not shard.is_main and error is None:
            # Nothing to receive; waiting here would race rank 0 removing the folder after its merge.
            return None
        failures = self._wait(phase, None if error is None else msg)
        if error is not None:
            raise ShardError(msg) from error
        if failures:
            raise ShardError(f"{shard}: stopping, another rank failed: " + "; ".join(failures))
        if to == "main" and not shard.is_main:
            return None
        return self._read(phase, len(items), chunk_size, n_chunks)

    def _wait(self, phase: str, my_error: str | None) -> list[str]:
        """Block until every rank finished ``phase``; the other ranks' error messages."""
        shard = self.shard
        if shard.distributed:
            import torch.distributed as dist

            status: list[Any] = [None] * shard.world
            dist.all_gather_object(status, my_error)
            return [s for r, s in enumerate(status) if s is not None and r != shard.rank]
        if my_error is not None:
            return []  # this rank stops; its .error file tells the others
        deadline = time.monotonic() + shard.timeout
        waiting = [r for r in range(shard.world) if r != shard.rank]
        while True:
            failures = []
            for r in list(waiting):
                err = self._error_path(phase, r)
                # an .error older than this launch is a previous launch's; the rank may be running again
                if err.is_file() and err.stat().st_mtime >= self._started - 1:
                    failures.append(err.read_text(encoding="utf-8").split("\n\n", 1)[0])
                elif self.path(phase, r).is_file():
                    waiting.remove(r)
            if failures:
                return failures
            if not waiting:
                return []
            if time.monotonic() > deadline:
                missing = ", ".join(f"rank {r}: {self.path(phase, r)}" for r in waiting)
                raise ShardError(f"{shard}: waited {shard.timeout:.0f} s for the part(s) of phase {phase!r} from "
                                 f"{missing}; are those ranks running, with the same arguments (same --shard N, "
                                 "config and inputs)? See their logs; --shard-timeout sets the wait")
            time.sleep(0.2)

    def _read(self, phase: str, n_items: int, chunk_size: int, n_chunks: int) -> Gathered:
        by_chunk: dict[int, list[Any]] = {}
        per_rank = []
        for r in range(self.shard.world):
            p = self.path(phase, r)
            if not p.is_file():
                raise ShardError(f"{self.shard}: part of rank {r} for phase {phase!r} is missing: {p}")
            lines = p.read_text(encoding="utf-8").splitlines()
            try:
                header = json.loads(lines[0])
                body = [json.loads(x) for x in lines[1:]]
            except (IndexError, json.JSONDecodeError) as e:
                raise ShardError(f"{self.shard}: part of rank {r} is unreadable: {p}: {e}") from None
            expect = {"key": self.key, "phase": phase, "rank": r, "world": self.shard.world, "n_items": n_items,
                      "chunk_size": chunk_size, "chunks": list(range(r, n_chunks, self.shard.world))}
            wrong = {k: header.get(k) for k, v in expect.items() if header.get(k) != v}
            if wrong or [b.get("chunk") for b in body] != expect["chunks"]:
                raise ShardError(f"{self.shard}: part of rank {r} does not belong to this run: {p} "
                                 f"(has {wrong or 'other chunks'}, expected {expect})")
            per_rank.append(float(header.get("seconds", 0.0)))
            by_chunk.update({b["chunk"]: b["results"] for b in body})
        results = [x for c in range(n_chunks) for x in by_chunk[c]]
        if len(results) != n_items:
            raise ShardError(f"{self.shard}: phase {phase!r} merged {len(results)} results for {n_items} items "
                             f"from {self.folder}")
        return Gathered(results, max(per_rank, default=0.0), per_rank)

    def cleanup(self) -> None:
        """Rank 0, after the output is written: the parts are no longer needed. (Every other rank
        wrote its last part after reading the parts it needed, and rank 0 has read those.)"""
        if self.folder is not None and self.shard.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
