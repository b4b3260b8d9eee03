"""The yes/no answer-position probe (benchmarks/probe_yes_no.py): it must find a label that is
there and must not find one that is not."""

from __future__ import annotations

import torch

from benchmarks import probe_yes_no as P


def test_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    y = (x[:, 3] - 0.5 * x[:, 7] > 0).float()
    assert P.probe(x[:400], y[:400], x[400:], y[400:]) > 0.95
    noise = (torch.rand(600, generator=g) > 0.5).float()
    assert abs(P.probe(x[:400], noise[:400], x[400:], noise[400:]) - 0.5) < 0.12


def test_probe_runs_on_a_tiny_model(world, model_dirs, tmp_path):
    out = tmp_path / "probe.json"
    assert P.main(["--model", str(model_dirs["llava"]), "--data", str(world), "--n", "8", "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())["results"]
    assert set(res) <= set(P.TASKS) and res
    for r in res.values():
        assert len(r["probe_accuracy_by_layer"]) == 1 + 4  # embeddings + the tiny decoder's 4 layers
        assert 0 <= r["answer_accuracy"] <= 1 and 0 <= r["yes_ratio"] <= 1
