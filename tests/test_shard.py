"""Scale-out (mmalign.shard): chunk assignment, part files, merge and failures; and the real
stages on 2 ranks -- under torchrun and with --shard I/N -- give the 1-rank output byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from data_pipelines import feedback as F
from data_pipelines import sample as S
from mmalign.eval.cli import main as eval_main
from mmalign.shard import Parts, Shard, ShardError, chunk_seed, parse_shard, setup
from tests.test_sample_feedback import ScriptedPolicy

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict[str, str]:
    # one thread per rank: the two ranks share the machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def _parallel(cmds: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every command at once (the ranks must run side by side), wait for all."""
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    out = []
    for c, p in zip(cmds, procs):
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(c, p.returncode, so, se))
    return out


def _same_manifest(a: Path, b: Path, timing: tuple[str, ...] = ()) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["config"] == mb["config"] and ma["inputs"] == mb["inputs"] and ma["stage"] == mb["stage"]
    assert {k: v for k, v in ma["counts"].items() if k not in timing} == \
        {k: v for k, v in mb["counts"].items() if k not in timing}
    assert ma["info"]["ranks"] == 1 and mb["info"]["ranks"] == 2
    assert not list(b.parent.glob(f"{b.name}.parts-*")), "rank 0 removes the parts after the merge"


# ---------------------------------------------------------------------------------------------
# the machinery


def test_chunk_seed_is_stable_and_does_not_collide_across_seeds():
    assert chunk_seed(0, 1) == chunk_seed(0, 1)
    # seed + index would give (0, 1) and (1, 0) the same stream
    seeds = {chunk_seed(s, c) for s in range(5) for c in range(50)}
    assert len(seeds) == 250 and all(0 <= x < 2**63 for x in seeds)


def test_shard_args_and_env():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(Exception, match="I/N"):
            parse_shard(bad)
    ns = type("A", (), {"shard": (1, 3), "shard_timeout": 5.0})()
    s = setup(ns, env={})
    assert (s.rank, s.world, s.distributed, s.timeout) == (1, 3, False, 5.0)
    assert setup(None, env={}).world == 1
    with pytest.raises(ShardError, match="torchrun"):
        setup(ns, env={"WORLD_SIZE": "2", "RANK": "0"})
    # rank r takes chunks r, r+N, ...
    assert Shard(rank=1, world=3).chunks(8) == [1, 4, 7] and Shard().chunks(2) == [0, 1]


def _two_ranks(tmp_path: Path, fn0, fn1, items, chunk_size=2, key="k", key1=None, to="main", timeout=20.0):
    """Run Parts.map for ranks 0 and 1 of 2 in two threads (the file-based protocol)."""
    folder = tmp_path / "out.parts-x"
    folder.mkdir(exist_ok=True)
    p0 = Parts(Shard(0, 2, timeout=timeout), folder, key)
    p1 = Parts(Shard(1, 2, timeout=timeout), folder, key1 or key)
    res: dict[int, object] = {}

    def go(r, p, fn):
        try:
            res[r] = p.map("phase", items, chunk_size, fn, to=to)
        except Exception as e:  # noqa: BLE001 - the test looks at what each rank raised
            res[r] = e

    t = threading.Thread(target=go, args=(1, p1, fn1))
    t.start()
    go(0, p0, fn0)
    t.join(timeout + 10)
    return res


def test_two_ranks_merge_in_input_order(tmp_path):
    seen = {0: [], 1: []}

    def make(rank):
        def fn(c, chunk):
            seen[rank].append(c)
            return [f"{c}:{x}" for x in chunk]
        return fn

    items = list(range(7))  # chunks of 2: [0,1] [2,3] [4,5] [6]
    res = _two_ranks(tmp_path, make(0), make(1), items, to="all")
    assert seen == {0: [0, 2], 1: [1, 3]}
    expected = ["0:0", "0:1", "1:2", "1:3", "2:4", "2:5", "3:6"]
    assert res[0].results == expected and res[1].results == expected  # to="all": every rank gets them
    # one rank runs the same chunks itself, without part files
    one = Parts(Shard(), None, "k").map("phase", items, 2, lambda c, ch: [f"{c}:{x}" for x in ch])
    assert one.results == expected
    res = _two_ranks(tmp_path, make(0), make(1), items, to="main")
    assert res[0].results == expected and res[1] is None


def test_a_failing_rank_is_named_with_its_part(tmp_path):
    def ok(c, chunk):
        return list(chunk)

    def boom(c, chunk):
        raise ValueError("chunk 1 is cursed")

    res = _two_ranks(tmp_path, ok, boom, list(range(4)))
    for r in (0, 1):
        assert isinstance(res[r], ShardError), res[r]
    assert "rank 1/2" in str(res[0]) and "phase.part-1-of-2.jsonl" in str(res[0]) and "cursed" in str(res[0])
    assert "rank 1/2" in str(res[1])


def test_parts_of_another_run_or_missing_ones_are_refused(tmp_path):
    # rank 1 ran with another config (another key): its part is not taken
    res = _two_ranks(tmp_path, lambda c, ch: ch, lambda c, ch: ch, list(range(4)), key="a", key1="b")
    assert isinstance(res[0], ShardError) and "does not belong to this run" in str(res[0])
    # rank 1 never comes: a clear timeout naming the part that is missing
    folder = tmp_path / "lonely.parts-x"
    folder.mkdir()
    p0 = Parts(Shard(0, 2, timeout=0.5), folder, "k")
    with pytest.raises(ShardError, match=r"rank 1: .*phase\.part-1-of-2\.jsonl"):
        p0.map("phase", list(range(4)), 2, lambda c, ch: ch)
    # a half-written part (a killed rank's temporary file) is not a part
    (folder / ".phase.part-1-of-2.jsonl.tmp-123").write_text('{"key": "k"}\n')
    with pytest.raises(ShardError, match="waited"):
        p0.map("phase", list(range(4)), 2, lambda c, ch: ch)


# ---------------------------------------------------------------------------------------------
# the stages on 2 ranks == on 1 rank


SAMPLE = ["--limit", "5", "--k", "2", "--batch-size", "2", "--max-new-tokens", "12", "--no-progress"]


def test_sample_two_ranks_under_torchrun_equals_one_rank(world, model_dirs, tmp_path):
    """Sampled (do_sample) generations: batch b is seeded from (seed, b), so rank 1 running
    batch 1 draws what rank 0 of 1 drew for it. 5 prompts in batches of 2: 3 batches, uneven."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", str(model_dirs["llava"]), "--data", str(world), *SAMPLE]
    assert S.main([*args, "--out", str(one)]) == 0
    _check(_run([*TORCHRUN, "-m", "data_pipelines.sample", *args, "--out", str(two)]))
    for name in ("responses.jsonl", "rejects.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    rows = (one / "responses.jsonl").read_text().splitlines()
    # a sampled run, not a constant: the 10 responses are not all the same text
    assert len({json.loads(r)["response"] for r in rows}) > 1
    _same_manifest(one, two, timing=("milliseconds",))


def test_failed_rank_leaves_no_output_and_says_which(world, model_dirs, tmp_path):
    out = tmp_path / "s"
    proc = _run([*TORCHRUN, "-m", "data_pipelines.sample", "--model", str(model_dirs["llava"]),
                 "--policy-class", "tests.test_shard.FailsOnRank1", "--data", str(world), "--limit", "4", "--k", "1",
                 "--batch-size", "1", "--no-progress", "--out", str(out)])
    assert proc.returncode != 0
    assert "rank 1/2" in proc.stderr and "samples.part-1-of-2.jsonl" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()  # no output, and the parts are never one


class FailsOnRank1(ScriptedPolicy):
    def generate(self, batch, **kw):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("the GPU of rank 1 caught fire")
        return super().generate(batch, **kw)


@pytest.fixture(scope="module")
def scripted_samples(world, model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scripted") / "s"
    assert S.main(["--model", str(model_dirs["llava"]), "--policy-class", "tests.test_sample_feedback.ScriptedPolicy",
                   "--data", str(world), "--limit", "4", "--k", "3", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("source", ["oracle", "judge"])
def test_feedback_two_shards_equal_one_rank(source, world, model_dirs, scripted_samples, tmp_path):
    """``--shard 0/2`` and ``--shard 1/2`` as two processes (the file-based protocol): 8 responses
    in chunks of 3, labelled by the oracle, or by the judge model with its agreement report."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--responses", str(scripted_samples), "--data", str(world), "--source", source, "--chunk-size", "3",
            "--no-progress"] + (["--judge", str(model_dirs["llava"]), "--batch-size", "4"] if source == "judge" else [])
    assert F.main([*args, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "data_pipelines.feedback", *args, "--out", str(two), "--shard-timeout", "300"]
    procs = _parallel([[*cmd, "--shard", "1/2"], [*cmd, "--shard", "0/2"]])
    for p in procs:
        _check(p)
    assert "rank 1/2: 3 responses labelled, rank 0 writes" in procs[0].stderr  # chunk 1 of [3, 3, 2]
    for name in ("feedback.jsonl", "report.json", "report.md", "rejects.jsonl"):
        assert (one / name).exists() == (two / name).exists(), name
        if (one / name).exists():
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    report = json.loads((one / "report.json").read_text())
    assert report["counts"]["responses"] == 8
    assert (report["agreement_with_oracle"] is not None) == (source == "judge")
    _same_manifest(one, two)


EVAL = ["--n-boot", "50", "--max-new-tokens", "10", "--yesno-max-new-tokens", "3", "--no-progress",
        "--batch-size", "3", "--yesno-batch-size", "16", "--kinds", "existence", "relation"]


def test_eval_two_ranks_under_torchrun_equals_one_rank(world, model_dirs, tmp_path):
    """Captions (8 in batches of 3), yes/no questions and the judge's ratings of the captions
    (each phase spread over both ranks): generations.jsonl byte for byte, metrics.json but for
    machine, date and throughput."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", str(model_dirs["llava"]), "--data", str(world), "--judge", str(model_dirs["llava"]), *EVAL]
    assert eval_main([*args, "--out", str(one)]) == 0
    _check(_run([*TORCHRUN, "-m", "mmalign.cli", "eval", *args, "--out", str(two)]))
    assert (one / "generations.jsonl").read_bytes() == (two / "generations.jsonl").read_bytes()
    rows = [json.loads(x) for x in (one / "generations.jsonl").read_text().splitlines()]
    assert sum(r["section"] == "captions" for r in rows) == 8 and all(
        "judge_rating" in r for r in rows if r["section"] == "captions")
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert m2["throughput"]["caption"]["ranks"] == 2
    for m in (m1, m2):
        for k in ("machine", "date", "throughput"):
            m.pop(k)
    assert m1 == m2
    _same_manifest(one, two)


def test_items_mine_counts_each_ranks_share():
    from mmalign.shard import Shard

    # 10 items in chunks of 3: chunks [0-2], [3-5], [6-8], [9]; rank 0 of 2 has chunks 0 and 2
    # (6 items), rank 1 chunks 1 and 3 (4 items); one rank has everything.
    assert [Shard(rank=r, world=2).items_mine(10, 3) for r in (0, 1)] == [6, 4]
    assert Shard().items_mine(10, 3) == 10 and Shard().items_mine(0, 3) == 0
