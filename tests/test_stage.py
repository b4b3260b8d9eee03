"""Stage machinery: hashes, atomic single-file writes, all-or-nothing stage outputs, skipping."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.stage import (
    MANIFEST,
    StageOutput,
    atomic_write_jsonl,
    atomic_write_text,
    is_up_to_date,
    read_jsonl,
    read_manifest,
    sha256_file,
    sha256_json,
)


def leftovers(out: Path) -> list[str]:
    """Temporary or trash siblings of a stage output."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_hashes(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello" * 1000)
    assert sha256_file(f) == hashlib.sha256(b"hello" * 1000).hexdigest()
    assert sha256_file(f, chunk_size=7) == sha256_file(f)
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    assert sha256_json({"p": Path("x/y"), "t": (1, 2)}) == sha256_json({"p": "x/y", "t": [1, 2]})


def test_atomic_writes(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    recs = [{"id": 1, "text": "é"}, {"id": 2, "nested": {"x": [1]}}]
    n = atomic_write_jsonl(tmp_path / "r.jsonl", recs)
    assert n == 2 and read_jsonl(tmp_path / "r.jsonl") == recs
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.jsonl", "sub"]  # no temp files left
    assert [x.name for x in (tmp_path / "sub").iterdir()] == ["f.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    atomic_write_jsonl(p, [{"a": 1}])
    with pytest.raises(TypeError):
        atomic_write_jsonl(p, [{"a": object()}])
    assert read_jsonl(p) == [{"a": 1}]
    assert [x.name for x in tmp_path.iterdir()] == ["r.jsonl"]


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        read_jsonl(p)


def test_stage_output_writes_manifest_and_replaces(tmp_path: Path) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("data")
    out = tmp_path / "out"
    cfg = {"seed": 3, "n": 10, "path": Path("x")}
    with StageOutput(out, stage="demo", config=cfg, inputs=[inp]) as st:
        assert st.path == tmp_path / f"out.tmp-{os.getpid()}" and st.path.is_dir()
        assert not out.exists()  # nothing visible until the end
        (st.path / "old.txt").write_text("old")
        st.count("records", 2)
        st.count("records", 3)
        st.info["note"] = "hi"
    m = read_manifest(out)
    assert m is not None
    assert m["stage"] == "demo" and m["seed"] == 3 and m["config"] == {"seed": 3, "n": 10, "path": "x"}
    assert m["counts"] == {"records": 5} and m["info"] == {"note": "hi"}
    assert m["inputs"] == [{"path": str(inp), "sha256": sha256_file(inp)}]
    assert m["created"].endswith("+00:00") and m["mmalign_version"]
    assert leftovers(out) == []

    with StageOutput(out, stage="demo", config=cfg, inputs=[inp]) as st:
        (st.path / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "new.txt"]  # old content gone
    assert leftovers(out) == []


def test_exception_leaves_previous_output_intact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StageOutput(out, stage="demo", config={"v": 1}) as st:
        (st.path / "keep.txt").write_text("complete")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(RuntimeError, match="boom"):
        with StageOutput(out, stage="demo", config={"v": 2}) as st:
            (st.path / "keep.txt").write_text("half-written")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []
    assert is_up_to_date(out, {"v": 1}, []) and not is_up_to_date(out, {"v": 2}, [])


def test_exception_on_first_run_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(KeyError):
        with StageOutput(out, stage="demo", config={}) as st:
            (st.path / "x").write_text("x")
            raise KeyError("x")
    assert not out.exists() and leftovers(out) == []


def test_is_up_to_date(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("A")
    b.write_text("B")
    out = tmp_path / "out"
    cfg = {"seed": 0, "sizes": (1, 2)}
    assert not is_up_to_date(out, cfg, [a, b])  # nothing there yet
    with StageOutput(out, stage="demo", config=cfg, inputs=[a, b]):
        pass
    assert is_up_to_date(out, cfg, [a, b])
    assert is_up_to_date(out, {"sizes": [1, 2], "seed": 0}, [a, b])  # same config after JSON round trip
    assert not is_up_to_date(out, {**cfg, "seed": 1}, [a, b])  # config changed
    assert not is_up_to_date(out, cfg, [b, a])  # inputs are positional
    assert not is_up_to_date(out, cfg, [a])
    b.write_text("B2")
    assert not is_up_to_date(out, cfg, [a, b])  # input content changed
    # same content at another path is still up to date: inputs compare by content
    moved = tmp_path / "moved.txt"
    moved.write_text("A")
    b.write_text("B")
    assert is_up_to_date(out, cfg, [moved, b])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        is_up_to_date(out, cfg, [tmp_path / "missing.txt"])


def test_folder_inputs_and_incomplete_outputs(tmp_path: Path) -> None:
    up = tmp_path / "upstream"
    with StageOutput(up, stage="up", config={"k": 1}) as st:
        (st.path / "data.jsonl").write_text("{}\n")
    down = tmp_path / "down"
    with StageOutput(down, stage="down", config={}, inputs=[up]):
        pass
    assert is_up_to_date(down, {}, [up])
    with StageOutput(up, stage="up", config={"k": 2}):  # upstream re-ran: downstream is stale
        pass
    assert not is_up_to_date(down, {}, [up])

    half = tmp_path / "half"
    half.mkdir()
    (half / "data.jsonl").write_text("{}\n")
    assert read_manifest(half) is None and not is_up_to_date(half, {}, [])  # no manifest: never complete
    with pytest.raises(FileNotFoundError, match="not a complete stage output"):
        StageOutput(tmp_path / "x", stage="x", config={}, inputs=[half]).__enter__()
    (down / MANIFEST).write_text("{not json")
    assert not is_up_to_date(down, {}, [up])


def test_stale_tmp_of_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "out"
    stale = tmp_path / f"out.tmp-{pid}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with StageOutput(out, stage="demo", config={}):
        pass
    assert not stale.exists() and leftovers(out) == []
    json.loads((out / MANIFEST).read_text())
