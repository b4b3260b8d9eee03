"""Retrieval index: recall and latency of IVF and HNSW against exact search, and a NumPy baseline.

    make bench-index
    python benchmarks/bench_index.py --n 100000 --dim 128 --queries 1000 --k 10     # the defaults

Why: Re-Align's knowledge base is every training image (COCO train2014: ~83k images), searched
once per training image. This measures, on this machine, what each index kind of
:class:`mmalign.retrieval.ImageIndex` costs and how many of the true neighbours it finds, so the
config's ``kind`` can be chosen from numbers rather than folklore.

Data (``--distribution``, both by default, each its own table): ``--n`` base vectors and
``--queries`` query vectors of width ``--dim``. *clustered*: a mixture of Gaussians (``--clusters``
centres ~ N(0, I), points = centre + ``--spread`` * N(0, I)), the cluster structure real image
embeddings have; at spread 1 and dim 128 a query's true nearest neighbour has cosine ~0.6 and a
random vector ~0. *gaussian*: i.i.d. N(0, I), no structure at all, the hardest case for
approximate search. Queries are fresh draws, not base vectors. Everything is L2-normalised (the
index does it), so scores are cosines; the report gives the mean cosine of the true neighbours.

Methods (each built once, then timed):

    numpy        brute force: Q @ X.T (in blocks of 256 queries) + argpartition + sort of the top k
    flat         ImageIndex(kind="flat"): faiss.IndexFlatIP, exact -- the ground truth
    ivf          ImageIndex(kind="ivf"): IndexIVFFlat, nlist cells (default 4*sqrt(N), rounded), per nprobe
    hnsw         ImageIndex(kind="hnsw"): IndexHNSWFlat, m links, per ef_search

recall@k = mean over queries of |found top-k ∩ exact top-k| / k (:func:`mmalign.retrieval.recall_at_k`),
against the flat index's top-k. Latency through ``ImageIndex.search`` (what a stage calls:
normalisation, FAISS, id mapping): *batch* = all queries in one call, divided by the number of
queries (median of ``--repeats`` calls); *single* = one query per call over the first
``--single-queries`` queries (median per call), once with every FAISS thread and once with one
(on the 2-core CI machine FAISS's OpenMP hand-off made a one-query flat search ~2x slower).
Build = index creation + training (IVF) + add, including the normalisation and id bookkeeping.
Index MiB = ``faiss.serialize_index`` size.
Threads: FAISS and OpenBLAS use every core unless ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import faiss
import numpy as np

from mmalign.retrieval import ImageIndex, IndexConfig, l2_normalize, recall_at_k

BLOCK = 256  # NumPy baseline: queries per matrix product (256 x 100k float32 scores = 100 MB)


# ------------------------------------------------------------------------------------------------
# data


def make_data(n: int, n_queries: int, dim: int, distribution: str, clusters: int, spread: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(base (n, dim), queries (n_queries, dim))`` float32, not yet normalised."""
    rng = np.random.default_rng(seed)
    if distribution == "gaussian":
        return (rng.standard_normal((n, dim), dtype=np.float32),
                rng.standard_normal((n_queries, dim), dtype=np.float32))
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)

    def draw(m: int) -> np.ndarray:
        return centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, dim), dtype=np.float32)
    return draw(n), draw(n_queries)


# ------------------------------------------------------------------------------------------------
# the NumPy baseline


def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of normalised ``queries`` (Q, D) against ``base`` (N, D):
    ``(scores, rows)``, both (Q, k), descending. Matrix product per block of queries, then
    ``argpartition`` (O(N)) for the k largest and a sort of those k only."""
    k = min(k, base.shape[0])
    out_s = np.empty((queries.shape[0], k), dtype=np.float32)
    out_r = np.empty((queries.shape[0], k), dtype=np.int64)
    for i in range(0, queries.shape[0], BLOCK):
        s = queries[i:i + BLOCK] @ base.T                                   # (b, N)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]                    # (b, k), unordered
        ps = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-ps, axis=1)
        out_r[i:i + BLOCK] = np.take_along_axis(part, order, axis=1)
        out_s[i:i + BLOCK] = np.take_along_axis(ps, order, axis=1)
    return out_s, out_r


# ------------------------------------------------------------------------------------------------
# timing


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_single(search_one, queries: np.ndarray, n: int) -> float:
    """Median seconds of one single-query call over the first ``n`` queries."""
    times = []
    for i in range(min(n, queries.shape[0])):
        q = queries[i:i + 1]
        t0 = time.perf_counter()
        search_one(q)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else math.nan


def time_single_one_thread(search_one, queries: np.ndarray, n: int) -> float:
    """:func:`time_single` with FAISS limited to one OpenMP thread (restored after): one query
    has too little work to split, and on a small machine the threads' hand-off can cost more than
    the search itself."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return time_single(search_one, queries, n)
    finally:
        faiss.omp_set_num_threads(previous)


def rows_of(index: ImageIndex, ids: np.ndarray) -> np.ndarray:
    """Map an ids array (Q, k) from ``ImageIndex.search`` back to row numbers (-1 for None)."""
    rows = {id_: n for n, id_ in enumerate(index.ids)}
    return np.array([[rows.get(i, -1) if i is not None else -1 for i in r] for r in ids.tolist()], dtype=np.int64)


def bench_index(name: str, params: dict[str, Any], config: IndexConfig, ids: list[str], base: np.ndarray,
                queries: np.ndarray, truth: np.ndarray, k: int, sweep: list[dict[str, int]], repeats: int,
                single: int) -> list[dict[str, Any]]:
    """Build one index, then for each search setting in ``sweep`` its recall and latency."""
    t0 = time.perf_counter()
    index = ImageIndex.build(ids, base, config)
    build_s = time.perf_counter() - t0
    size_mib = len(faiss.serialize_index(index.index)) / 2**20
    rows = []
    for knobs in sweep:
        index.set_search_params(**knobs)
        _, found = index.search(queries, k)
        batch_s = _median_time(lambda: index.search(queries, k), repeats)
        single_s = time_single(lambda q: index.search(q, k), queries, single)
        single1_s = time_single_one_thread(lambda q: index.search(q, k), queries, single)
        rows.append({"method": name, "params": {**params, **knobs}, "build_s": build_s,
                     "recall": recall_at_k(rows_of(index, found), truth),
                     "batch_ms_per_query": 1000 * batch_s / queries.shape[0], "single_ms_per_query": 1000 * single_s,
                     "single_ms_per_query_1thread": 1000 * single1_s, "index_mib": size_mib})
        print(f"  {name:5s} {json.dumps(rows[-1]['params']):48s} recall@{k} {rows[-1]['recall']:.4f}  "
              f"batch {rows[-1]['batch_ms_per_query']:.4f} ms/q  single {rows[-1]['single_ms_per_query']:.3f} / "
              f"{rows[-1]['single_ms_per_query_1thread']:.3f} ms/q", flush=True)
    return rows


def run(args: argparse.Namespace, distribution: str) -> dict[str, Any]:
    """Every method on one data set; returns its rows (also what the tests call on a tiny size)."""
    t_start = time.perf_counter()
    print(f"{distribution}:", flush=True)
    base_raw, queries_raw = make_data(args.n, args.queries, args.dim, distribution, args.clusters, args.spread,
                                      args.seed)
    base, queries = l2_normalize(base_raw), l2_normalize(queries_raw)
    ids = [f"v{i}" for i in range(args.n)]
    k = args.k
    nlist = args.nlist or max(1, min(args.n, round(4 * math.sqrt(args.n))))
    rows: list[dict[str, Any]] = []

    # ground truth and the exact methods
    t0 = time.perf_counter()
    flat = ImageIndex.build(ids, base, IndexConfig(kind="flat"))
    flat_build = time.perf_counter() - t0
    truth_scores, truth_rows = flat.search_rows(queries, k)
    _, flat_ids = flat.search(queries, k)
    rows.append({"method": "flat", "params": {}, "build_s": flat_build,
                 "recall": recall_at_k(rows_of(flat, flat_ids), truth_rows),
                 "batch_ms_per_query": 1000 * _median_time(lambda: flat.search(queries, k), args.repeats) / args.queries,
                 "single_ms_per_query": 1000 * time_single(lambda q: flat.search(q, k), queries, args.single_queries),
                 "single_ms_per_query_1thread": 1000 * time_single_one_thread(lambda q: flat.search(q, k), queries,
                                                                              args.single_queries),
                 "index_mib": len(faiss.serialize_index(flat.index)) / 2**20})
    print(f"  flat  exact (ground truth), batch {rows[-1]['batch_ms_per_query']:.4f} ms/q", flush=True)

    t0 = time.perf_counter()
    np_base = np.ascontiguousarray(base)  # the baseline's "build": nothing but the normalised matrix
    np_build = time.perf_counter() - t0
    _, np_rows = numpy_topk(np_base, queries, k)
    rows.insert(0, {"method": "numpy", "params": {"block": BLOCK}, "build_s": np_build,
                    "recall": recall_at_k(np_rows, truth_rows),
                    "batch_ms_per_query": 1000 * _median_time(lambda: numpy_topk(np_base, queries, k), args.repeats)
                    / args.queries,
                    "single_ms_per_query": 1000 * time_single(lambda q: numpy_topk(np_base, q, k), queries,
                                                              args.single_queries),
                    "single_ms_per_query_1thread": None, "index_mib": np_base.nbytes / 2**20})
    print(f"  numpy brute force, recall {rows[0]['recall']:.4f}, batch {rows[0]['batch_ms_per_query']:.4f} ms/q",
          flush=True)

    ivf_sweep = [{"nprobe": p} for p in args.nprobe if p <= nlist]
    rows += bench_index("ivf", {"nlist": nlist}, IndexConfig(kind="ivf", nlist=nlist), ids, base, queries,
                        truth_rows, k, ivf_sweep, args.repeats, args.single_queries)
    hnsw_sweep = [{"ef_search": e} for e in args.ef_search]
    rows += bench_index("hnsw", {"m": args.m, "ef_construction": args.ef_construction},
                        IndexConfig(kind="hnsw", m=args.m, ef_construction=args.ef_construction), ids, base, queries,
                        truth_rows, k, hnsw_sweep, args.repeats, args.single_queries)
    for r in rows:
        r["qps_batch"] = 1000 / r["batch_ms_per_query"] if r["batch_ms_per_query"] > 0 else math.inf
    # How close the true neighbours are: judge the data's realism by these (cosines).
    stats = {"top1_cosine_mean": float(truth_scores[:, 0].mean()), f"top{k}_cosine_mean": float(truth_scores[:, -1].mean())}
    return {"distribution": distribution, "rows": rows, "nlist": nlist, "neighbour_cosines": stats,
            "seconds": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------
# report


def machine_info(threads: int) -> dict[str, Any]:
    from mmalign.machine import machine_base

    blas = "unknown"
    with contextlib.suppress(Exception):
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    return {**machine_base(), "faiss_threads": faiss.omp_get_max_threads(), "threads_arg": threads or "all",
            "numpy": np.__version__, "blas": blas, "faiss": faiss.__version__}


def table(rows: list[dict[str, Any]], k: int) -> list[str]:
    out = [(f"| method | parameters | build s | recall@{k} | batch ms/query | queries/s (batch) | single ms/query | "
           "single ms/query, 1 FAISS thread | index MiB |"),
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "exact"
        one = r.get("single_ms_per_query_1thread")
        out.append(f"| {r['method']} | {params} | {r['build_s']:.2f} | {r['recall']:.4f} | {r['batch_ms_per_query']:.4f} | "
                   f"{r['qps_batch']:,.0f} | {r['single_ms_per_query']:.3f} | {'-' if one is None else f'{one:.3f}'} | "
                   f"{r['index_mib']:.1f} |")
    return out


def describe(a: dict[str, Any], distribution: str) -> str:
    shape = (f"mixture of {a['clusters']} Gaussians (spread {a['spread']})" if distribution == "clustered"
             else "i.i.d. Gaussian (no structure: the hard case)")
    return f"{a['n']:,} base vectors and {a['queries']:,} queries, dim {a['dim']}, {shape}, seed {a['seed']}"


def markdown(report: dict[str, Any]) -> str:
    m, a = report["machine"], report["args"]
    machine = (f"Machine: {m['cpu']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
               f"{m['memory_gib']} GiB; FAISS {m['faiss']} ({m['faiss_threads']} OpenMP threads), NumPy {m['numpy']} "
               f"({m['blas']}), Python {m['python']}; repo {m['git_commit']}.")
    load = (f"Load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}; "
            f"whole run {report['seconds']:.0f} s.")
    how = (f"All vectors L2-normalised (cosine similarity); k = {a['k']}; recall@{a['k']} against the exact flat "
           f"index's top {a['k']}. Batch = all {a['queries']:,} queries in one `ImageIndex.search` call (median of "
           f"{a['repeats']}), per query; single = one query per call, median over "
           f"{min(a['single_queries'], a['queries'])} calls, with every FAISS thread and with one. Build = create + "
           "train (IVF) + add. IVF nlist = 4 * sqrt(N) unless --nlist.")
    lines = [f"# Retrieval index: recall and latency ({report['date']})", "", f"`{report['command']}`", "",
             machine, load, "", how, ""]
    for run_ in report["runs"]:
        c = run_["neighbour_cosines"]
        lines += [f"## {describe(a, run_['distribution'])}", "",
                  "Mean cosine of the true nearest / k-th nearest neighbour: "
                  + " / ".join(f"{v:.3f}" for v in c.values()) + f"; nlist {run_['nlist']}; {run_['seconds']:.0f} s.",
                  "", *table(run_["rows"], a["k"]), ""]
        best = [r for r in run_["rows"] if r["method"] in ("ivf", "hnsw") and r["recall"] >= 0.95]
        flat = next(r for r in run_["rows"] if r["method"] == "flat")
        if best:
            fast = min(best, key=lambda r: r["batch_ms_per_query"])
            params = ", ".join(f"{x}={y}" for x, y in fast["params"].items())
            lines.append(f"Fastest approximate setting with recall >= 0.95: {fast['method']} ({params}), "
                         f"{flat['batch_ms_per_query'] / fast['batch_ms_per_query']:.0f}x the exact flat index's batch "
                         f"throughput at recall {fast['recall']:.4f}.")
        else:
            lines.append("No approximate setting reached recall 0.95 here.")
        lines.append("")
    return "\n".join(lines)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="base vectors")
    ap.add_argument("--dim", type=int, default=128, help="vector width")
    ap.add_argument("--queries", type=int, default=1000, help="query vectors")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    ap.add_argument("--distribution", default="clustered,gaussian",
                    help="comma-separated data sets to run: clustered (mixture of Gaussians), gaussian (i.i.d.)")
    ap.add_argument("--clusters", type=int, default=1000, help="clustered: mixture components")
    ap.add_argument("--spread", type=float, default=1.0, help="clustered: noise std relative to the centres' std")
    ap.add_argument("--nlist", type=int, default=0, help="IVF cells (0: 4 * sqrt(N))")
    ap.add_argument("--nprobe", type=parse_ints, default=[1, 4, 16, 64], help="IVF nprobe values, comma-separated")
    ap.add_argument("--m", type=int, default=32, help="HNSW links per node")
    ap.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam width")
    ap.add_argument("--ef-search", type=parse_ints, default=[16, 32, 64, 128],
                    help="HNSW efSearch values, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="batch timings per setting (median)")
    ap.add_argument("--single-queries", type=int, default=200, help="queries timed one per call")
    ap.add_argument("--threads", type=int, default=0, help="FAISS/BLAS threads (0: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results",
                    help="folder for index-<date>.md and index-<date>.json")
    args = ap.parse_args(argv)
    if min(args.n, args.dim, args.queries, args.k, args.repeats, args.clusters) < 1 or args.k > args.n:
        ap.error("--n, --dim, --queries, --k, --repeats, --clusters must be >= 1 and --k <= --n")
    distributions = [d.strip() for d in args.distribution.split(",") if d.strip()]
    if not distributions or set(distributions) - {"clustered", "gaussian"}:
        ap.error(f"--distribution: choose from clustered, gaussian (got {args.distribution!r})")
    if args.threads:
        # OpenBLAS reads its thread count at import; set it and re-run this script once.
        want = str(args.threads)
        if os.environ.get("OPENBLAS_NUM_THREADS") != want and argv is None:
            env = {**os.environ, "OPENBLAS_NUM_THREADS": want, "OMP_NUM_THREADS": want}
            return subprocess.call([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env=env)
        faiss.omp_set_num_threads(args.threads)

    date = dt.datetime.now().strftime("%Y-%m-%d")
    load_start = [round(x, 2) for x in os.getloadavg()]
    print(f"{args.n:,} x {args.dim} vectors ({args.distribution}), {args.queries:,} queries, k={args.k}; "
          f"load average {load_start}", flush=True)
    runs = [run(args, d) for d in distributions]
    report = {"date": date, "command": " ".join(["python", "benchmarks/bench_index.py",
                                                 *(argv if argv is not None else sys.argv[1:])]),
              "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
              "machine": machine_info(args.threads),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
              "seconds": sum(r["seconds"] for r in runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"index-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    for r in runs:
        print("\n".join(["", f"{r['distribution']}:", *table(r["rows"], args.k)]))
    print(f"\n{report['seconds']:.0f} s -> {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
