"""Pixels of the synthetic world: a scene graph drawn with Pillow, and the per-patch labels of
the same drawing.

Why it lives in ``mmalign``: two stages draw scenes. The data stage (``data_pipelines/scenes.py``)
renders the images every model sees; the vision pretraining stage (``models/vision.py``) renders
fresh scenes *and* the label of every image patch (which object lies under it), which it can only
get by replaying the renderer's own geometry. Both import this one module, so the labels can never
drift from the pixels.

Determinism: every random draw comes from a generator seeded by ``(seed, scene_id)``, in a fixed
order (background, then per object: size jitter, colour jitter, rotation), so the same scene, size
and seed give byte-identical images, and :func:`patch_labels` sees exactly the polygons that
:func:`render_scene` filled.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mmalign.world import COLORS, SHAPES, SIZE_EXTENT, SIZES, Scene

#: Render at this multiple of the image size and downsample: anti-aliased edges at 64 px.
SUPERSAMPLE = 4
MAX_ROTATION_DEG = {"circle": 0.0, "square": 8.0, "diamond": 8.0, "triangle": 10.0, "star": 12.0, "cross": 8.0}
#: Patch label of "no object here" (index 0 of every class list in :data:`LABEL_CLASSES`).
BACKGROUND = "none"
#: The classes each patch is labelled with; index 0 is the background.
LABEL_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": (BACKGROUND, *SHAPES),
    "color": (BACKGROUND, *COLORS),
    "size": (BACKGROUND, *SIZES),
}


def derived_seed(seed: int, *parts: str) -> int:
    """A 64-bit seed from (seed, parts) via sha256: stable across runs and Python versions."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape whose circumscribed circle has radius ``r``, rotated by ``rot`` rad."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "diamond":
        # taller than wide, so it differs from a square by its proportions as well as its angle
        pts = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x, y + 0.15) for x, y in pts]  # centre the triangle's bounding box
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.05))
    elif shape == "cross":
        w = 0.34  # half-width of each bar
        h = 0.95
        pts = [(-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w), (w, h), (-w, h), (-w, w), (-h, w), (-h, -w), (-w, -w)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


@dataclass(frozen=True)
class _Layout:
    """What the renderer draws, in supersampled pixels: background, then one entry per object
    (``fill`` is the jittered colour; ``ellipse`` or ``polygon`` is the outline)."""

    background: tuple[int, int, int]
    shapes: tuple[tuple[tuple[int, int, int], str, object], ...]
    rng: np.random.Generator  # positioned after the layout draws: the pixel noise comes next


def _layout(scene: Scene, image_size: int, seed: int) -> _Layout:
    rng = np.random.default_rng(derived_seed(seed, "render", scene.scene_id))
    big = image_size * SUPERSAMPLE
    bg = np.clip(np.array([236, 236, 236]) + rng.integers(-10, 11, size=3), 0, 255)
    shapes = []
    for o in scene.objects:
        r = SIZE_EXTENT[o.size] * big * float(rng.uniform(0.94, 1.06))
        color = tuple(int(v) for v in np.clip(np.array(COLORS[o.color]) + rng.integers(-12, 13, size=3), 0, 255))
        cx, cy = o.x * big, o.y * big
        if o.shape == "circle":
            rr = r * 0.92  # a circle fills its circumscribed circle; shrink to match polygons' area
            shapes.append((color, "ellipse", [cx - rr, cy - rr, cx + rr, cy + rr]))
        else:
            rot = math.radians(float(rng.uniform(-1.0, 1.0)) * MAX_ROTATION_DEG[o.shape])
            shapes.append((color, "polygon", _shape_polygon(o.shape, cx, cy, r, rot)))
    return _Layout(tuple(int(v) for v in bg), tuple(shapes), rng)


def _draw(draw: ImageDraw.ImageDraw, kind: str, outline: object, fill: object) -> None:
    if kind == "ellipse":
        draw.ellipse(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def render_scene(scene: Scene, image_size: int = 64, seed: int = 0) -> Image.Image:
    """Draw a scene as an RGB image; deterministic in (scene, image_size, seed).

    Drawn at ``SUPERSAMPLE`` x the size and downsampled for clean edges; then light pixel noise
    is added so no two images are identical even for similar layouts.
    """
    lay = _layout(scene, image_size, seed)
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), lay.background)
    draw = ImageDraw.Draw(img)
    for color, kind, outline in lay.shapes:
        _draw(draw, kind, outline, color)
    img = img.resize((image_size, image_size), Image.LANCZOS)
    noise = lay.rng.normal(0.0, 3.0, size=(image_size, image_size, 1)).round().astype(np.int16)
    arr = np.asarray(img, dtype=np.int16) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def object_mask(scene: Scene, image_size: int = 64, seed: int = 0, scale: int = 1) -> np.ndarray:
    """Which object covers each pixel: ``[image_size * scale]^2`` int array, 0 = background and
    ``k + 1`` = ``scene.objects[k]``, drawn from the same polygons as :func:`render_scene` (later
    objects over earlier ones, as there; sampled scenes never overlap)."""
    lay = _layout(scene, image_size, seed)
    side = image_size * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for k, (_color, kind, outline) in enumerate(lay.shapes):
        _draw(draw, kind, outline, k + 1)
    if scale != SUPERSAMPLE:
        mask = mask.resize((image_size * scale, image_size * scale), Image.NEAREST)
    return np.asarray(mask, dtype=np.int64)


def patch_labels(scene: Scene, image_size: int = 64, patch: int = 8, seed: int = 0,
                 min_cover: float = 0.15) -> dict[str, np.ndarray]:
    """Dense labels of every ``patch`` x ``patch`` image patch, in row-major patch order
    (the order a ViT's patch tokens come in), for "token labelling" pretraining of a tower.

    Returns arrays of length ``(image_size / patch)^2``:

    * ``shape`` / ``color`` / ``size``: class index into :data:`LABEL_CLASSES` of the object
      covering most of the patch, or 0 (background) when no object covers ``min_cover`` of it;
    * ``center``: 1 where the object's centre falls inside this patch, else 0;
    * ``offset``: ``[n, 2]`` float, the object's centre minus the patch centre, in patch units
      (0 on background patches), so the tower learns *where* an object is, not only what.
    """
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
    grid = image_size // patch
    mask = object_mask(scene, image_size, seed, scale=SUPERSAMPLE)
    side = patch * SUPERSAMPLE
    # [grid, grid, side*side] pixel owners per patch -> coverage of each object per patch
    blocks = mask.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, side * side)
    n_obj = len(scene.objects)
    cover = np.stack([(blocks == k + 1).mean(axis=1) for k in range(n_obj)], axis=1)  # [P, n_obj]
    owner = cover.argmax(axis=1)
    has = cover.max(axis=1) >= min_cover
    out = {name: np.zeros(grid * grid, dtype=np.int64) for name in ("shape", "color", "size", "center")}
    out["offset"] = np.zeros((grid * grid, 2), dtype=np.float32)
    centers_patch = [(min(int(o.y * grid), grid - 1) * grid + min(int(o.x * grid), grid - 1)) for o in scene.objects]
    for p in np.nonzero(has)[0]:
        o = scene.objects[owner[p]]
        out["shape"][p] = LABEL_CLASSES["shape"].index(o.shape)
        out["color"][p] = LABEL_CLASSES["color"].index(o.color)
        out["size"][p] = LABEL_CLASSES["size"].index(o.size)
        py, px = divmod(int(p), grid)
        out["offset"][p] = (o.x * grid - (px + 0.5), o.y * grid - (py + 0.5))
    for c in centers_patch:
        out["center"][c] = 1
    return out
