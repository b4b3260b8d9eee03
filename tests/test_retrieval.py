"""The retrieval index (mmalign.retrieval), the image embedders (models.embedders), the `index`
stage (data_pipelines.index) and the index benchmark's recall, on tiny inputs."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from mmalign.retrieval import (
    EMBEDDINGS_FILE,
    IDS_FILE,
    INDEX_FILE,
    ImageEmbedder,
    ImageIndex,
    IndexConfig,
    IndexNotTrainedError,
    recall_at_k,
)


def clustered(n: int, dim: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


SMALL = {"flat": IndexConfig(kind="flat"),
         "ivf": IndexConfig(kind="ivf", nlist=16, nprobe=4),
         "hnsw": IndexConfig(kind="hnsw", m=16, ef_construction=200, ef_search=64)}


# ------------------------------------------------------------------------------------------------
# exact search, by hand


def test_flat_search_returns_exact_neighbours_and_cosines():
    # Unnormalised on purpose: the index normalises, so the scores are cosines.
    #   a = (1, 0, 0); b = (2, 2, 0) -> (1, 1, 0)/sqrt2; c = (0, 0, 5) -> (0, 0, 1); d = (1, 0, 1) -> (1, 0, 1)/sqrt2
    # query q = (3, 1, 0) -> (3, 1, 0)/sqrt10:
    #   cos(q, a) = 3/sqrt10 = 0.9487; cos(q, b) = 4/sqrt20 = 0.8944; cos(q, d) = 3/sqrt20 = 0.6708; cos(q, c) = 0
    vecs = np.array([[1, 0, 0], [2, 2, 0], [0, 0, 5], [1, 0, 1]], dtype=np.float32)
    index = ImageIndex.build(["a", "b", "c", "d"], vecs)
    scores, ids = index.search(np.array([[3, 1, 0]]), k=4)
    assert ids.tolist() == [["a", "b", "d", "c"]]
    np.testing.assert_allclose(scores[0], [3 / math.sqrt(10), 4 / math.sqrt(20), 3 / math.sqrt(20), 0.0], atol=1e-6)
    assert scores.shape == ids.shape == (1, 4) and scores.dtype == np.float32
    # the stored embeddings are the normalised vectors, in insertion order
    np.testing.assert_allclose(index.vectors(["b"]), [[1 / math.sqrt(2), 1 / math.sqrt(2), 0]], atol=1e-6)


def test_k_above_count_pads_and_exclude_drops_self():
    vecs = np.array([[1, 0], [1, 1], [0, 1]], dtype=np.float32)
    index = ImageIndex.build(["x", "y", "z"], vecs)
    scores, ids = index.search(vecs[:1], k=5)
    assert ids.tolist() == [["x", "y", "z", None, None]] and np.isneginf(scores[0, 3:]).all()
    scores, ids = index.neighbours(["x", "z"], k=1)      # each image's nearest *other* image
    assert ids.tolist() == [["y"], ["y"]]
    np.testing.assert_allclose(scores[:, 0], [1 / math.sqrt(2)] * 2, atol=1e-6)
    _, ids = index.search(vecs[:2], k=2, exclude=[{"x", "y"}, "z"])
    assert ids.tolist() == [["z", None], ["y", "x"]]


# ------------------------------------------------------------------------------------------------
# approximate kinds


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_is_high_on_clustered_data(kind):
    base, queries = clustered(2000), clustered(100, seed=1)
    ids = [f"i{n}" for n in range(len(base))]
    exact = ImageIndex.build(ids, base)
    approx = ImageIndex.build(ids, base, SMALL[kind])
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.9
    assert recall_at_k(truth, truth) == 1.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_after_save_and_load(tmp_path, kind):
    base = clustered(300)
    first = ImageIndex.build([f"a{n}" for n in range(200)], base[:200], SMALL[kind], info={"embedder": "test"})
    first.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted([INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE])
    loaded = ImageIndex.load(tmp_path / "idx")
    assert (len(loaded), loaded.kind, loaded.dim, loaded.info) == (200, kind, 16, {"embedder": "test"})
    np.testing.assert_array_equal(loaded.embeddings, first.embeddings)
    loaded.add([f"b{n}" for n in range(100)], base[200:])           # no rebuild, IVF keeps its cells
    assert len(loaded) == 300 and loaded.ids[200] == "b0"
    scores, ids = loaded.search(base[250:251], k=1)
    assert ids[0, 0] == "b50" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    loaded.save(tmp_path / "idx")
    again = ImageIndex.load(tmp_path / "idx")
    assert len(again) == 300 and again.ids == loaded.ids
    assert again.search(base[:20], 3)[1].tolist() == loaded.search(base[:20], 3)[1].tolist()
    tuned = ImageIndex.load(tmp_path / "idx", nprobe=8, ef_search=48)      # query-time knobs, no rebuild
    assert (tuned.config.nprobe, tuned.config.ef_search) == (8, 48)
    if kind == "ivf":
        assert tuned.index.nprobe == 8
    if kind == "hnsw":
        assert tuned.index.hnsw.efSearch == 48


# ------------------------------------------------------------------------------------------------
# errors


def test_duplicate_ids_and_dim_mismatch_are_refused():
    index = ImageIndex.build(["a", "b"], np.eye(2, 3, dtype=np.float32))
    with pytest.raises(ValueError, match="duplicate id 'a': already in the index"):
        index.add(["a"], np.ones((1, 3)))
    with pytest.raises(ValueError, match="duplicate id 'c' within this add"):
        index.add(["c", "c"], np.ones((2, 3)))
    with pytest.raises(ValueError, match="vectors have dim 4, the index has dim 3"):
        index.add(["d"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="queries have dim 2, the index has dim 3"):
        index.search(np.ones((1, 2)), 1)
    with pytest.raises(ValueError, match="all zeros"):
        index.add(["z"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.array([[np.nan, 1, 0]]), 1)
    with pytest.raises(TypeError, match="non-empty strings"):
        index.add([7], np.ones((1, 3)))
    assert len(index) == 2 and index.ids == ["a", "b"]                 # nothing half-added


def test_untrained_ivf_refuses_add_and_small_training_sets():
    index = ImageIndex(8, IndexConfig(kind="ivf", nlist=4))
    with pytest.raises(IndexNotTrainedError, match="not trained: call train"):
        index.add(["a"], np.ones((1, 8)))
    with pytest.raises(ValueError, match="at least nlist=4 vectors"):
        index.train(clustered(3, dim=8))
    index.train(clustered(50, dim=8))
    index.add(["a"], np.ones((1, 8)))
    assert len(index) == 1
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexConfig(kind="lsh")


def test_load_names_the_file_that_disagrees(tmp_path):
    ImageIndex.build(["a", "b", "c"], clustered(3)).save(tmp_path / "idx")
    d = tmp_path / "idx"
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    np.save(bad / EMBEDDINGS_FILE, np.ones((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"embeddings\.npy.*expected float32 \(3, 16\)"):
        ImageIndex.load(bad)
    shutil.rmtree(bad)
    shutil.copytree(d, bad)
    meta = json.loads((bad / IDS_FILE).read_text())
    meta["ids"], meta["count"] = ["a", "b"], 2
    (bad / IDS_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"index\.faiss: holds 3 vectors, .*ids\.json lists 2"):
        ImageIndex.load(bad)
    meta["dim"], meta["ids"], meta["count"] = 8, ["a", "b", "c"], 3
    (bad / IDS_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"index\.faiss: has dim 16, .*ids\.json says 8"):
        ImageIndex.load(bad)
    (bad / IDS_FILE).unlink()                                             # as after an interrupted save
    with pytest.raises(FileNotFoundError, match="save was interrupted"):
        ImageIndex.load(bad)


# ------------------------------------------------------------------------------------------------
# embedders


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP with tiny sizes and a Pillow image processor, saved like a
    real checkpoint (safetensors + preprocessor_config.json)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    cfg = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8)
    out = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _images(world, n):
    from mmalign.records import load_image, read_scenes

    return [load_image(world / rel) for _, rel in read_scenes(world / "train" / "scenes.jsonl")[:n]]


def test_clip_embedder_batches_without_changing_results(tiny_clip, world):
    from models.embedders import CLIPEmbedder

    images = _images(world, 5)
    one = CLIPEmbedder(tiny_clip, batch_size=2, device="cpu")
    assert isinstance(one, ImageEmbedder) and one.dim == 8 and one.name.startswith("clip:tiny-clip@")
    x = one.embed(images)
    y = CLIPEmbedder(tiny_clip, batch_size=5, device="cpu").embed(images)
    assert x.shape == (5, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_allclose(x, y, atol=1e-5)
    assert one.embed([]).shape == (0, 8)


def test_policy_vision_embedder_is_the_mean_of_the_projector_input(model_dirs, world):
    import torch
    from transformers import AutoModelForImageTextToText

    from models.embedders import PolicyVisionEmbedder
    from models.processors import load_processor

    path = model_dirs["llava"]
    images = _images(world, 3)
    tower = PolicyVisionEmbedder(path, batch_size=2, device="cpu")
    proj = PolicyVisionEmbedder(path, projector=True, batch_size=2, device="cpu")
    x, xp = tower.embed(images), proj.embed(images)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert x.shape == (3, model.config.vision_config.hidden_size) == (3, tower.dim)
    assert xp.shape == (3, model.config.text_config.hidden_size) == (3, proj.dim)
    # by hand: the last vision layer's patch states without CLS ("default"), mean over patches
    pixels = load_processor(path).image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        want, want_p = hs.mean(1), model.model.multi_modal_projector(hs).mean(1)
    np.testing.assert_allclose(x, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(xp, want_p.numpy(), atol=1e-5)


def test_policy_vision_embedder_on_qwen2_vl_needs_the_projector(model_dirs, world):
    from models.embedders import PolicyVisionEmbedder

    with pytest.raises(ValueError, match="embed with projector=True"):
        PolicyVisionEmbedder(model_dirs["qwen2_vl"], device="cpu")
    emb = PolicyVisionEmbedder(model_dirs["qwen2_vl"], projector=True, batch_size=2, device="cpu")
    x = emb.embed(_images(world, 3))                # the merger's output per image, mean-pooled
    assert x.shape == (3, emb.dim) and np.isfinite(x).all()


# ------------------------------------------------------------------------------------------------
# the index stage


def test_index_stage_builds_skips_adds_and_finds_each_image_first(model_dirs, world, tmp_path, capsys):
    from data_pipelines.index import main

    out = tmp_path / "index"
    common = ["--data", str(world), "--embedder", "policy", "--model", str(model_dirs["llava"]),
              "--out", str(out), "--no-progress", "--batch-size", "16"]
    assert main([*common, "--splits", "train", "--kind", "flat"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "index" and manifest["counts"]["images"] == 40
    index = ImageIndex.load(out)
    assert len(index) == 40 and index.ids[0] == "images/train/000000.png"
    assert index.info["embedder"].startswith("policy-vision:")
    scores, ids = index.search(index.embeddings, k=1)                     # every image is its own top hit
    assert ids[:, 0].tolist() == index.ids and np.allclose(scores[:, 0], 1.0, atol=1e-5)

    capsys.readouterr()
    assert main([*common, "--splits", "train", "--kind", "flat"]) == 0
    assert "up to date" in capsys.readouterr().out

    assert main([*common, "--splits", "val", "--kind", "flat", "--add"]) == 0
    grown = ImageIndex.load(out)
    assert len(grown) == 48 and grown.ids[:40] == index.ids and grown.ids[40].startswith("images/val/")
    np.testing.assert_array_equal(grown.embeddings[:40], index.embeddings)   # the old rows were not recomputed
    assert json.loads((out / "manifest.json").read_text())["counts"]["embedded_this_run"] == 8
    # the grown index reads as if both splits had been indexed at once
    capsys.readouterr()
    assert main([*common, "--splits", "val", "train", "--kind", "flat"]) == 0
    assert "up to date" in capsys.readouterr().out
    # --add with other index parameters is refused, the index untouched
    assert main([*common, "--splits", "test", "--kind", "hnsw", "--add"]) == 2
    assert "rebuild without --add" in capsys.readouterr().err
    assert len(ImageIndex.load(out)) == 48


def test_index_stage_with_clip_and_hnsw(tiny_clip, world, tmp_path):
    from data_pipelines.index import main

    out = tmp_path / "clip-index"
    assert main(["--data", str(world), "--splits", "val", "--embedder", "clip", "--model", str(tiny_clip),
                 "--kind", "hnsw", "--m", "8", "--out", str(out), "--no-progress"]) == 0
    index = ImageIndex.load(out)
    assert (len(index), index.kind, index.dim) == (8, "hnsw", 8)


def test_index_stage_names_missing_and_corrupt_images(model_dirs, world, tmp_path, capsys):
    from data_pipelines.index import main

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    shutil.copy(world / "manifest.json", data / "manifest.json")
    lines = (world / "train" / "scenes.jsonl").read_text().splitlines()[:3]
    (data / "train" / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    rels = [json.loads(line)["image"] for line in lines]
    for rel in rels:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world / rel, data / rel)
    args = ["--data", str(data), "--splits", "train", "--model", str(model_dirs["llava"]), "--out",
            str(tmp_path / "idx"), "--no-progress"]

    (data / rels[1]).unlink()
    assert main(args) == 2
    assert f"missing: {data / 'train' / 'scenes.jsonl'} scene" in capsys.readouterr().err

    raw = (world / rels[1]).read_bytes()
    (data / rels[1]).write_bytes(raw[: len(raw) // 3])                    # truncated PNG
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and rels[1] in err
    assert not (tmp_path / "idx").exists()                                # nothing half-written


def test_index_stage_ivf_with_too_few_images_says_so(model_dirs, world, tmp_path, capsys):
    from data_pipelines.index import main

    assert main(["--data", str(world), "--splits", "val", "--model", str(model_dirs["llava"]), "--kind", "ivf",
                 "--nlist", "16", "--out", str(tmp_path / "ivf"), "--no-progress"]) == 2
    assert "at least nlist=16 vectors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the benchmark


def test_bench_recall_and_numpy_baseline_on_a_tiny_set(tmp_path):
    from benchmarks.bench_index import main, numpy_topk

    # recall by hand: query 0 finds 2 of its 3 true rows, query 1 finds 1 (its -1 is a miss) -> (2/3 + 1/3) / 2
    assert recall_at_k([[0, 1, 9], [4, -1, 8]], [[0, 1, 2], [3, 4, 5]]) == pytest.approx(0.5)
    assert recall_at_k([["a", None]], [["a", "b"]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        recall_at_k([[1, 2]], [[1, 2, 3]])

    base = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    scores, rows = numpy_topk(base, np.array([[0.6, 0.8]], dtype=np.float32), 2)
    assert rows.tolist() == [[1, 2]] and np.allclose(scores, [[0.96, 0.8]])

    assert main(["--n", "600", "--dim", "8", "--queries", "20", "--clusters", "10", "--nprobe", "1,4",
                 "--distribution", "clustered",
                 "--ef-search", "16", "--repeats", "1", "--single-queries", "3", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("index-*.json")).read_text())
    by = {(r["method"], json.dumps(r["params"], sort_keys=True)): r for r in report["runs"][0]["rows"]}
    assert {m for m, _ in by} == {"numpy", "flat", "ivf", "hnsw"}
    assert by[("flat", "{}")]["recall"] == 1.0 and by[("numpy", '{"block": 256}')]["recall"] == 1.0
    assert report["machine"]["faiss"] and report["machine"]["logical_cores"]
    assert "recall@10" in next(tmp_path.glob("index-*.md")).read_text()
