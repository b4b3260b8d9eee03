"""Rendering and the dense patch labels replayed from the same geometry (mmalign/render.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mmalign import world as W
from mmalign.render import LABEL_CLASSES, object_mask, patch_labels, render_scene


def _scenes(n=20, seed=0):
    rng = random.Random(seed)
    return [W.sample_scene(rng, f"r{i}") for i in range(n)]


def test_labels_follow_the_pixels():
    """Every labelled patch is mostly the labelled object's colour in the rendered image, and the
    background patches are mostly background: the labels come from the same polygons."""
    for scene in _scenes():
        img = np.asarray(render_scene(scene, 64, seed=3)).astype(int)
        lab = patch_labels(scene, 64, 8, seed=3)
        for p in range(64):
            py, px = divmod(p, 8)
            block = img[py * 8:(py + 1) * 8, px * 8:(px + 1) * 8].reshape(-1, 3)
            if lab["color"][p]:
                rgb = np.array(W.COLORS[LABEL_CLASSES["color"][lab["color"][p]]])
                near = (np.abs(block - rgb).max(axis=1) < 40).mean()
                assert near >= 0.1, (scene.scene_id, p, near)
            else:
                bg = (block.min(axis=1) > 200).mean()
                assert bg >= 0.5, (scene.scene_id, p, bg)


def test_every_object_is_labelled_with_its_attributes_and_one_centre():
    for scene in _scenes():
        lab = patch_labels(scene, 64, 8, seed=0)
        assert lab["center"].sum() == len({(int(o.y * 8), int(o.x * 8)) for o in scene.objects})
        for o in scene.objects:
            c = min(int(o.y * 8), 7) * 8 + min(int(o.x * 8), 7)
            assert lab["center"][c] == 1
            # the centre patch is covered by the object itself (shapes are convex-ish around it)
            assert LABEL_CLASSES["shape"][lab["shape"][c]] == o.shape
            assert LABEL_CLASSES["color"][lab["color"][c]] == o.color
            assert LABEL_CLASSES["size"][lab["size"][c]] == o.size
            # offset: object centre minus patch centre, in patch units, within half a patch
            assert np.abs(lab["offset"][c]).max() <= 0.5 + 1e-6
            assert lab["offset"][c] == pytest.approx((o.x * 8 - (c % 8 + 0.5), o.y * 8 - (c // 8 + 0.5)), abs=1e-5)
        assert (lab["offset"][lab["shape"] == 0] == 0).all()


def test_mask_and_labels_are_deterministic_and_sized():
    scene = _scenes(1)[0]
    assert (object_mask(scene, 64, 1) == object_mask(scene, 64, 1)).all()
    assert object_mask(scene, 64, 1).shape == (64, 64)
    assert set(np.unique(object_mask(scene, 64, 1))) <= set(range(len(scene.objects) + 1))
    assert patch_labels(scene, 32, 8)["shape"].shape == (16,)
    with pytest.raises(ValueError, match="multiple"):
        patch_labels(scene, 60, 8)
