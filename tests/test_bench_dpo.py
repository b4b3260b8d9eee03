"""The DPO benchmark's loss check: mmalign's DPO loss equals TRL's on the same batch (no timing here)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from benchmarks.bench_dpo import TOLERANCE, loss_agreement, main, make_pairs, read_pairs


@pytest.fixture(scope="module")
def pairs_file(world, tmp_path_factory):
    """Four preference pairs from the small world: chosen = the record's own answer, rejected =
    the next record's answer to the same task (another scene, so a wrong description)."""
    recs = [json.loads(line) for line in (world / "train" / "sft.jsonl").read_text().splitlines() if line.strip()]
    by_task: dict[str, list[dict]] = {}
    for r in recs:
        by_task.setdefault(r["task"], []).append(r)
    rows = []
    for group in by_task.values():
        for a, b in itertools.pairwise(group):
            rows.append({"id": a["id"], "images": a["images"], "prompt": a["messages"][:1],
                         "chosen": a["messages"][1]["content"][0]["text"],
                         "rejected": b["messages"][1]["content"][0]["text"]})
            if len(rows) == 4:
                break
        if len(rows) == 4:
            break
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mmalign_dpo_loss_matches_trl(model_dirs, world, pairs_file):
    records = read_pairs(pairs_file, world, 4)
    res = loss_agreement(model_dirs["llava"], records, beta=0.1)
    # The policy was moved off its reference, so the loss is not the trivial log 2 of equal models.
    assert abs(res["trl"] - math.log(2)) > 1e-3
    for key in ("mmalign_concat", "mmalign_shared_prompt", "mmalign_shared_prompt_precomputed"):
        assert res[key] == pytest.approx(res["trl"], abs=TOLERANCE), key
    # Same tokens scored on both sides: the policy's summed log-probs agree too.
    for key in ("mmalign_concat_logps", "mmalign_shared_prompt_logps"):
        assert res[key] == pytest.approx(res["trl_logps"], abs=1e-3), key
    assert res["agree"]


def test_make_pairs_takes_reference_over_response(tmp_path):
    src = tmp_path / "responses.jsonl"
    base = {"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]}
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {**base, "id": "s0", "reference": "A red circle.", "response": "A blue square."},
        {**base, "id": "s1", "reference": "A red circle.", "response": "A red circle."},  # no preference: skipped
    ]))
    rows = [json.loads(line) for line in make_pairs(src, tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(r["id"], r["chosen"], r["rejected"]) for r in rows] == [("s0", "A red circle.", "A blue square.")]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--batch-size", "--pairs", "--model", "--data-root", "--threads", "--out"):
        assert flag in out
